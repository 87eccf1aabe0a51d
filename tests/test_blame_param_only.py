"""A dump without tap gradients: the blame infers, from the parameter gradients, the layer whose
backward first went wrong (tools/layerdiff/blame.py: backward_origin), instead of naming the first
layer whose parameter gradients differ."""
import json

import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from manual import registry
from manual.config import ModelConfig
from tests.test_examples import PY, export_case, run_program
from tools import layerdiff


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return export_case(tmp_path_factory.mktemp("param_only") / "case", dtype="float64")


@pytest.fixture(scope="module")
def post_case(tmp_path_factory):
    return export_case(tmp_path_factory.mktemp("param_only_post") / "case", dtype="float64", norm="post")


def param_only_dump(case, out, *bug):
    """The NumPy port's dump (with `bug` planted), every grad.<tap> dropped."""
    full = out.with_suffix(".full.safetensors")
    r = run_program(PY + list(bug), case, full)
    assert r.returncode == 0, r.stderr
    with safe_open(str(full), framework="np") as f:
        meta = f.metadata()
    with safe_open(str(case / "checkpoint.safetensors"), framework="np") as f:
        cfg = ModelConfig.from_dict(json.loads(f.metadata()["config"]))
    params = {f"grad.{n}" for n in registry.param_shapes(cfg)}
    d = load_file(str(full))
    kept = {k: v for k, v in d.items() if not k.startswith("grad.") or k in params}
    dropped = set(d) - set(kept)
    assert dropped and all(k.startswith("grad.") for k in dropped)
    save_file(kept, str(out), metadata=meta)
    return out


def verdict(case, dump, capsys):
    js = dump.with_suffix(".json")
    rc = layerdiff.main(["--case", str(case), "--against", str(dump), "--json", str(js)])
    text = capsys.readouterr().out
    rep = json.loads(js.read_text())
    assert rc == (0 if rep["agree"] else 1)
    return rep, text


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_ln_backward_bug_is_traced_back_to_ln_f(norm, case, post_case, tmp_path, capsys):
    """Post-norm: h.2.ln_2's parameter gradients are the first, in backward order, to see the wrong
    gradient, though the walk lists h.2.mlp's first."""
    case = case if norm == "pre" else post_case
    rep, text = verdict(case, param_only_dump(case, tmp_path / "ln.safetensors", "--bug", "ln_backward_no_mean"),
                        capsys)
    assert "no tap gradients" in text                                   # the warning
    assert rep["first_divergent"]["tensor"] == "grad.transformer.h.2.mlp.c_proj.bias"
    assert rep["blame"]["verdict"] == "dump"
    assert rep["blame"]["origin"] == "ln_f (manual/layers/layernorm.py: layernorm_backward)", rep["blame"]
    assert "backward first wrong in: ln_f" in text and "inferred from parameter gradients" in text


def test_own_mlp_backward_bug_stays_at_the_mlp(case, tmp_path, capsys):
    rep, text = verdict(case, param_only_dump(case, tmp_path / "mlp.safetensors", "--bug",
                                              "mlp_fc_weight_grad_doubled"), capsys)
    assert rep["first_divergent"]["tensor"] == "grad.transformer.h.2.mlp.c_fc.weight"
    assert rep["blame"]["verdict"] == "dump"
    assert rep["blame"]["origin"] == "h.2.mlp (manual/layers/mlp.py: mlp_backward)", rep["blame"]


def test_correct_port_without_tap_gradients_agrees(case, tmp_path, capsys):
    rep, _ = verdict(case, param_only_dump(case, tmp_path / "ok.safetensors"), capsys)
    assert rep["agree"] and rep["blame"] is None


def test_unsettled_evidence_gives_a_range():
    """Without ln_f's parameter gradients nothing says where between the loss and h.2.mlp the
    gradient went wrong: the answer is a range, not a guess."""
    from conformance.compare import Comparison
    from tools.layerdiff.blame import backward_origin
    cfg = ModelConfig(dtype="float64")
    bad = f"grad.transformer.h.{cfg.n_layers - 1}.mlp.c_proj.bias"
    rows = [Comparison("c", "param_grad", bad, False)]
    check = backward_origin(cfg, bad, rows)
    assert check.layer.startswith("between loss and h."), check
    assert "ln_f" in check.note and "lm_head" in check.note
    rows += [Comparison("c", "param_grad", f"grad.transformer.ln_f.{p}", True) for p in ("weight", "bias")]
    assert backward_origin(cfg, bad, rows).layer == "ln_f"
