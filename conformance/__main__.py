"""python -m conformance: the conformance report (the project's main job).

Exit status 0 only if every comparison agrees; 1 on any failure; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import time

from manual.config import PRESETS

from .engine import CHECKS, run_case
from .matrix import VARIANTS, cases
from .report import summarize, write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="model preset whose variants are checked (default tiny)")
    p.add_argument("--dtype", default="both", choices=["float64", "float32", "both"])
    p.add_argument("--quick", action="store_true", help=f"only a few variants")
    p.add_argument("--variant", action="append", help=f"only these variants (repeatable): {', '.join(VARIANTS)}")
    p.add_argument("--check", action="append", choices=CHECKS, help="only these checks (repeatable)")
    p.add_argument("--json", metavar="PATH", help="write every comparison as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per tensor instead of per check")
    args = p.parse_args(argv)
    if args.preset == "gpt2-small":
        p.error("the gpt2-small preset is for import and sizing only (124M parameters); use tiny or medium")
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    try:
        todo = cases(args.preset, dtypes, quick=args.quick, only=args.variant)
    except ValueError as exc:
        p.error(str(exc))
    checks = tuple(args.check) if args.check else CHECKS
    t0 = time.perf_counter()
    results = []
    for case in todo:
        if args.preset != "tiny":   # bigger presets: fewer optimizer steps and tokens keep it interactive
            case.opt_steps, case.gen_tokens = 3, 5
        results += run_case(case, checks)
    passed = summarize(results, verbose=args.verbose)
    print(f"({len(todo)} configurations, {time.perf_counter() - t0:.1f} s)")
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
