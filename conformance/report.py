"""Printing (a summary, or the full table) and writing (JSON) a list of comparisons.

    verbose 0  one line per configuration, then every failing (config, check) in full
    verbose 1  the full table: one line per (config, check) with its worst tensor, plus every failure
    verbose 2  one line per comparison
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

from .compare import Comparison

LINE_HEADER = (f"{'config':<28} {'check':<15} {'tensor (worst of n)':<38} "
               f"{'max_abs':>17}  {'max_rel':>17}  {'tol':>13}  verdict")


def _worst(items: list[Comparison]) -> Comparison:
    return max(items, key=lambda c: (not c.passed, c.badness))


def _group_lines(items: list[Comparison], out) -> None:
    """One (config, check) group: its worst comparison, then every other failing one indented."""
    worst = _worst(items)
    print(worst.line() + (f"   [{len(items)} tensors]" if len(items) > 1 else ""), file=out)
    for c in items:
        if not c.passed and c is not worst:
            print("    " + c.line(), file=out)


GRAD_CHECKS = ("activation_grad", "param_grad")


def walk_key(c: Comparison) -> str:
    """The tensor as the walk and a dump name it: a gradient's row gets its "grad." prefix back."""
    return f"grad.{c.tensor}" if c.check in GRAD_CHECKS and not c.tensor.startswith("grad.") else c.tensor


def first_divergent(results: list[Comparison]) -> list[str]:
    """One line per failing configuration: its first failing comparison (the rows come in walk order)
    and, for a tensor of the forward / backward walk, the layer that wrote it (Comparison.layer), e.g.
    'tiny.base/64: first divergent grad.transformer.ln_f.weight, written by ln_f (manual/layers/layernorm.py:
    layernorm_backward)'."""
    firsts: dict[str, Comparison] = {}
    for c in results:
        if not c.passed:
            firsts.setdefault(c.config, c)
    lines = []
    for config, c in firsts.items():
        step = f" at step {c.step}" if c.step is not None else ""
        layer = f", written by {c.layer}" if c.layer else ""
        lines.append(f"{config}: first divergent {walk_key(c)}{step} ({c.check}){layer}")
    return lines


def summarize(results: list[Comparison], verbose: int = 0, out=None) -> bool:
    """Print the results at the chosen detail (module docstring) and a verdict; True if all passed."""
    out = sys.stdout if out is None else out        # looked up at call time (a default would freeze the stream)
    groups: dict[tuple, list[Comparison]] = defaultdict(list)
    configs: dict[str, list[Comparison]] = defaultdict(list)
    for c in results:
        groups[(c.config, c.check)].append(c)
        configs[c.config].append(c)
    if verbose:
        print(LINE_HEADER, file=out)
        print("-" * len(LINE_HEADER), file=out)
        for items in groups.values():
            if verbose >= 2:
                for c in items:
                    print(c.line(), file=out)
            else:
                _group_lines(items, out)
        rule = "-" * len(LINE_HEADER)
    else:
        header = f"{'config':<28} {'result':<7} {'comparisons':>11}  {'checks':>6}  worst (max_abs / tol, tensor)"
        rule = "-" * max(len(header), 100)
        print(header, file=out)
        print(rule, file=out)
        for config, items in configs.items():
            n_fail = sum(not c.passed for c in items)
            worst = _worst(items)
            print(f"{config:<28} {'ok' if not n_fail else 'FAIL':<7} {len(items):>11}  "
                  f"{len({c.check for c in items}):>6}  {worst.badness:9.2e} {worst.check} {worst.tensor}"
                  + (f"  ({n_fail} failing)" if n_fail else ""), file=out)
        failing = [items for items in groups.values() if any(not c.passed for c in items)]
        if failing:
            print(rule, file=out)
            print("failures in full:", file=out)
            print(LINE_HEADER, file=out)
            for items in failing:
                _group_lines(items, out)
    n_fail = sum(not c.passed for c in results)
    passed = n_fail == 0 and len(results) > 0
    firsts = first_divergent(results)
    if firsts:
        print(rule, file=out)
        print("first divergent tensor of each failing configuration (walk order: taps forward, loss, tap gradients "
              "backward, parameter gradients):", file=out)
        for line in firsts:
            print("  " + line, file=out)
    print(rule, file=out)
    print(f"{'PASSED' if passed else 'FAILED'}: {len(results) - n_fail} of {len(results)} comparisons agree"
          f" over {len(configs)} configurations", file=out)
    if n_fail:
        first = next(c for c in results if not c.passed)
        print(f"first failure: {first.config} {first.check} {first.tensor}"
              f" (max_abs {first.max_abs:.3g}, tol {first.tol:.3g}) {first.note}", file=out)
    elif not verbose:
        print("(the full table: --verbose; one line per tensor: -vv; everything: --json PATH)", file=out)
    return passed


def write_json(path, results: list[Comparison]) -> None:
    payload = {"passed": bool(results) and all(c.passed for c in results),
               "checks": [c.as_json() for c in results]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
