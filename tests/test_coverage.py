"""Coverage as a contract (issue 16): the default conformance matrix executes every line and every
branch of the manual math (.coveragerc lists what counts and every exclusion, with its reason).

The subset run here: every case of the default matrix, with the checks that run the math (logits,
loss, activations and their gradients, parameter gradients, every optimizer trajectory, generation);
memory, param_count and the 200-step training check are left out (they run the same code again; the
memory check's tracemalloc peak is perturbed by the tracer). `python -m conformance --coverage`
measures the full default run and prints the same figure."""
from __future__ import annotations

from conformance import power


def test_default_matrix_covers_every_line_and_branch_of_the_math(tmp_path):
    fig = power.measure([], data_file=tmp_path / ".coverage", module="conformance.power")
    assert fig["returncode"] == 0, "the matrix itself failed"
    assert fig["files"], "coverage measured no file of the manual math (.coveragerc include)"
    assert (fig["lines"], fig["branches"]) == (100.0, 100.0), power.describe(fig)


def test_figure_reports_missing_lines_and_branches():
    fig = {"lines": 50.0, "branches": 50.0, "counts": dict(statements=4, missing=2, branches=2, partial=1),
           "files": {"manual/x.py": dict(missing_lines=[3, 4], missing_branches={5: [-1]}),
                     "manual/y.py": dict(missing_lines=[], missing_branches={})}}
    text = power.describe(fig)
    assert "lines 50.0% (2/4), branches 50.0% (1/2)" in text
    assert "manual/x.py: lines not run [3, 4]; branches not taken 5->exit" in text and "y.py" not in text
