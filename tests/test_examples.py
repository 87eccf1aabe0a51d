"""The two worked examples (examples/numpy_port, examples/c) run end to end through the debugger.

Each example is an independent implementation run as an outside program, `CMD CASE OUT`:
the test exports a case (`--export-case`), runs the program, and asks the debugger to compare
the dump against the reference. A correct example agrees on every tensor; each planted bug is
caught, and the first divergent tensor, the layer and the side blamed are the right ones.

Two helpers are the only places that know how the debugger is called (`export_case`,
`debugger_verdict`); when the outside-program harness lands they are the lines to switch to
`python -m conformance --impl-cmd ...` and `python -m tools.layerdiff`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PORT = ROOT / "examples" / "numpy_port" / "port.py"
C_DIR = ROOT / "examples" / "c"
EXIT_UNSUPPORTED = 3


# ================================================================================================
# the two helpers that talk to the debugger

def export_case(folder: Path, **flags) -> Path:
    """`layerdiff --export-case folder` with config flags (dtype="float32", norm="post", no_bias=True, ...)."""
    from tools import layerdiff
    argv = ["--export-case", str(folder)]
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    assert layerdiff.main(argv) == 0
    return folder


def debugger_verdict(case: Path, dump: Path, blame: bool = True) -> dict:
    """The debugger's verdict on a dump: agree, first divergent tensor, its layer(s), the side blamed."""
    from tools import layerdiff
    out = dump.with_suffix(".verdict.json")
    rc = layerdiff.main(["--case", str(case), "--against", str(dump), "--json", str(out)]
                        + ([] if blame else ["--no-blame"]))
    rep = json.loads(out.read_text())
    first = rep["first_divergent"] or {}
    where = first.get("layer", "")
    # "ln_f (manual/layers/layernorm.py: layernorm_backward) + ..." -> [("ln_f", "layernorm_backward"), ...]
    layers = [(part.split(" (")[0], part.rsplit(": ", 1)[-1].rstrip(")")) for part in where.split(" + ") if part]
    assert rc == (0 if rep["agree"] else 1), (rc, rep["agree"])
    return {"agree": rep["agree"], "first": first.get("tensor"), "layers": layers,
            "blame": (rep["blame"] or {}).get("verdict"), "compared": len(rep["rows"]), "absent": rep["absent"]}


def n_names(case: Path) -> int:
    return len((case / "names.txt").read_text().splitlines())


def run_program(cmd: list, case: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd + [str(case), str(out)], capture_output=True, text=True, timeout=120, env=env)


def assert_agrees(cmd: list, case: Path) -> None:
    dump = case / "dump.safetensors"
    r = run_program(cmd, case, dump)
    assert r.returncode == 0, r.stderr
    v = debugger_verdict(case, dump, blame=False)
    assert v["agree"], v
    assert v["compared"] == n_names(case) and not v["absent"], v       # the dump holds every tensor


def assert_bug_found(cmd: list, case: Path, dump: Path, expected: tuple) -> None:
    """The planted bug is caught: first divergent tensor, one of its layers (and function), the dump blamed."""
    r = run_program(cmd, case, dump)
    assert r.returncode == 0, r.stderr
    v = debugger_verdict(case, dump)
    tensor, layer, fn = expected
    assert not v["agree"]
    assert v["first"] == tensor, v
    assert (layer, fn) in v["layers"], v
    assert v["blame"] == "dump", v


def assert_unsupported(cmd: list, case: Path, field: str) -> None:
    r = run_program(cmd, case, case / "dump.safetensors")
    assert r.returncode == EXIT_UNSUPPORTED, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"field {field}" in lines[0], r.stderr
    assert not (case / "dump.safetensors").exists()


