"""python -m conformance: the conformance report (the project's main job).

Prints a progress bar while it runs (on a terminal; plain progress lines every PROGRESS_EVERY
seconds otherwise, on stderr), then one line per configuration and every failure in full.
--verbose: the full table (one line per configuration and check); -vv: one line per tensor;
--json PATH: every comparison.

Exit status 0 only if every comparison agrees; 1 on any failure; 2 on bad arguments.
"""
from __future__ import annotations

import os

# One BLAS / intra-op thread per process, set before NumPy or torch load: configurations run in
# parallel processes (--jobs), and more threads than cores only thrash on a small machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402

from manual.config import PRESETS

from . import external
from .engine import CHECKS, run_case
from .matrix import VARIANTS, cases
from .report import summarize, write_json


def _one_thread() -> None:
    """Worker processes share the cores: one intra-op thread each (BLAS was limited at the top of
    this module, before NumPy loaded, and forked workers inherit that)."""
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


PROGRESS_EVERY = 10.0      # seconds between plain progress lines when stderr is not a terminal


class Progress:
    """Configurations done so far: a tqdm bar on a terminal, else a line every PROGRESS_EVERY seconds."""

    def __init__(self, total: int, out=None):
        self.total, self.done, self.failed = total, 0, 0
        self.out = out or sys.stderr
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if self.out.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="config", desc="conformance", file=self.out, leave=False)

    def update(self, name: str, results) -> None:
        self.done += 1
        self.failed += any(not c.passed for c in results)
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name}, {self.failed} failing", refresh=False)
            self.bar.update(1)
        elif now - self.last >= PROGRESS_EVERY or self.done == self.total:
            self.last = now
            print(f"conformance: {self.done}/{self.total} configurations done, {self.failed} failing "
                  f"({now - self.t0:.0f} s)", file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _distributed(p, args) -> int:
    """python -m conformance --distributed N: conformance/distributed.py's check, same report."""
    from .distributed import run_distributed, summary
    if args.distributed < 2:
        p.error(f"--distributed needs N >= 2 ranks, got {args.distributed}")
    t0 = time.perf_counter()
    results = run_distributed(args.distributed)
    passed = summarize(results, verbose=args.verbose)
    print(summary(results))
    print(f"({args.distributed} ranks, {time.perf_counter() - t0:.1f} s)")
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0 if passed else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distributed", type=int, nargs="?", const=2, metavar="N",
                   help="instead: the data-parallel check, N gloo ranks on localhost against one process "
                        "(default N 2; conformance/distributed.py)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="model preset whose variants are checked (default tiny)")
    p.add_argument("--dtype", default="both", choices=["float64", "float32", "both"])
    p.add_argument("--quick", action="store_true", help="only a few variants")
    p.add_argument("--variant", action="append", help=f"only these variants (repeatable): {', '.join(VARIANTS)}")
    p.add_argument("--check", action="append", choices=CHECKS, help="only these checks (repeatable)")
    p.add_argument("--third", choices=["hf"], help="also compare manual with a third implementation: "
                   "hf = Hugging Face transformers' GPT2LMHeadModel (conformance/hf.py)")
    p.add_argument("--json", metavar="PATH", help="write every comparison as JSON")
    p.add_argument("--verbose", "-v", action="count", default=0,
                   help="the full table, one line per configuration and check (-vv: one line per tensor)")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                   help="configurations checked in parallel, one process each (default: CPU count)")
    p.add_argument("--coverage", action="store_true",
                   help="run under coverage.py and print the line and branch coverage of the manual math "
                        "(.coveragerc; conformance/power.py); added to --json")
    external.add_arguments(p)
    args = p.parse_args(argv)
    if args.coverage:
        from . import power
        argv = list(sys.argv[1:] if argv is None else argv)
        return power.main([a for a in argv if a != "--coverage"], args.json)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.distributed is not None:
        return _distributed(p, args)
    if args.preset == "gpt2-small":
        p.error("the gpt2-small preset is for import and sizing only (124M parameters); use tiny or medium")
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    try:
        todo = cases(args.preset, dtypes, quick=args.quick, only=args.variant,
                     outside=bool(args.impl or args.impl_cmd))
    except ValueError as exc:
        p.error(str(exc))
    if args.impl or args.impl_cmd:      # your implementation under test (conformance/external.py)
        return external.matrix_main(p, args, todo, initializer=_one_thread)
    checks = tuple(args.check) if args.check else CHECKS
    if args.third == "hf":            # fail before the suite runs when transformers is missing
        from .hf import require_transformers
        try:
            require_transformers()
        except ImportError as exc:
            p.error(str(exc))
    t0 = time.perf_counter()
    for case in todo:
        if args.preset != "tiny":   # bigger presets: fewer optimizer steps and tokens keep it interactive
            case.opt_steps, case.gen_tokens = 3, 5
    parts: list = [None] * len(todo)          # results in matrix order, whatever order they finish in
    progress = Progress(len(todo))
    try:
        if args.jobs == 1 or len(todo) == 1:
            for i, case in enumerate(todo):
                parts[i] = run_case(case, checks)
                progress.update(case.name(), parts[i])
        else:
            with ProcessPoolExecutor(max_workers=args.jobs, initializer=_one_thread) as pool:
                futures = {pool.submit(run_case, case, checks): i for i, case in enumerate(todo)}
                for fut in as_completed(futures):
                    i = futures[fut]
                    parts[i] = fut.result()
                    progress.update(todo[i].name(), parts[i])
    finally:
        progress.close()
    results = [c for part in parts for c in part]
    if args.third == "hf":            # transformers' GPT2LMHeadModel as a third implementation (conformance/hf.py)
        from .hf import run_hf
        for i, dtype in enumerate(dtypes):
            results += run_hf(dtype, preset=args.preset, count=i == 0)
    passed = summarize(results, verbose=args.verbose)
    print(f"({len(todo)} cases, {time.perf_counter() - t0:.1f} s)")
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
