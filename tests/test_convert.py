"""tools/convert.py: every direction, every refusal, every error message; nothing written on failure."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from manual import formats
from manual.checkpoint import load_model, save_model
from manual.config import ModelConfig
from manual.registry import init_params
from tools import convert

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=50, max_seq_len=8, d_model=16, n_heads=2, d_ff=64, n_layers=2,
                  activation="gelu_tanh", pad_id=49)
NANO = CFG.replace(activation="gelu")


def params_of(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in init_params(cfg, seed).items()}


def ours(tmp_path, cfg=CFG, name="ours.safetensors"):
    path = tmp_path / name
    save_model(path, cfg, params_of(cfg))
    return path


def cli(capsys, *argv):
    code = convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("fmt, cfg, out", [("hf", CFG, "gpt2"), ("nanogpt", NANO, "ckpt.safetensors"),
                                           ("llmc", CFG, "gpt2_tiny.bin")])
def test_ours_to_format_and_back_is_bit_exact_both_ways(tmp_path, capsys, fmt, cfg, out):
    src = ours(tmp_path, cfg)
    code, text, err = cli(capsys, "--to", fmt, "--checkpoint", src, "--out", tmp_path / out)
    assert code == 0 and err == "" and text.startswith(f"wrote {tmp_path / out}: ours -> {fmt}")
    code, text, err = cli(capsys, "--from", fmt, tmp_path / out, "--out", tmp_path / "back.safetensors")
    assert code == 0 and err == "", err
    cfg1, p1, _, _ = load_model(src)
    cfg2, p2, _, meta = load_model(tmp_path / "back.safetensors")
    assert cfg2 == cfg1 and meta["converted_from"] == f"{fmt} {tmp_path / out}"
    assert all(np.array_equal(p1[k], p2[k]) and p1[k].dtype == p2[k].dtype for k in p1)
    code, _, _ = cli(capsys, "--to", fmt, "--checkpoint", tmp_path / "back.safetensors", "--out", tmp_path / "again")
    assert code == 0
    first, second = tmp_path / out, tmp_path / "again"
    if fmt == "hf":
        assert snapshot(first) == snapshot(second)
    else:
        assert first.read_bytes() == second.read_bytes()                     # X -> ours -> X: same bytes


def test_from_llmc_in_float64_and_bfloat16_are_reported(tmp_path, capsys):
    p = {k: (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for k, v in params_of(CFG).items()}
    formats.write_llmc(tmp_path / "b.bin", CFG, p, dtype="bfloat16")
    code, text, _ = cli(capsys, "--from", "llmc", tmp_path / "b.bin", "--out", tmp_path / "o.safetensors",
                        "--dtype", "float64")
    assert code == 0
    assert "version 5 holds bfloat16; widened exactly to float32" in text and "widened exactly to float64" in text
    cfg, p2, _, meta = load_model(tmp_path / "o.safetensors")
    assert cfg.dtype == "float64" and "bfloat16" in meta["conversion_notes"]
    assert all(np.array_equal(p2[k], p[k].astype(np.float64)) for k in p)


@pytest.mark.parametrize("fmt, change, text", [
    ("llmc", dict(norm="post"), "norm = 'post'"),
    ("llmc", dict(d_ff=32), "d_ff = 32"),
    ("llmc", dict(tie_embeddings=False), "tie_embeddings = False"),
    ("llmc", dict(n_future=2), "n_future = 2"),
    ("hf", dict(n_future=2), "n_future = 2"),
    ("nanogpt", dict(n_future=2, activation="gelu"), "n_future = 2"),
    ("llmc-state", dict(norm="post"), "norm = 'post'"),
])
def test_refusals_name_the_field_and_write_nothing(tmp_path, capsys, fmt, change, text):
    src = ours(tmp_path, CFG.replace(**change))
    out = tmp_path / ("old" if fmt != "hf" else "olddir")
    if fmt == "hf":
        out.mkdir()
        (out / "config.json").write_text("previous")
    else:
        out.write_bytes(b"previous")
    before = snapshot(tmp_path)
    extra = ["--ids", tmp_path / "i.npy", "--targets", tmp_path / "i.npy"] if fmt == "llmc-state" else []
    code, stdout, err = cli(capsys, "--to", fmt, "--checkpoint", src, "--out", out, *extra)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and text in err and "cannot hold this config" in err
    assert snapshot(tmp_path) == before                                       # nothing written, --out survives


def test_pickle_files_are_refused_unopened_with_the_safe_conversion(tmp_path, capsys):
    for name in ("ckpt.pt", "model.pth", "last.ckpt"):
        code, _, err = cli(capsys, "--from", "nanogpt", tmp_path / name, "--out", tmp_path / "o.safetensors")
        # the file does not even exist: it was refused by its name, never opened
        assert code == 2 and "refused unopened" in err and not (tmp_path / "o.safetensors").exists()
        assert 'torch.load("' in err and "weights_only=True" in err and "safetensors.torch.save_file(" in err
        assert err.count("\n") == 3                                          # the error + the two lines
    code, _, err = cli(capsys, "--to", "llmc", "--checkpoint", tmp_path / "x.pt", "--out", tmp_path / "o.bin")
    assert code == 2 and "refused unopened" in err


def bad_llmc(tmp_path, edit):
    formats.write_llmc(tmp_path / "m.bin", CFG, params_of(CFG))
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "bad.bin").write_bytes(edit(data))
    return tmp_path / "bad.bin"


@pytest.mark.parametrize("make, message", [
    (lambda t: t / "missing.bin", "missing.bin: no such llm.c model file"),
    (lambda t: bad_llmc(t, lambda b: np.int32(1).tobytes() + b[4:]), "bad.bin: offset 0 (magic): found 1, expected 20240326"),
    (lambda t: bad_llmc(t, lambda b: b[:4] + np.int32(9).tobytes() + b[8:]), "bad.bin: offset 4 (version): found 9, expected 3 or 5"),
    (lambda t: bad_llmc(t, lambda b: b[:2000]), "bad.bin: truncated: file has 2000 bytes, expected 36096"),
    (lambda t: bad_llmc(t, lambda b: b + b"x"), "bad.bin: size mismatch: file has 36097 bytes, expected 36096"),
])
def test_bad_llmc_input_is_one_line_and_out_survives(tmp_path, capsys, make, message):
    src = make(tmp_path)
    (tmp_path / "o.safetensors").write_bytes(b"previous")
    code, out, err = cli(capsys, "--from", "llmc", src, "--out", tmp_path / "o.safetensors")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert (tmp_path / "o.safetensors").read_bytes() == b"previous"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("argv, message", [
    (["--from", "onnx", "x", "--out", "o.safetensors"], "--from onnx: unknown format; expected one of hf, nanogpt, llmc"),
    (["--to", "gguf", "--checkpoint", "c", "--out", "o"], "--to gguf: unknown format"),
    (["--to", "llmc", "--out", "o"], "--to llmc needs --checkpoint"),
    (["--to", "llmc", "--checkpoint", "none.safetensors", "--out", "o"], "none.safetensors: no such checkpoint file"),
    (["--from", "hf", "nodir", "--out", "o.safetensors"], "nodir: no such directory"),
    (["--from", "nanogpt", "none.safetensors", "--out", "o.safetensors"], "none.safetensors: no such safetensors file"),
    (["--out", "o"], "one of the arguments --from --to is required"),
    (["--from", "llmc", "x", "--to", "hf", "--out", "o"], "not allowed with argument"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_is_not_ours_is_one_line(tmp_path, capsys):
    formats.write_nanogpt(tmp_path / "n.safetensors", NANO, params_of(NANO))
    code, _, err = cli(capsys, "--to", "llmc", "--checkpoint", tmp_path / "n.safetensors", "--out", tmp_path / "o.bin")
    assert code == 2 and err.count("\n") == 1 and "has format None, expected 'transformer-conformance'" in err


def test_llmc_state_from_both_implementations(tmp_path, capsys):
    src = ours(tmp_path)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ids.npy", rng.integers(0, 50, (3, 7)))
    np.save(tmp_path / "targets.npy", rng.integers(0, 49, (3, 7)))          # no PAD (49)
    states = {}
    for impl in ("manual", "reference"):
        code, text, err = cli(capsys, "--to", "llmc-state", "--checkpoint", src, "--ids", tmp_path / "ids.npy",
                              "--targets", tmp_path / "targets.npy", "--out", tmp_path / f"{impl}.bin", "--impl", impl)
        assert code == 0 and err == "" and f"from {impl}, B 3, T 7" in text
        states[impl] = formats.read_llmc_state(tmp_path / f"{impl}.bin", CFG)
    m, r = states["manual"], states["reference"]
    import manual
    model = manual.Model.from_params(CFG, params_of(CFG))
    loss = model.forward(np.load(tmp_path / "ids.npy"), np.load(tmp_path / "targets.npy"))
    model.backward()
    assert m.loss == np.float32(loss) and np.array_equal(m.logits, model.logits)
    assert all(np.array_equal(m.grads[k], model.grads[k]) for k in model.grads)
    assert abs(m.loss - r.loss) <= 1e-5 + 1.3e-6 * abs(r.loss)
    assert np.allclose(m.logits, r.logits, rtol=1.3e-6, atol=1e-5)
    assert all(np.allclose(m.grads[k], r.grads[k], rtol=1.3e-6, atol=1e-5) for k in m.grads)


def test_llmc_state_refuses_pad_targets_and_bad_arrays(tmp_path, capsys):
    src = ours(tmp_path)
    np.save(tmp_path / "ids.npy", np.zeros((2, 4), np.int64))
    t = np.zeros((2, 4), np.int64)
    t[1, 2] = 49
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "f.npy", np.zeros((2, 4)))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    base = ["--to", "llmc-state", "--checkpoint", src, "--out", tmp_path / "s.bin", "--ids", tmp_path / "ids.npy"]
    for targets, message in (("t.npy", "hold pad_id 49 at (1, 2) (1 in all): llm.c's loss counts every target"),
                             ("f.npy", "must be a 2-D (B, T) integer array, found dtype float64"),
                             ("obj.npy", "not a readable .npy array"),
                             ("none.npy", "none.npy: no such file (--targets)")):
        code, _, err = cli(capsys, *base, "--targets", tmp_path / targets)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s.bin").exists()


def test_command_line_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), "--from", "llmc",
                           str(tmp_path / "none.bin"), "--out", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"convert.py: error: {tmp_path / 'none.bin'}: no such llm.c model file\n"


def test_llmc_state_from_a_float64_checkpoint_is_stored_as_float32(tmp_path, capsys):
    cfg = CFG.replace(dtype="float64")
    src = ours(tmp_path, cfg)
    np.save(tmp_path / "ids.npy", np.arange(6).reshape(2, 3))
    np.save(tmp_path / "t.npy", np.arange(6).reshape(2, 3) + 1)
    code, text, _ = cli(capsys, "--to", "llmc-state", "--checkpoint", src, "--ids", tmp_path / "ids.npy",
                        "--targets", tmp_path / "t.npy", "--out", tmp_path / "s.bin")
    assert code == 0 and "computed in float64, stored as float32" in text
    state = formats.read_llmc_state(tmp_path / "s.bin", cfg)
    import manual
    model = manual.Model.from_params(cfg, params_of(cfg))
    loss = model.forward(np.load(tmp_path / "ids.npy"), np.load(tmp_path / "t.npy"))
    model.backward()
    assert state.loss == np.float32(loss)
    assert all(np.array_equal(state.grads[k], model.grads[k].astype(np.float32)) for k in model.grads)


def test_an_out_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    formats.write_llmc(tmp_path / "m.bin", CFG, params_of(CFG))
    code, _, err = cli(capsys, "--from", "llmc", tmp_path / "m.bin", "--out", tmp_path / "no" / "o.safetensors")
    assert code == 2 and err.count("\n") == 1 and "folder" in err and "does not exist" in err
    code, _, err = cli(capsys, "--from", "llmc", tmp_path / "m.bin", "--out", tmp_path / "o.bin")
    assert code == 2 and "our checkpoints are .safetensors files" in err
    code, _, err = cli(capsys, "--to", "llmc", "--checkpoint", ours(tmp_path), "--out", tmp_path / "no" / "m.bin")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
