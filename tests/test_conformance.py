"""The conformance matrix as tests: every variant in float64 and float32, every check.

Each test runs one case through conformance.engine.run_case and fails with the lines of every
disagreeing tensor (config, check, tensor, max error, tolerance, worst index and values).
"""
import numpy as np
import pytest

import torch  # noqa: F401  (the suite needs torch: a broken install fails, never skips)

from conformance import engine
from conformance.compare import compare
from conformance.matrix import cases

CASES = cases("tiny", ("float64", "float32"))


def assert_all_pass(results):
    assert results, "no comparisons were made"
    failed = [c for c in results if not c.passed]
    assert not failed, f"{len(failed)} of {len(results)} comparisons failed:\n" + \
        "\n".join(c.line() for c in failed[:40])


@pytest.mark.parametrize("case", CASES, ids=[c.name() for c in CASES])
def test_matrix(case):
    assert_all_pass(engine.run_case(case))


def test_every_category_is_exercised():
    results = engine.run_case(CASES[0])
    seen = {c.check for c in results}
    assert seen == set(engine.CHECKS), f"categories never compared: {set(engine.CHECKS) - seen}"


def test_compare_reports_worst_index_and_values():
    b = np.array([[1.0, 2.0], [3.0, 4.0]])
    a = b.copy()
    a[1, 0] += 1e-6
    c = compare(a, b, tensor="x", check="logits")
    assert not c.passed and c.worst_index == (1, 0)
    assert c.a_value == a[1, 0] and c.b_value == 3.0
    assert c.max_abs == pytest.approx(1e-6, rel=1e-6)
    assert compare(b + 1e-12, b, tensor="x", check="logits").passed          # 1e-12 of a scale-4 tensor
    assert not compare(b.astype(np.float32), b, tensor="x", check="logits").passed  # dtype checked
    assert not compare(b[:1], b, tensor="x", check="logits").passed                 # shape checked
    nan = b.copy(); nan[0, 0] = np.nan
    assert not compare(nan, b, tensor="x", check="logits").passed
