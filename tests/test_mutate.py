"""tools/mutate.py: the mutants it makes, and a small fixed sample through the whole loop (a copied tree,
the matrix, the zero-tolerance oracle). The full figure (300+ mutants) is in docs/mutation.md."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tools import mutate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mutants():
    return mutate.all_mutants(ROOT, mutate.DEFAULT_FILES)


def test_every_math_file_has_mutants_of_every_kind(mutants):
    files = {m.file for m in mutants}
    # mlp.py only composes calls of other layers: nothing to mutate there
    assert files == set(mutate.DEFAULT_FILES) - {"manual/layers/mlp.py"}, set(mutate.DEFAULT_FILES) - files
    kinds = {m.kind for m in mutants}
    assert kinds >= {"operator", "augassign", "assign", "unary", "compare", "constant", "axis", "slice", "bool"}, kinds
    assert len(mutants) > 400, len(mutants)


def test_each_mutant_parses_changes_one_place_and_spares_validation(mutants):
    sources = {f: (ROOT / f).read_text() for f in mutate.DEFAULT_FILES}
    for m in mutants:
        src = sources[m.file]
        new = m.apply(src)
        assert new != src
        ast.parse(new)                                      # still Python
        diff = m.diff(src)
        assert f"-" in diff and m.new in diff, diff
        line = src.splitlines()[m.line - 1]
        assert not line.lstrip().startswith("raise "), f"{m.file}:{m.line} mutates validation: {line}"
    assert (ROOT / "manual/layers/layernorm.py").read_text() == sources["manual/layers/layernorm.py"]   # untouched


def _find(mutants, file, old, new):
    hits = [m for m in mutants if m.file == file and m.old == old and m.new == new]
    assert hits, f"no mutant {old!r} -> {new!r} in {file}"
    return hits[0]


def test_fixed_sample_killed_crashed_equivalent(mutants):
    """Three mutants of the layer norm, one of each verdict, on the base variant in float64."""
    f = "manual/layers/layernorm.py"
    src = (ROOT / f).read_text()
    killed = _find(mutants, f, "var += eps", "var -= eps")
    crashed = _find(mutants, f, "var += eps", "var = eps")
    # a rewrite that changes no output: the verdict must come from the oracle, not from the matrix
    line = next(i for i, ln in enumerate(src.splitlines(), 1) if "var += eps" in ln)
    col = src.splitlines()[line - 1].index("var += eps")
    same = mutate.Mutant(f, line, "identity", (line, col), (line, col + len("var += eps")), "var += eps",
                         "var += eps * 1")
    out = mutate.run_mutants([killed, crashed, same], ROOT, workers=2,
                             matrix=mutate.Matrix(variants=["base"], dtypes=("float64",), timeout=600),
                             progress=lambda s: None)
    assert [r["verdict"] for r in out] == ["killed", "crashed", "equivalent"], out
    assert "tiny.base/64" in out[0]["by"]
    assert (ROOT / f).read_text() == src                     # the real file never changes


def test_missed_is_reported_with_file_line_and_diff():
    r = dict(file="manual/x.py", line=3, kind="operator", verdict="missed", changed=["a"], diff="-a\n+b\n")
    text = mutate.summary([r, {**r, "verdict": "killed"}, {**r, "verdict": "equivalent"}])
    assert text.startswith("3 mutants: 1 killed, 0 crashed, 1 equivalent, 1 missed; kill rate 50.0%")
    assert "MISSED manual/x.py:3 (operator)" in text and "-a\n+b" in text


def test_outside_implementation_through_impl_cmd():
    """The same tool on an outside program (examples/numpy_port, run through --impl-cmd in a copied tree):
    a mutant of its layer norm's backward is killed, a rewrite that changes nothing is equivalent."""
    root, f = ROOT / "examples" / "numpy_port", "port.py"
    src = (root / f).read_text()
    ports = mutate.all_mutants(root, [f])
    killed = _find(ports, f, "dxhat - dxhat.mean(axis=-1, keepdims=True)",
                   "(dxhat + dxhat.mean(axis=-1, keepdims=True))")
    line = next(i for i, ln in enumerate(src.splitlines(), 1) if "self.rstd = 1.0 / np.sqrt(var + self.eps)" in ln)
    col = src.splitlines()[line - 1].index("1.0 / np.sqrt")
    same = mutate.Mutant(f, line, "identity", (line, col), (line, col + len("1.0")), "1.0", "(0.5 + 0.5)")
    impl = mutate.Impl(cmd=f"{sys.executable} port.py {{case}} {{out}}", steps=0)
    out = mutate.run_mutants([killed, same], root, workers=2, progress=lambda s: None,
                             matrix=mutate.Matrix(variants=["base"], dtypes=("float64",), timeout=600, impl=impl))
    assert [r["verdict"] for r in out] == ["killed", "equivalent"], out
    assert "tiny.base/64" in out[0]["by"] and out[0]["cases"] == "all"
    assert (root / f).read_text() == src                     # the real file never changes


def test_refuses_to_run_when_the_unmutated_code_fails(tmp_path):
    """A tree that already fails the matrix would make every mutant "killed": the run stops first and
    names the failing comparison."""
    import shutil
    root, f = tmp_path / "port", "port.py"
    shutil.copytree(ROOT / "examples" / "numpy_port", root)
    src = (root / f).read_text()
    good = "dxhat - dxhat.mean(axis=-1, keepdims=True)"
    assert good in src
    (root / f).write_text(src.replace(good, "dxhat + dxhat.mean(axis=-1, keepdims=True)"))
    some = mutate.all_mutants(root, [f])[:1]
    impl = mutate.Impl(cmd=f"{sys.executable} port.py {{case}} {{out}}", steps=0)
    with pytest.raises(mutate.MutateError, match=r"unmutated code fails the matrix: tiny\.base/64"):
        mutate.run_mutants(some, root, workers=1, progress=lambda s: None,
                           matrix=mutate.Matrix(variants=["base"], dtypes=("float64",), timeout=600, impl=impl))
