"""Coverage as a contract (issue 16): the default conformance matrix executes every line and every
branch of the manual math (.coveragerc lists what counts and every exclusion, with its reason).

The fast subset run here (`python -m conformance.power`): every case of the default matrix, with the
checks that run the math (logits, loss, activations and their gradients, parameter gradients, every
optimizer of the case for 2 steps, 2 generated tokens, activation recomputation); memory,
param_count and the 200-step training check are left out (they run the same code again; the memory
check's tracemalloc peak is perturbed by the tracer). `python -m conformance --coverage` measures the
full default run and prints the same figure.

KNOWN_GAPS: the lines (by their source text, so edits elsewhere do not move them) that the matrix does
not reach yet, each with its reason. Any other missing line or branch fails the test; so does a gap
that has been closed (then delete it here)."""
from __future__ import annotations

from pathlib import Path

from conformance import power

ROOT = Path(__file__).resolve().parent.parent

# Lines and branches the matrix does not reach yet, by source text, each with its reason: none (the default
# matrix covers all of the math; .coveragerc lists the exclusions). A new gap fails the test; list one here
# only with its reason and an issue to close it.
KNOWN_GAPS: dict[str, set[str]] = {}


def _text(path: str, line: int) -> str:
    return (ROOT / path).read_text().splitlines()[line - 1].strip()


def test_default_matrix_covers_every_line_and_branch_of_the_math(tmp_path):
    fig = power.measure([], data_file=tmp_path / ".coverage", module="conformance.power")
    assert fig["returncode"] == 0, "the matrix itself failed"
    assert fig["files"], "coverage measured no file of the manual math (.coveragerc include)"
    unexpected, seen = [], {}
    for path, f in fig["files"].items():
        lines = set(f["missing_lines"]) | {int(a) for a in f["missing_branches"]}
        for line in sorted(lines):
            text = _text(path, line)
            seen.setdefault(path, set()).add(text)
            if text not in KNOWN_GAPS.get(path, ()):
                unexpected.append(f"{path}:{line}: {text}")
    assert not unexpected, "not reached by the matrix:\n" + "\n".join(unexpected) + "\n" + power.describe(fig)
    closed = {p: sorted(t - seen.get(p, set())) for p, t in KNOWN_GAPS.items() if t - seen.get(p, set())}
    assert not closed, f"these gaps are closed now: delete them from KNOWN_GAPS: {closed}"


def test_figure_reports_missing_lines_and_branches():
    fig = {"lines": 50.0, "branches": 50.0, "counts": dict(statements=4, missing=2, branches=2, partial=1),
           "files": {"manual/x.py": dict(missing_lines=[3, 4], missing_branches={5: [-1]}),
                     "manual/y.py": dict(missing_lines=[], missing_branches={})}}
    text = power.describe(fig)
    assert "lines 50.0% (2/4), branches 50.0% (1/2)" in text
    assert "manual/x.py: lines not run [3, 4]; branches not taken 5->exit" in text and "y.py" not in text
