"""How much of the manual implementation the conformance matrix exercises (issue 16).

`python -m conformance --coverage [other options]` runs the same command again under coverage.py
(line and branch coverage, `.coveragerc` at the repository root: which files count as "the math"
and which lines are excluded, each exclusion with its reason), combines the data of the worker
processes, and prints the figure after the report; with --json PATH the figure is added to the JSON
under "coverage". The default matrix alone must reach 100% (tests/test_coverage.py keeps it there).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RCFILE = ROOT / ".coveragerc"


FAST_CHECKS = ("logits", "loss", "activation", "activation_grad", "param_grad", "accumulate", "optimizer", "generation",
               "recompute")


def fast_subset() -> int:
    """`python -m conformance.power`: every case of the default matrix, the checks that run the math
    (FAST_CHECKS), 2 optimizer steps and 2 generated tokens each, in this process. The subset
    tests/test_coverage.py measures (under `coverage run`) to keep the contract in CI."""
    from .engine import run_case
    from .matrix import cases

    failed = 0
    for case in cases():
        case.opt_steps, case.gen_tokens, case.train_steps = min(case.opt_steps, 2), 2, 0
        failed += any(not c.passed for c in run_case(case, FAST_CHECKS))
    return 1 if failed else 0


def measure(argv: list[str], data_file: str | os.PathLike | None = None, module: str = "conformance") -> dict:
    """Run `python -m <module> *argv` under coverage; return the figure (see `figure`).
    The exit status of the run is returned under "returncode"."""
    import coverage

    data_file = Path(data_file) if data_file else ROOT / ".coverage"
    for old in [data_file, *data_file.parent.glob(data_file.name + ".*")]:   # not .coveragerc
        old.unlink(missing_ok=True)
    env = dict(os.environ, COVERAGE_FILE=str(data_file))
    rc = subprocess.call([sys.executable, "-m", "coverage", "run", f"--rcfile={RCFILE}", "-m", module, *argv],
                         cwd=ROOT, env=env)
    cov = coverage.Coverage(data_file=str(data_file), config_file=str(RCFILE))
    cov.combine()
    cov.save()
    out = figure(cov)
    out["returncode"] = rc
    return out


def figure(cov) -> dict:
    """{"lines": %, "branches": %, "total": %, "files": {path: {...missing...}}} of a loaded Coverage."""
    cov.load()
    data = cov.get_data()
    files, totals = {}, dict(statements=0, missing=0, branches=0, partial=0)
    for path in sorted(data.measured_files()):
        analysis = cov._analyze(path)           # the public report API prints; this gives the numbers
        n = analysis.numbers
        rel = os.path.relpath(path, ROOT)
        missing_branches = {int(k): sorted(v) for k, v in analysis.missing_branch_arcs().items()}
        files[rel] = dict(statements=n.n_statements, missing_lines=sorted(analysis.missing),
                          branches=n.n_branches, missing_branches=missing_branches)
        totals["statements"] += n.n_statements
        totals["missing"] += n.n_missing
        totals["branches"] += n.n_branches
        totals["partial"] += n.n_missing_branches

    def pct(done, total):
        return 100.0 if total == 0 else 100.0 * done / total

    return dict(lines=pct(totals["statements"] - totals["missing"], totals["statements"]),
                branches=pct(totals["branches"] - totals["partial"], totals["branches"]),
                total=pct(totals["statements"] - totals["missing"] + totals["branches"] - totals["partial"],
                          totals["statements"] + totals["branches"]),
                counts=totals, files=files)


def describe(fig: dict) -> str:
    """The figure in a few lines: totals, then every file with something missing."""
    c = fig["counts"]
    lines = [f"coverage of the manual math (.coveragerc): lines {fig['lines']:.1f}% "
             f"({c['statements'] - c['missing']}/{c['statements']}), branches {fig['branches']:.1f}% "
             f"({c['branches'] - c['partial']}/{c['branches']})"]
    for path, f in fig["files"].items():
        if f["missing_lines"] or f["missing_branches"]:
            br = ", ".join(f"{a}->{'exit' if b < 0 else b}" for a, bs in f["missing_branches"].items() for b in bs)
            lines.append(f"  {path}: lines not run {f['missing_lines']}" + (f"; branches not taken {br}" if br else ""))
    return "\n".join(lines)


# The memory check's tracemalloc peak counts the tracer's own allocations under coverage (measured:
# tiny.T_1/32 10% over its prediction), so a coverage run leaves it out unless --check names it.
UNDER_COVERAGE = ("param_count", "logits", "loss", "activation", "activation_grad", "param_grad",
                  "accumulate", "optimizer", "generation", "recompute", "training")


def main(argv: list[str], json_path: str | None) -> int:
    """`python -m conformance --coverage`: the run, then the figure (printed, and into the JSON)."""
    if "--check" not in argv:
        argv = [*argv, *[a for c in UNDER_COVERAGE for a in ("--check", c)]]
    fig = measure(argv)
    print(describe(fig))
    if json_path and Path(json_path).exists():
        payload = json.loads(Path(json_path).read_text())
        payload["coverage"] = {k: v for k, v in fig.items() if k != "returncode"}
        Path(json_path).write_text(json.dumps(payload, indent=1))
    return fig["returncode"]


if __name__ == "__main__":
    sys.exit(fast_subset())
