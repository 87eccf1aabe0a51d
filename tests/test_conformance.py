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


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_max_rel_is_relative_to_the_tensors_scale(dtype):
    """max_rel = max|a - b| / max(scale, floor): no near-zero blow-ups on passing rows."""
    b = np.array([1e-300, 0.0, 2.0, -4.0], dtype=dtype)
    a = b.copy()
    a[0] += a.dtype.type(1e-12)                 # a tiny error where b is ~0: per element it would be 1e+288
    c = compare(a, b, tensor="x", check="logits")
    assert c.passed and c.max_rel == pytest.approx(c.max_abs / 4.0)
    assert c.max_rel <= (1e-9 if dtype == "float64" else 1.0)
    zero = np.zeros(3, dtype=dtype)
    z = compare(zero + zero.dtype.type(1e-7), zero, tensor="x", check="logits", expect_dtype=dtype)
    assert np.isfinite(z.max_rel)                # an all-zero reference: divided by the floor, never by 0
    assert compare(b, b, tensor="x", check="logits").max_rel == 0.0


def test_recomputation_tolerance_comes_from_compare():
    from conformance.compare import RECOMPUTE_REL_TO_SCALE, compare_recomputed
    want = np.array([1.0, -2.0])
    for dtype, rel in RECOMPUTE_REL_TO_SCALE.items():
        inside = (want * (1 + 0.4 * rel)).astype(dtype)
        outside = (want * (1 + 3 * rel)).astype(dtype)
        assert compare_recomputed(inside, want, tensor="p", check="r").passed, dtype
        assert not compare_recomputed(outside, want, tensor="p", check="r").passed, dtype


def _results():
    ok = compare(np.ones(3), np.ones(3), tensor="t.ok", check="loss", config="cfg.a")
    bad = compare(np.ones(3) + 1e-3, np.ones(3), tensor="t.bad", check="param_grad", config="cfg.b")
    ok_b = compare(np.ones(3), np.ones(3), tensor="t.ok", check="loss", config="cfg.b")
    return [ok, ok_b, bad]


def test_summary_is_one_line_per_config_and_failures_in_full():
    import io
    from conformance.report import summarize
    out = io.StringIO()
    assert not summarize(_results(), out=out)
    text = out.getvalue()
    lines = text.splitlines()
    assert any(line.startswith("cfg.a") and " ok " in line for line in lines)
    assert any(line.startswith("cfg.b") and "FAIL" in line and "(1 failing)" in line for line in lines)
    assert "failures in full:" in text and "t.bad" in text.split("failures in full:")[1]
    assert "FAILED: 2 of 3 comparisons agree over 2 configurations" in text
    full = io.StringIO()
    summarize(_results(), verbose=1, out=full)
    assert sum(line.startswith("cfg.") for line in full.getvalue().splitlines()) == 3   # one per (config, check)


def test_progress_lines_when_not_a_terminal(monkeypatch):
    import io
    from conformance import __main__ as cli
    out = io.StringIO()
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.0)
    p = cli.Progress(2, out=out)
    p.update("cfg.a", _results()[:1])
    p.update("cfg.b", _results())
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("conformance: 1/2 configurations done, 0 failing")
    assert lines[1].startswith("conformance: 2/2 configurations done, 1 failing")
