"""The zoo runner: every fault of tools/faults.py injected into the manual side, checked by the
conformance suite (is it caught?) and by the debugger (is it localised, and who is blamed?)."""
from __future__ import annotations

import sys
import time

from tools._args import set_blas_threads

from .session import debug
from .walk import make_setup


def run_fault(name: str) -> dict:
    """Inject one fault: is it caught by the conformance suite, what does the debugger name first."""
    from conformance.engine import run_case
    from tools import faults
    t0 = time.perf_counter()
    fault = faults.get(name)
    with faults.inject(name) as sides:
        results = run_case(fault.case(), fault.checks, sides)
        caught = any(not c.passed for c in results)
        setup = make_setup(fault.model_config(), batch=fault.batch, seq_len=fault.seq_len, pad=fault.pad,
                           label=f"fault {name}")
        rep = debug(setup, sides, steps=fault.opt_steps)
    first = rep.first
    return {"name": name, "caught": caught, "first_divergent": None if first is None else first.tensor,
            "expected": fault.expected, "localized": first is not None and first.tensor == fault.expected,
            "step": None if first is None else first.step, "layer": rep.first_where,
            "blame": None if rep.blame is None else rep.blame.verdict,
            "failing_suite_checks": sorted({c.check for c in results if not c.passed}),
            "seconds": round(time.perf_counter() - t0, 2)}


def _worker_init():
    import torch
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning)


def run_zoo(names=None, workers: int = 2) -> dict:
    from tools import faults
    names = list(names) if names else [f.name for f in faults.FAULTS]
    for n in names:
        faults.get(n)
    t0 = time.perf_counter()
    if workers > 1 and len(names) > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        set_blas_threads(1)   # before the spawned workers import NumPy (an initializer would run too late)
        with ctx.Pool(min(workers, len(names)), initializer=_worker_init) as pool:
            results = pool.map(run_fault, names, chunksize=1)
    else:
        results = [run_fault(n) for n in names]
    wall = time.perf_counter() - t0
    n = len(results)
    return {"faults": results, "caught": sum(r["caught"] for r in results), "localized":
            sum(r["localized"] for r in results), "total": n, "wall_seconds": round(wall, 2), "workers": workers}


def print_zoo(z: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"{'fault':<34} {'caught':<7} {'localized':<10} {'first divergent tensor':<52} blame", file=out)
    for r in z["faults"]:
        first = (r["first_divergent"] or "-") + (f" [step {r['step']}]" if r.get("step") else "")
        print(f"{r['name']:<34} {'yes' if r['caught'] else 'NO':<7} {'yes' if r['localized'] else 'NO':<10} "
              f"{first:<52} {r['blame']}", file=out)
        if not r["localized"]:
            print(f"{'':<34} expected: {r['expected']}", file=out)
    print(f"caught {z['caught']}/{z['total']}, localized {z['localized']}/{z['total']} "
          f"({z['wall_seconds']:.1f} s with {z['workers']} worker(s))", file=out)
