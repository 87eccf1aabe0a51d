"""Printing (one line per configuration and check) and writing (JSON) a list of comparisons."""
from __future__ import annotations

import json
import sys
from collections import defaultdict

from .compare import Comparison


def summarize(results: list[Comparison], verbose: bool = False, out=sys.stdout) -> bool:
    """Print one line per (config, check) with its worst tensor, every failing tensor, and a verdict."""
    groups: dict[tuple, list[Comparison]] = defaultdict(list)
    for c in results:
        groups[(c.config, c.check)].append(c)
    header = (f"{'config':<28} {'check':<15} {'tensor (worst of n)':<38} "
              f"{'max_abs':>17}  {'err/scale':>16}  {'tol':>13}  verdict")
    print(header, file=out)
    print("-" * len(header), file=out)
    for (config, check), items in groups.items():
        if verbose:
            for c in items:
                print(c.line(), file=out)
            continue
        failed = [c for c in items if not c.passed]
        worst = max(items, key=lambda c: (not c.passed, c.badness))
        line = worst.line()
        print(line + (f"   [{len(items)} tensors]" if len(items) > 1 else ""), file=out)
        for c in failed:
            if c is not worst:
                print("    " + c.line(), file=out)
    n_fail = sum(not c.passed for c in results)
    passed = n_fail == 0 and len(results) > 0
    print("-" * len(header), file=out)
    print(f"{'PASSED' if passed else 'FAILED'}: {len(results) - n_fail} of {len(results)} comparisons agree"
          f" over {len({c.config for c in results})} configurations", file=out)
    if n_fail:
        first = next(c for c in results if not c.passed)
        print(f"first failure: {first.config} {first.check} {first.tensor}"
              f" (max_abs {first.max_abs:.3g}, tol {first.tol:.3g}) {first.note}", file=out)
    return passed


def write_json(path, results: list[Comparison]) -> None:
    payload = {"passed": bool(results) and all(c.passed for c in results),
               "checks": [c.as_json() for c in results]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
