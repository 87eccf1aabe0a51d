"""tools/layerdiff (python -m tools.layerdiff): the walk order, the layer named for each tensor, the float64 oracle, the
blame verdicts, dumps from another implementation (--against), and the command line."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: F401  (the suite needs torch: a broken install fails, never skips)

import manual
import reference
from conformance import oracle
from conformance.compare import compare
from conformance.engine import Sides
from manual import registry
from manual.config import ModelConfig
from tools import layerdiff
from tools.layerdiff.walk import optimizer_walk

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig.preset("tiny", dtype="float64")


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args):
    """`python -m tools.layerdiff ARGS`, run in this process (torch is imported once): exit status and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = layerdiff.main([str(a) for a in args])
        except SystemExit as exc:       # argparse errors: exit status 2
            rc = exc.code
    return Result(rc, out.getvalue(), err.getvalue())


def cli_process(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.layerdiff", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def sides_with(manual_cls=None, reference_cls=None) -> Sides:
    s = Sides.default()
    s.manual = manual_cls or s.manual
    s.reference = reference_cls or s.reference
    return s


# -- order and names ------------------------------------------------------------------------------

def test_walk_order():
    names = [n for n, _ in layerdiff.expected_names(CFG)]
    taps = [s.name for s in registry.tap_specs(CFG)]
    params = [s.name for s in registry.param_specs(CFG)]
    assert names[:len(taps)] == taps
    assert names[len(taps)] == "loss"
    assert names[len(taps) + 1:2 * len(taps) + 1] == [f"grad.{t}" for t in reversed(taps)]
    assert names[2 * len(taps) + 1:] == [f"grad.{p}" for p in reversed(params)]


@pytest.mark.parametrize("tensor, expected", [
    ("h.1.ln_2.out", "h.1.ln_2 (manual/layers/layernorm.py: layernorm_forward)"),
    ("h.0.attn.probs", "h.0.attn (manual/layers/attention.py: attention_forward)"),
    ("h.0.mlp.act", "h.0.mlp (manual/layers/activations.py: gelu_forward, called by mlp_forward)"),
    ("h.2.resid_1", "h.2.resid_1 (residual add) (manual/layers/block.py: block_forward)"),
    ("loss", "loss (manual/layers/loss.py: loss_forward)"),
    # a gradient is written by the backward of the layer that CONSUMES the tap in the forward
    ("grad.h.2.resid_1", "h.2.ln_2 (manual/layers/layernorm.py: layernorm_backward)"),
    ("grad.h.2.out", "ln_f (manual/layers/layernorm.py: layernorm_backward)"),
    ("grad.logits", "loss (manual/layers/loss.py: loss_backward)"),
    ("grad.h.0.attn.att", "h.0.attn (manual/layers/attention.py: attention_backward)"),
    ("grad.transformer.h.1.mlp.c_fc.bias", "h.1.mlp (manual/layers/mlp.py: mlp_backward)"),
    ("grad.transformer.wte.weight", "embed (manual/layers/embedding.py: embedding_backward) + "
                                    "lm_head (manual/layers/linear.py: unembed_backward)"),
])
def test_where(tensor, expected):
    assert layerdiff.where(CFG, tensor) == expected


def test_post_ln_graph():
    cfg = CFG.replace(norm="post")
    assert layerdiff.where(cfg, "h.0.out") == "h.0.ln_2 (manual/layers/layernorm.py: layernorm_forward)"
    assert layerdiff.where(cfg, "grad.embed.out") == "h.0.attn (manual/layers/attention.py: attention_backward)"
    # every tap has exactly one producing layer
    for s in registry.tap_specs(cfg):
        assert len(layerdiff.culprits(cfg, s.name)) == 1, s.name


CLEAN_VARIANTS = [{}, dict(norm="post", activation="relu", bias=False, tie_embeddings=False),
                  dict(n_future=3, activation="gelu_tanh", loss="brier", temperature=0.7), dict(attention="flash")]
CLEAN_IDS = ["base", "post_relu_nobias_untied", "mtp_brier", "flash"]


@pytest.fixture(params=CLEAN_VARIANTS, ids=CLEAN_IDS)
def clean(request):
    """(cfg, setup, the reference's tensors) of a correct model, one per clean variant."""
    cfg = CFG.replace(**request.param)
    setup = layerdiff.make_setup(cfg)
    return cfg, setup, layerdiff.run_model(reference.Model, setup)


def test_oracle_reproduces_the_reference(clean):
    """The float64 oracle (the judge of forward divergences) agrees with the reference, layer by layer."""
    cfg, setup, ref = clean
    for node in layerdiff.nodes(cfg):
        x = {t: ref[t] for t in node.inputs}
        got = layerdiff.oracle_outputs(node, cfg, x, layerdiff.roles(node, setup.params), setup.ids, setup.targets)
        assert sorted(got) == sorted(node.outputs), node.name
        for t in node.outputs:
            c = compare(ref[t], got[t], tensor=t, check="oracle")
            assert c.passed, c.line()


def test_finite_differences_pass_for_every_clean_layer(clean):
    """The blame check itself: on a correct model, both sides of every layer agree with finite differences."""
    cfg, setup, ref = clean
    for node in layerdiff.nodes(cfg):
        if node.kind == "add":
            continue
        res = layerdiff.blame_backward(node, cfg, setup.params, ref, setup.ids, setup.targets)
        assert {s: c.agrees for s, c in res.sides.items()} == {"manual": True, "reference": True}, (node.name, res)


# -- the walk and the verdicts ---------------------------------------------------------------------

@pytest.mark.parametrize("over", [{}, dict(norm="post", n_future=2, tie_embeddings=False),
                                  dict(dtype="float32")], ids=["f64", "post_mtp_untied", "f32"])
def test_clean_models_agree(over):
    rep = layerdiff.debug(layerdiff.make_setup(CFG.replace(**over)))
    assert rep.ok, rep.first.line()
    assert len(rep.rows) == len(layerdiff.expected_names(rep.setup.cfg))


def test_precision_difference_blames_neither():
    """A difference the layer's math does not explain (both backward passes agree with finite
    differences) is reported as precision, not as a bug of either side."""
    class Noisy(manual.Model):
        def backward(self):
            super().backward()
            g = self.tap_grads["h.1.mlp.fc"]
            self.tap_grads["h.1.mlp.fc"] = g * (1 + 1e-7)

    rep = layerdiff.debug(layerdiff.make_setup(CFG), sides_with(Noisy))
    assert rep.first.tensor == "grad.h.1.mlp.fc"
    assert rep.blame.verdict.startswith("neither")


def test_reference_bug_blames_the_reference(monkeypatch):
    """The judge is not the reference: a broken reference layer is named as the wrong side."""
    import torch.nn.functional as F
    from reference import model as rmodel
    monkeypatch.setattr(rmodel.MLP, "act", lambda self, x: F.gelu(x, approximate="tanh"))
    rep = layerdiff.debug(layerdiff.make_setup(CFG))
    assert rep.first.tensor == "h.0.mlp.act"
    assert rep.blame.verdict == "reference"


def test_backward_bug_blamed_by_finite_differences():
    from tools import faults
    with faults.inject("wpe_grad_shifted") as sides:
        rep = layerdiff.debug(layerdiff.make_setup(CFG), sides)
    assert rep.first.tensor == "grad.transformer.wpe.weight"
    (check,) = rep.blame.checks
    assert check.layer == "embed"
    assert check.sides["manual"].errors["transformer.wpe.weight"] > 1e-3
    assert check.sides["reference"].errors["transformer.wpe.weight"] < 1e-8
    assert rep.blame.verdict == "manual"


# -- dumps from another implementation ------------------------------------------------------------

PORT = '''
"""A stand-in for someone's own port: reads the exported case, writes a dump of every tensor."""
import sys
import numpy as np
sys.path.insert(0, {root!r})
import manual
from safetensors.numpy import save_file
case, out = sys.argv[1], sys.argv[2]
m = manual.Model.load(case + "/checkpoint.safetensors")
loss = m.forward(np.load(case + "/ids.npy"), np.load(case + "/targets.npy"))
m.backward()
d = {{k: np.ascontiguousarray(v) for k, v in m.taps.items()}}
d.update({{"grad." + k: np.ascontiguousarray(v) for k, v in m.tap_grads.items()}})
d.update({{"grad." + k: np.ascontiguousarray(v) for k, v in m.grads.items()}})
d["loss"] = np.asarray(loss, dtype=m.cfg.dtype)
if len(sys.argv) > 3:                      # the port's bug: one element of one tensor
    d[sys.argv[3]] = d[sys.argv[3]].copy()
    d[sys.argv[3]].reshape(-1)[7] += 1e-3
if out.endswith(".npz"):
    del d["h.0.attn.probs"], d["grad.h.0.attn.probs"]     # a port without this tap
    np.savez(out, **d)
else:
    save_file(d, out)
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("case")
    p = cli("--export-case", d / "case", "--norm", "post", "--batch", 2, "--seq-len", 6)
    assert p.returncode == 0, p.stderr
    script = d / "port.py"
    script.write_text(PORT.format(root=str(ROOT)))
    return d


def port(exported, name, *corrupt):
    out = exported / name
    subprocess.run([sys.executable, str(exported / "port.py"), str(exported / "case"), str(out), *corrupt],
                   check=True, cwd=ROOT, timeout=120)
    return out


def test_export_case_files(exported):
    case = exported / "case"
    for f in ("checkpoint.safetensors", "ids.npy", "targets.npy", "names.txt", "README.txt"):
        assert (case / f).is_file(), f
    assert np.load(case / "ids.npy").shape == (2, 6)
    assert "grad.<param name>" in (case / "README.txt").read_text()
    names = (case / "names.txt").read_text().splitlines()
    assert names[0] == "embed.out [2, 6, 64] ['B', 'T', 'C']" and names[-1].startswith("grad.transformer.wte.weight")


def test_against_a_correct_dump_agrees(exported):
    p = cli("--case", exported / "case", "--against", port(exported, "ok.safetensors"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all 131 tensors agree" in p.stdout


@pytest.mark.parametrize("tensor", ["h.1.mlp.act", "grad.h.1.attn.v", "grad.transformer.h.0.ln_2.bias"])
def test_against_names_the_corrupted_tensor(exported, tensor):
    dump = port(exported, f"bad_{tensor}.safetensors", tensor)
    js = exported / f"bad_{tensor}.json"
    p = cli("--case", exported / "case", "--against", dump, "--json", js)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"First divergent tensor: {tensor}" in p.stdout
    rep = json.loads(js.read_text())
    assert rep["first_divergent"]["tensor"] == tensor
    assert rep["blame"]["verdict"] == "dump"


def test_against_npz_with_absent_taps(exported):
    p = cli("--case", exported / "case", "--against", port(exported, "partial.npz", "grad.h.0.mlp.fc"))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "absent from the dump (not compared): 2" in p.stdout
    assert "First divergent tensor: grad.h.0.mlp.fc" in p.stdout


def test_against_rejects_unknown_names(exported, tmp_path):
    from safetensors.numpy import save_file
    bad = tmp_path / "typo.safetensors"
    save_file({"h.0.ln1.out": np.zeros((2, 6, 64))}, str(bad))
    p = cli("--case", exported / "case", "--against", bad)
    assert p.returncode == 2
    assert "h.0.ln1.out" in p.stderr


# -- the command line -----------------------------------------------------------------------------

def test_cli_inject_json_and_plot(tmp_path):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    p = cli_process("--inject", "causal_mask_off_by_one", "--diff-only", "--json", js, "--plot", png)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "First divergent tensor: h.0.attn.probs" in p.stdout
    assert "written by: h.0.attn (manual/layers/attention.py: attention_forward)" in p.stdout
    assert "wrong side: manual" in p.stdout
    rep = json.loads(js.read_text())
    assert rep["first_divergent"]["tensor"] == "h.0.attn.probs" and not rep["agree"]
    assert png.stat().st_size > 10_000


def test_cli_clean_run_exits_0_and_own_ids(tmp_path):
    ids = np.array([[5, 17, 3, 99, 42, 7]])
    np.save(tmp_path / "ids.npy", ids)
    p = cli("--ids", tmp_path / "ids.npy", "--dtype", "float32", "--activation", "relu", "--steps", 2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "agree" in p.stdout and "adamw.param.transformer.wte.weight [step 2]" in p.stdout


def test_cli_checkpoint(tmp_path):
    ck = tmp_path / "m.safetensors"
    manual.Model(CFG.replace(n_layers=1, dtype="float32"), seed=3).save(ck)
    p = cli("--checkpoint", ck, "--dtype", "float64", "--diff-only")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "float64 m.safetensors" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--inject", "nope"], "unknown fault 'nope'"),
    (["--config", "{not json"], "--config"),
    (["--n-heads", "5"], "not divisible"),
    (["--batch", "0"], "--batch"),
    (["--steps", "-1"], "--steps"),
])
def test_cli_bad_arguments_exit_2(args, message):
    p = cli(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr


# -- shared parts: the graph from the registry, the verdicts, the trajectory, the heatmap -----------

@pytest.mark.parametrize("norm", ["pre", "post"])
def test_graph_follows_the_declared_block_topology(norm):
    """Every input of every layer is written by an earlier layer, and each block's layers are the
    registry's BLOCK_TOPOLOGY in its order."""
    cfg = CFG.replace(norm=norm, n_future=2)
    written = set()
    for node in layerdiff.nodes(cfg):
        assert all(t in written for t in node.inputs), (node.name, node.inputs)
        written.update(node.outputs)
    assert written == {s.name for s in registry.tap_specs(cfg)} | {"loss"}
    block = [n.name.split(".", 2)[2] for n in layerdiff.nodes(cfg) if n.name.startswith("h.1.")]
    assert block == [s.name for s in registry.BLOCK_TOPOLOGY[norm]]
    with pytest.raises(ValueError, match="norm 'side'"):
        registry.block_topology(type("Cfg", (), {"norm": "side"})())


def test_oracle_is_a_whole_model():
    """The oracle's layers chained along the graph give the reference's loss (a third model)."""
    setup = layerdiff.make_setup(CFG.replace(n_future=2, loss="brier"))
    cfg, x = setup.cfg, {}
    for node in layerdiff.nodes(cfg):
        x.update(layerdiff.oracle_outputs(node, cfg, x, layerdiff.roles(node, setup.params), setup.ids,
                                          setup.targets))
    ref = layerdiff.run_model(reference.Model, setup)
    assert compare(x["loss"], ref["loss"], tensor="loss", check="oracle").passed
    assert oracle.activation(np.array([-1.0, 2.0]), "relu").tolist() == [0.0, 2.0]


def test_verdicts_are_built_from_the_sides():
    from tools.layerdiff.blame import SideCheck, verdict
    ok, bad, worse = SideCheck(True), SideCheck(False, badness=10.0), SideCheck(False, badness=1e4)
    assert verdict({}, "x") == "unknown (no check applies)"
    assert verdict({"manual": ok, "reference": ok}, "finite differences") == \
        "neither (both agree with finite differences; the difference is precision)"
    assert verdict({"manual": bad, "reference": ok}, "x") == "manual"
    assert verdict({"manual": bad, "reference": worse}, "x") == "reference"     # 1000x worse
    assert verdict({"manual": bad, "reference": SideCheck(False, badness=20.0)}, "x") == "both"


def test_debugger_walks_the_engines_trajectory():
    """The debugger's optimizer walk is conformance/trajectory.py: same rows, same order, same values."""
    from conformance import trajectory
    setup = layerdiff.make_setup(CFG)
    sides = Sides.default()
    rows, failing = optimizer_walk(setup, sides, 2, "sgd")
    assert failing is None
    m, r = sides.manual.from_params(CFG, setup.params), sides.reference.from_params(CFG, setup.params)
    again = [c for step in trajectory.run(sides.manual_optim, m, r, "sgd", setup.trajectory(2), setup.label)
             for c in step.rows]
    assert [(c.tensor, c.step, c.max_abs) for c in rows] == [(c.tensor, c.step, c.max_abs) for c in again]
    names = [c.tensor for c in rows if c.step == 1]
    assert names[0] == "sgd.loss" and names[-1].startswith("sgd.optim.momentum_buffer.")


def test_heatmap_shows_an_optimizer_failure(tmp_path):
    """A step-2 failure is red in the optimizer panel, and the first divergent cell is the boxed one."""
    from tools import faults
    from tools.layerdiff import report
    with faults.inject("grads_not_zeroed") as sides:
        rep = layerdiff.debug(layerdiff.make_setup(CFG), sides, steps=2)
    rnames, cnames, grid = report._grid(rep.opt_rows, report._opt_cell)
    assert rnames == ["step 1", "step 2"]
    assert (grid[0] <= 0).all() and grid[1, cnames.index("grad")] > 0
    assert report._opt_cell(rep.first) == ("step 2", "grad")
    png = tmp_path / "opt.png"
    layerdiff.plot(rep, png)
    assert png.stat().st_size > 10_000