def with_config_field(case: Path, **extra) -> Path:
    """Rewrite the case's checkpoint with extra config fields (a field a port cannot know)."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    path = case / "checkpoint.safetensors"
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    cfg.update(extra)
    meta["config"] = json.dumps(cfg)
    save_file(load_file(str(path)), str(path), metadata=meta)
    return case


# ================================================================================================
# examples/numpy_port

PY = [sys.executable, str(PORT)]

NUMPY_CONFIGS = {   # label -> export flags
    "float64-base": dict(dtype="float64"),
    "float64-post-untied-nobias-relu": dict(dtype="float64", norm="post", untied=True, no_bias=True,
                                            activation="relu"),
    "float64-gelu_tanh-n_future_3": dict(dtype="float64", activation="gelu_tanh", n_future=3),
    "float64-flash-brier-temperature": dict(dtype="float64", attention="flash", loss="brier", temperature=0.7),
    "float32-base": dict(dtype="float32"),
    "float32-post-n_future_2": dict(dtype="float32", norm="post", n_future=2, batch=4, seq_len=12),
}


@pytest.mark.parametrize("label", list(NUMPY_CONFIGS))
def test_numpy_port_agrees(label, tmp_path):
    assert_agrees(PY, export_case(tmp_path / "case", **NUMPY_CONFIGS[label]))


@pytest.fixture(scope="module")
def float64_case(tmp_path_factory):
    return export_case(tmp_path_factory.mktemp("examples") / "case", dtype="float64")


# bug -> (first divergent tensor, layer, layer function); the side blamed is always the dump
NUMPY_BUGS = {
    "ln_backward_no_mean": ("grad.h.2.out", "ln_f", "layernorm_backward"),
    "wte_grad_transposed": ("grad.transformer.wte.weight", "lm_head", "unembed_backward"),
    "tied_grad_assigned": ("grad.transformer.wte.weight", "embed", "embedding_backward"),
    "ln_unbiased_var": ("h.0.ln_1.out", "h.0.ln_1", "layernorm_forward"),
    "attn_backward_no_scale": ("grad.h.2.attn.k", "h.2.attn", "attention_backward"),
    "mlp_fc_weight_grad_doubled": ("grad.transformer.h.2.mlp.c_fc.weight", "h.2.mlp", "mlp_backward"),
}


@pytest.mark.parametrize("bug", list(NUMPY_BUGS))
def test_numpy_port_bug_is_found(bug, float64_case, tmp_path):
    assert_bug_found(PY + ["--bug", bug], float64_case, tmp_path / f"{bug}.safetensors", NUMPY_BUGS[bug])


def test_numpy_port_declares_unknown_field_unsupported(tmp_path):
    case = with_config_field(export_case(tmp_path / "case", dtype="float64"), rope_theta=10000.0)
    assert_unsupported(PY, case, "rope_theta=10000.0")


def test_numpy_port_missing_case_is_one_clear_line(tmp_path):
    r = run_program(PY, tmp_path / "nowhere", tmp_path / "d.safetensors")
    assert r.returncode == 2 and "no checkpoint.safetensors" in r.stderr and "Traceback" not in r.stderr


def _load_port():
    spec = importlib.util.spec_from_file_location("numpy_port", PORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("over", [dict(), dict(bias=False, tie_embeddings=False, n_future=3)])
def test_numpy_port_layout_table_round_trips(over):
    """canonical -> own names ([out, in], split q/k/v) -> canonical is the identity, and the own
    names are really different (q/k/v are three [C, C] matrices, Linear weights are transposed)."""
    from manual import registry
    from manual.config import ModelConfig
    port = _load_port()
    cfg = ModelConfig.preset("tiny", dtype="float64", **over)
    params = registry.init_params(cfg, seed=3)
    own = port.to_own(params, cfg.to_dict())
    C = cfg.d_model
    assert own["blocks.0.attn.wq"].shape == (C, C)
    np.testing.assert_array_equal(own["blocks.1.attn.wk"], params["transformer.h.1.attn.c_attn.weight"][:, C:2 * C].T)
    np.testing.assert_array_equal(own["blocks.2.ffn.up.weight"], params["transformer.h.2.mlp.c_fc.weight"].T)
    back = port.to_canonical(own, cfg.to_dict(), params)
    assert sorted(back) == sorted(params)
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


# ================================================================================================
# examples/c

def c_compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


C_BUGS = {   # -DBUG=NAME -> (first divergent tensor, layer, layer function); the dump is blamed
    "LN_BACKWARD_NO_MEAN": ("grad.h.2.out", "ln_f", "layernorm_backward"),
    "WTE_GRAD_TRANSPOSED": ("grad.transformer.wte.weight", "lm_head", "unembed_backward"),
    "TIED_GRAD_ASSIGNED": ("grad.transformer.wte.weight", "embed", "embedding_backward"),
}


@pytest.fixture(scope="module")
def c_programs(tmp_path_factory):
    """{bug or "": path of the binary}, built here with the system C compiler."""
    cc = c_compiler()
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the C example cannot be built here")
    out = tmp_path_factory.mktemp("c_build")
    built = {}
    for bug in [""] + list(C_BUGS):
        exe = out / f"gpt{'_' + bug if bug else ''}"
        cmd = [cc, "-std=c99", "-O0", "-Wall", "-Wextra", f"-DBUG={bug or 0}", "-o", str(exe),
               str(C_DIR / "gpt.c"), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
        built[bug] = exe
    return built


C_CONFIGS = {
    "float64-base": dict(dtype="float64"),
    "float64-gelu_tanh-flash-temperature": dict(dtype="float64", activation="gelu_tanh", attention="flash",
                                                temperature=0.7),
    "float32-gelu_tanh": dict(dtype="float32", activation="gelu_tanh", batch=4, seq_len=12),
    "float32-T_max": dict(dtype="float32", batch=2, seq_len=20),
}


@pytest.mark.parametrize("label", list(C_CONFIGS))
def test_c_agrees(label, c_programs, tmp_path):
    assert_agrees([str(c_programs[""])], export_case(tmp_path / "case", **C_CONFIGS[label]))


C_UNSUPPORTED = {   # export flags -> the field the one line must name
    "post": (dict(norm="post"), "norm=post"),
    "relu": (dict(activation="relu"), "activation=relu"),
    "no_bias": (dict(no_bias=True), "bias=false"),
    "untied": (dict(untied=True), "tie_embeddings=false"),
    "n_future": (dict(n_future=2), "n_future=2"),
    "brier": (dict(loss="brier"), "loss=brier"),
}


@pytest.mark.parametrize("label", list(C_UNSUPPORTED))
def test_c_declares_unsupported(label, c_programs, tmp_path):
    flags, field = C_UNSUPPORTED[label]
    assert_unsupported([str(c_programs[""])], export_case(tmp_path / "case", dtype="float64", **flags), field)


def test_c_unknown_field_unsupported(c_programs, tmp_path):
    case = with_config_field(export_case(tmp_path / "case", dtype="float64"), rope_theta=10000.0)
    assert_unsupported([str(c_programs[""])], case, "rope_theta")


@pytest.mark.parametrize("bug", list(C_BUGS))
def test_c_bug_is_found(bug, c_programs, float64_case, tmp_path):
    assert_bug_found([str(c_programs[bug])], float64_case, tmp_path / f"{bug}.safetensors", C_BUGS[bug])


def test_c_is_memory_safe_under_sanitizers(c_programs, tmp_path):
    """AddressSanitizer + UBSan build (any report aborts): a float64 case, a float32 flash case, and a
    truncated checkpoint that must be rejected without an out-of-bounds read."""
    exe = tmp_path / "gpt-asan"
    cmd = [c_compiler(), "-std=c99", "-O0", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-o", str(exe), str(C_DIR / "gpt.c"), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"this compiler cannot build with -fsanitize=address,undefined: {r.stderr.strip()[-200:]}")
    for flags in (dict(dtype="float64"), dict(dtype="float32", attention="flash", activation="gelu_tanh")):
        case = export_case(tmp_path / flags["dtype"], **flags)
        run = run_program([str(exe)], case, case / "dump.safetensors")
        assert run.returncode == 0 and "Sanitizer" not in run.stderr, run.stderr[-2000:]
    ckpt = tmp_path / "float64" / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    run = run_program([str(exe)], tmp_path / "float64", tmp_path / "x.safetensors")
    assert run.returncode == 2 and "Sanitizer" not in run.stderr, run.stderr[-2000:]


def test_c_rejects_a_truncated_checkpoint(c_programs, tmp_path):
    case = export_case(tmp_path / "case", dtype="float64")
    ckpt = case / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    r = run_program([str(c_programs[""])], case, case / "dump.safetensors")
    assert r.returncode == 2 and "outside the data" in r.stderr, r.stderr


# ================================================================================================
# examples/numpy_port --steps N: training, against the reference's optimizer trajectory

def write_train_files(case: Path, steps: int, kind: str) -> list:
    """CASE/train/ as the outside-program harness writes it (ids.npy, targets.npy (N, B, T), optimizer.json)."""
    from conformance.engine import make_batch
    from conformance.trajectory import OPTIMIZERS
    from manual import registry
    from manual.checkpoint import load_model
    cfg = load_model(case / "checkpoint.safetensors")[0]
    B, T = np.load(case / "ids.npy").shape
    batches = [make_batch(cfg, B, T, seed=100 + s) for s in range(steps)]
    hp, clip = OPTIMIZERS[kind]
    (case / "train").mkdir()
    np.save(case / "train" / "ids.npy", np.stack([i for i, _ in batches]))
    np.save(case / "train" / "targets.npy", np.stack([t for _, t in batches]))
    decay = registry.decay_groups(cfg, hp["weight_decay"])[0]["names"]
    (case / "train" / "optimizer.json").write_text(json.dumps(
        {"kind": kind, **hp, "clip_grad_norm": clip, "decay": decay, "steps": steps}))
    return batches


def reference_training(case: Path, batches: list, kind: str):
    """The reference (PyTorch) trained on `batches`: (losses, {canonical name: final parameter})."""
    import reference
    from conformance.trajectory import OPTIMIZERS
    from manual.checkpoint import load_model
    from reference import optim as ropt
    cfg, params, _extras, _meta = load_model(case / "checkpoint.safetensors")
    hp, clip = OPTIMIZERS[kind]
    r = reference.Model.from_params(cfg, params)
    opt = ropt.make_optimizer(r, kind=kind, **hp)
    losses = []
    for ids, targets in batches:
        r.zero_grad()
        losses.append(float(r.forward(ids, targets)))
        r.backward()
        if clip is not None:
            ropt.clip_grad_norm(r, clip)
        opt.step()
    return np.asarray(losses, dtype=cfg.dtype), r.params


@pytest.mark.parametrize("kind,dtype,bug", [("sgd", "float64", None), ("adamw", "float64", None),
                                            ("sgd", "float64", "ln_backward_no_mean")])
def test_numpy_port_trains_like_the_reference(kind, dtype, bug, tmp_path):
    from conformance.compare import compare
    case = export_case(tmp_path / "case", dtype=dtype)
    batches = write_train_files(case, 4, kind)
    out = tmp_path / "train.safetensors"
    r = run_program(PY + ["--steps", "4"] + (["--bug", bug] if bug else []), case, out)
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file
    got = load_file(str(out))
    want_losses, want_params = reference_training(case, batches, kind)
    assert sorted(got) == sorted(list(want_params) + ["losses"])
    rows = [compare(got["losses"], want_losses, tensor="losses", check="optimizer", expect_dtype=dtype)]
    rows += [compare(got[n], want_params[n], tensor=n, check="optimizer", expect_dtype=dtype) for n in want_params]
    failed = [c.tensor for c in rows if not c.passed]
    if bug is None:
        assert not failed, [c for c in rows if not c.passed][:3]
    else:   # a backward bug: the first loss (before any update) is right, the later ones and the parameters not
        assert abs(got["losses"][0] - want_losses[0]) <= 1e-9 * abs(want_losses[0])
        assert "losses" in failed and len(failed) > 1, failed
