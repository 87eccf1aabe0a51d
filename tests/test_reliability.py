"""Reliability (issue 13): no silent wrong numbers, no lost runs, no tracebacks, the same errors from both sides.

One test per case of the issue, grouped by class, and per class one hypothesis test drawing hostile
inputs (configs, checkpoint headers and metadata, command-line arguments) that asserts that only the
documented errors come out. The SIGKILL resume test runs in CI (about 10 s).
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import manual
import reference
from manual import checkpoint as mck
from manual.checkpoint import CheckpointError, load_model, load_tensors, model_metadata, save_tensors
from manual.checks import CallOrderError, NonFiniteError
from manual.config import ModelConfig
from manual.trainer import NonFinite, Trainer, TrainState
from tools import _cli, memprof, sample, train

ROOT = Path(__file__).resolve().parents[1]
IMPLS = [manual.Model, reference.Model]
FAST = ["--synthetic", "3000", "--batch-size", "4", "--eval-windows", "16", "--quiet",
        "--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--n-layers", "1"]
HSET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig.preset("tiny", **{"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1,
                                         "vocab_size": 20, "max_seq_len": 8, **kw})


def one_line_error(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def rewrite(src: Path, dst: Path, tensors=None, **meta_changes) -> Path:
    """A copy of checkpoint `src` with metadata entries replaced (None deletes one)."""
    t, meta = load_tensors(src)
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_tensors(dst, tensors if tensors is not None else t, meta)
    return dst


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training checkpoint of tools/train.py (4 steps), shared by the tests that tamper with it."""
    out = tmp_path_factory.mktemp("run")
    assert train.main(FAST + ["--max-steps", "4", "--eval-every", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir):
    return run_dir / train.CHECKPOINT_NAME


# ================================================================================================
# silent wrong numbers

def test_checkpoint_config_missing_fields_is_an_error_listing_them_all(ckpt, tmp_path):
    cfg, *_ = load_model(ckpt)
    d = cfg.to_dict()
    for name in ("activation", "norm", "ln_eps", "temperature"):
        del d[name]
    bad = rewrite(ckpt, tmp_path / "m.safetensors", config=json.dumps(d))
    with pytest.raises(CheckpointError, match=r"lacks field\(s\) \['norm', 'activation', 'ln_eps', 'temperature'\]"):
        load_model(bad)
    # built in code, defaults are still fine
    assert ModelConfig.from_dict({"vocab_size": 10}).activation == "gelu"


@pytest.mark.parametrize("Model", IMPLS)
def test_nonfinite_weights_are_refused_unless_asked(Model, tmp_path):
    cfg = small_cfg()
    params = manual.Model(cfg).params
    params["transformer.h.0.mlp.c_fc.weight"][2, 3] = np.inf
    save_tensors(tmp_path / "nan.safetensors", params, model_metadata(cfg))
    with pytest.raises(CheckpointError, match=r"transformer.h.0.mlp.c_fc.weight holds 1 non-finite value\(s\), "
                                              r"the first at \(2, 3\) \(inf\).*allow_nonfinite=True"):
        Model.load(tmp_path / "nan.safetensors")
    _cfg, p, _e, _m = load_model(tmp_path / "nan.safetensors", allow_nonfinite=True)
    assert np.isinf(p["transformer.h.0.mlp.c_fc.weight"][2, 3])


def test_resume_from_nonfinite_checkpoint_is_refused(ckpt, tmp_path, capsys):
    t, meta = load_tensors(ckpt)
    t["transformer.wpe.weight"] = t["transformer.wpe.weight"].copy()
    t["transformer.wpe.weight"][0, 0] = np.nan
    bad = tmp_path / "bad"
    bad.mkdir()
    save_tensors(bad / train.CHECKPOINT_NAME, t, meta)
    assert train.main(["--resume", str(bad), "--quiet"]) == 2
    line = one_line_error(capsys.readouterr().err, "train.py")
    assert "refusing to load non-finite weights" in line and "last good" not in line
    # the trainer itself never calls a non-finite checkpoint "the last good checkpoint"
    cfg, params, extras, meta = load_model(bad / train.CHECKPOINT_NAME, allow_nonfinite=True)
    model = manual.Model.from_params(cfg, params)
    from manual.optim import AdamW
    from manual.data import Batches
    x = np.ones((8, cfg.max_seq_len), np.int64)
    trainer = Trainer(model, AdamW(model.params, model.grads), Batches(x, x, batch_size=4, seed=0),
                      total_steps=10, lr=1e-3)
    with pytest.raises(ValueError, match=r"cannot resume from .*transformer.wpe.weight holds 1 non-finite"):
        trainer.restore(extras, meta, path=bad / train.CHECKPOINT_NAME)
    assert trainer.last_checkpoint is None


@pytest.mark.parametrize("gen", ["manual", "reference"])
def test_sampling_refuses_nonfinite_logits_and_draws(gen):
    cfg = small_cfg()
    params = manual.Model(cfg).params
    params["transformer.ln_f.weight"][:] = np.nan
    if gen == "manual":
        from manual.sampling import generate
        model = manual.Model.from_params(cfg, params)
    else:
        from reference.sampling import generate
        model = reference.Model.from_params(cfg, params)
    for temperature in (0, 1.0):
        with pytest.raises(NonFiniteError, match=r"logits for new token 0 hold 20 non-finite"):
            generate(model, [1, 2], 3, temperature=temperature)
    good = (manual.Model if gen == "manual" else reference.Model)(cfg)
    with pytest.raises(NonFiniteError, match=r"uniform draw 1 is nan"):
        generate(good, [1, 2], 3, uniforms=np.array([0.5, np.nan, 0.2]))
    with pytest.raises(NonFiniteError, match=r"uniform draw 0 is 1.0"):
        generate(good, [1, 2], 1, uniforms=np.array([1.0]))


def test_tiny_temperature_samples_the_argmax_on_both_sides():
    from manual.sampling import sample_next as m_next
    from reference.sampling import sample_next as r_next
    import torch
    logits = np.array([0.5, 3.0, -1.0, 2.9], np.float32)
    for t in (1e-320, 5e-324, 1e-300):
        for u in (0.0, 0.5, 0.999):
            assert m_next(logits, t, None, u) == r_next(torch.from_numpy(logits), t, None, u) == 1


@pytest.mark.parametrize("value", [
    "model.params[name] = new", "model.params.update({name: new})"])
@pytest.mark.parametrize("Model", IMPLS)
def test_rebinding_a_parameter_is_honoured_on_both_sides(Model, value):
    cfg = small_cfg(dtype="float64")
    model, name = Model(cfg, 1), "transformer.ln_f.weight"
    ids = np.array([[1, 2, 3, 4]])
    before = model.forward(ids, ids)
    new = np.full(cfg.d_model, 2.0)
    exec(value, {}, {"model": model, "name": name, "new": new})     # noqa: S102 - the two spellings, as written
    np.testing.assert_array_equal(model.params[name], new)
    after = model.forward(ids, ids)
    assert after != before
    assert after == manual.Model.from_params(cfg, {**manual.Model(cfg, 1).params, name: new}).forward(ids, ids)


@pytest.mark.parametrize("Model", IMPLS)
def test_rebinding_a_parameter_with_a_wrong_shape_is_a_valueerror_on_both_sides(Model):
    cfg = small_cfg()
    model = Model(cfg)
    ids = np.array([[1, 2]])
    with pytest.raises(ValueError, match=r"transformer.ln_f.weight: shape \(17,\), expected \(16,\)"):
        model.params["transformer.ln_f.weight"] = np.ones(17, np.float32)
        model.forward(ids, ids)          # manual checks at the next forward, the reference at once


@pytest.mark.parametrize("field", ["ln_eps", "temperature"])
@pytest.mark.parametrize("value", [1e-40, 1e-300, 5e-324, 1e39])
def test_float32_underflowing_config_values_are_refused(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field} {value!r} is not a normal float32 number")):
        ModelConfig.preset("tiny", **{field: value})
    if value == 1e-40:     # a normal float64 number: fine in a float64 model
        assert getattr(ModelConfig.preset("tiny", dtype="float64", **{field: value}), field) == value


def test_resume_without_threads_restores_the_runs_thread_count(tmp_path, capsys, monkeypatch):
    """In process: which count each session applies (the SIGKILL test below runs real processes)."""
    applied = []
    monkeypatch.setattr(train, "_limit_threads", applied.append)     # keep this pytest process as it is
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    out = tmp_path / "t"
    assert train.main(FAST + ["--max-steps", "4", "--stop-at", "2", "--threads", "2", "--out", str(out),
                              "--json", str(tmp_path / "a.json")]) == 0
    assert train.main(["--resume", str(out), "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["args"]["threads"] == 2
    assert "warning" not in capsys.readouterr().err
    assert train.main(["--resume", str(out), "--threads", "1", "--max-steps", "6",
                       "--json", str(tmp_path / "c.json")]) == 0
    err = capsys.readouterr().err
    assert "this session uses --threads 1, the run was started with --threads 2" in err
    assert applied == [2, 2, 1]


# ================================================================================================
# lost work

def test_huge_finite_loss_does_not_crash_the_log_line(capsys):
    cfg = small_cfg()
    for quiet in (True, False):
        args = train.build_parser().parse_args(["--quiet"] if quiet else [])
        log = train._Log(args, 10, cfg)

        class T:
            tokens_per_s = 0.0
        log.on_eval(T(), 3, 1e30)
    assert "perplexity      inf" in capsys.readouterr().out
    assert train.perplexity(1e30) is None and train.perplexity(0.0) == 1.0


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path):
    cfg = small_cfg()
    from manual.data import Batches
    from manual.optim import AdamW
    model = manual.Model(cfg)
    x = np.ones((8, cfg.max_seq_len), np.int64)
    path = tmp_path / "c.safetensors"
    trainer = Trainer(model, AdamW(model.params, model.grads), Batches(x, x, batch_size=4, seed=0), x, x,
                      total_steps=3, lr=1e-3, checkpoint_path=path)
    real = trainer.evaluate

    def failing_evaluate():
        if trainer.state.step == 3:
            raise NonFinite("validation loss is inf after step 3")
        return real()
    trainer.evaluate = failing_evaluate
    result = trainer.run()
    assert result.stopped == "non-finite"
    assert "the last good checkpoint" in result.message and "(step 3)" in result.message
    assert json.loads(load_tensors(path)[1]["train_state"])["step"] == 3


def test_unwritable_out_is_found_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    t0 = time.perf_counter()
    assert train.main(FAST + ["--max-steps", "500", "--out", str(tmp_path / "file" / "run")]) == 2
    line = one_line_error(capsys.readouterr().err, "train.py")
    assert "--out" in line and "Not a directory" in line
    assert time.perf_counter() - t0 < 5


def test_a_failed_save_leaves_no_temp_file_and_stale_ones_are_removed(tmp_path, monkeypatch):
    cfg = small_cfg()
    model = manual.Model(cfg)
    path = tmp_path / "m.safetensors"
    stale = tmp_path / ".m.safetensors.abc123.tmp"
    stale.write_bytes(b"left by a killed save")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".m.safetensors.def456.tmp"          # maybe another save in progress: kept
    fresh.write_bytes(b"in progress")

    def boom(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mck.os, "fsync", boom)
    with pytest.raises(OSError, match="No space left"):
        model.save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name]      # no new temp, the stale one gone
    model.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, path.name])


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_umasks_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        manual.Model(small_cfg()).save(tmp_path / "m.safetensors")
        _cli.write_output(tmp_path / "s.json", "{}")
    finally:
        os.umask(old)
    for name in ("m.safetensors", "s.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_sigkill_then_resume_with_another_thread_count_is_documented(tmp_path):
    """A run started with --threads 2 is SIGKILLed during training and resumed with `--resume DIR`
    alone: the run's thread count is restored (documented in tools/train.py) and the final weights
    equal the uninterrupted --threads 2 run's, bit for bit."""
    args = FAST + ["--max-steps", "60", "--save-every", "1", "--eval-every", "0", "--threads", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run([sys.executable, str(ROOT / "tools/train.py"), *args, "--out", str(full)], env=env, check=True,
                   timeout=60)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools/train.py"), *args, "--out", str(part)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = part / train.CHECKPOINT_NAME
    deadline = time.time() + 60
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = int(load_tensors(ck)[1]["step"])
        except (CheckpointError, KeyError, ValueError):
            step = 0
        if step >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= step < 60, step
    js = tmp_path / "resumed.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--resume", str(part), "--json", str(js)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    assert json.loads(js.read_text())["args"]["threads"] == 2
    a, b = load_tensors(full / train.CHECKPOINT_NAME)[0], load_tensors(ck)[0]
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ================================================================================================
# denial of service from a tiny file

def test_huge_n_layers_is_refused_before_anything_is_allocated(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"implies .* bytes .* over the limit manual.config.MAX_PARAM_BYTES"):
        small_cfg(n_layers=10**9)
    cfg, *_ = load_model(ckpt)
    bad = rewrite(ckpt, tmp_path / "h.safetensors", config=cfg.replace(n_layers=10**6).to_json())
    assert bad.stat().st_size < 2**20
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"the config implies 12,000,004 parameter tensors .* the file holds 16 tensors"):
        load_model(bad)
    assert time.perf_counter() - t0 < 1.0


def test_train_huge_max_seq_len_is_refused_before_allocating(capsys, tmp_path):
    t0 = time.perf_counter()
    assert train.main(["--max-seq-len", "100000", "--synthetic", "3000", "--quiet", "--out", str(tmp_path)]) == 2
    line = one_line_error(capsys.readouterr().err, "train.py")
    assert re.search(r"needs an estimated [\d,.]+ GiB \(max_seq_len 100000", line)
    assert time.perf_counter() - t0 < 10


def test_memprof_max_gb_nan_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        memprof.main(["--max-gb", "nan"])
    assert e.value.code == 2
    assert "argument --max-gb: must be a finite number > 0, got nan" in capsys.readouterr().err


# ================================================================================================
# tracebacks from the command-line tools

def _unwritable_folder(tmp_path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").write_text("x")       # root writes anyway: use a folder nobody can write in
        return Path("/sys")
    except OSError:
        return folder


@pytest.mark.parametrize("tool,argv,flag", [
    (train, FAST + ["--max-steps", "1"], "--json"),
    (train, FAST + ["--max-steps", "1"], "--plot"),
    (train, FAST + ["--max-steps", "1"], "--out"),
    (memprof, ["--dry-run"], "--json"),
    (memprof, ["--dry-run"], "--plot"),
])
@pytest.mark.parametrize("kind", ["unwritable", "directory", "under_a_file", "missing_parent"])
def test_every_output_path_is_checked_first_one_line_exit_2(tool, argv, flag, kind, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = {"unwritable": _unwritable_folder(tmp_path) / "x.out",
              "directory": tmp_path,
              "under_a_file": tmp_path / "file" / "x.out",
              "missing_parent": tmp_path / "no" / "such" / "x.out"}[kind]
    if flag == "--out" and kind in ("directory", "missing_parent"):
        target = tmp_path / "file"                # --out is a folder: a file is the bad case (parents are made)
    extra = ["--out", str(tmp_path / "run")] if tool is train and flag != "--out" else []
    prog = "train.py" if tool is train else "memprof.py"
    assert tool.main(argv + extra + [flag, str(target)]) == 2
    line = one_line_error(capsys.readouterr().err, prog)
    assert flag in line and str(target) in line
    assert not (tmp_path / "run" / train.CHECKPOINT_NAME).exists()      # nothing was trained


def test_output_path_error_as_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), *FAST, "--json", str(tmp_path)],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert one_line_error(r.stderr, "train.py").endswith("is a folder; give a file name")


@pytest.mark.parametrize("change,message", [
    ({"train_args": "{not json"}, "train_args is not valid JSON"),
    ({"train_args": "[1, 2]"}, "train_args JSON must be an object, got list"),
    ({"train_args": json.dumps({"lr": "fast"})}, "train_args holds values this tool does not accept: lr='fast'"),
    ({"train_args": json.dumps({"batch_size": -3})}, "batch_size=-3"),
    ({"train_args": json.dumps({"impl": "jax"})}, "impl='jax'"),
    ({"train_state": json.dumps({"version": 1, "step": -1, "train_loss": []})}, "step must be an int >= 0, got -1"),
    ({"train_state": json.dumps({"version": 1, "step": 0, "batch": 1.5})}, "batch must be an int >= 0, got 1.5"),
    ({"train_state": "[" * 50000 + "]" * 50000}, "train_state JSON is nested too deeply"),
    ({"optimizer": "{"}, "optimizer metadata is not valid JSON"),
    ({"config": "[" * 50000 + "]" * 50000}, "config JSON is nested too deeply"),
    ({"tokenizer": "[" * 50000 + "]" * 50000}, "tokenizer JSON does not parse: nested too deeply"),
    ({"tokenizer": json.dumps({"kind": "char", "version": 1, "specials": ["<pad>", "<unk>", "<bos>", "<eos>"]})},
     "tokenizer JSON needs a list 'tokens'"),
])
def test_tampered_metadata_is_one_clear_error(ckpt, tmp_path, capsys, change, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    rewrite(ckpt, bad / train.CHECKPOINT_NAME, **change)
    assert train.main(["--resume", str(bad), "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert message in one_line_error(capsys.readouterr().err, "train.py")
    if "train_args" not in change and "train_state" not in change and "optimizer" not in change:
        assert sample.main([str(bad), "--max-new-tokens", "2"]) == 2
        assert message in one_line_error(capsys.readouterr().err, "sample.py")


def test_truncated_unreadable_and_bf16_files_are_one_line(ckpt, tmp_path, capsys):
    data = ckpt.read_bytes()
    cases = {"truncated.safetensors": data[: len(data) // 2], "short.safetensors": data[:5],
             "garbage.safetensors": b"\xff" * 64}
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
    import torch
    from safetensors.torch import save_file
    t, meta = load_tensors(ckpt)
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in t.items()}, str(tmp_path / "bf16.safetensors"),
              metadata=meta)
    for name, needle in [("truncated.safetensors", "not a readable safetensors file"),
                         ("short.safetensors", "shorter than the 8-byte header"),
                         ("garbage.safetensors", "not a readable safetensors file"),
                         ("bf16.safetensors", "dtype BF16, which NumPy cannot represent; widen them to float32")]:
        assert sample.main([str(tmp_path / name)]) == 2
        assert needle in one_line_error(capsys.readouterr().err, "sample.py")
    if os.geteuid() != 0:
        unreadable = tmp_path / "unreadable.safetensors"
        unreadable.write_bytes(data)
        unreadable.chmod(0)
        assert sample.main([str(unreadable)]) == 2
        assert "cannot read checkpoint" in one_line_error(capsys.readouterr().err, "sample.py")


def test_sample_nonfinite_checkpoint_and_tiny_temperature(ckpt, tmp_path, capsys):
    t, meta = load_tensors(ckpt)
    t["transformer.wte.weight"] = t["transformer.wte.weight"].copy()
    t["transformer.wte.weight"][:] = np.nan
    save_tensors(tmp_path / "nan.safetensors", t, meta)
    assert sample.main([str(tmp_path / "nan.safetensors")]) == 2
    assert "non-finite" in one_line_error(capsys.readouterr().err, "sample.py")
    outs = []
    for impl in ("manual", "reference"):
        for temp in ("0", "1e-320"):
            assert sample.main([str(ckpt), "--temperature", temp, "--max-new-tokens", "15", "--impl", impl]) == 0
            outs.append(capsys.readouterr().out)
    assert len(set(outs)) == 1 and len(outs[0]) > len("The ")


def test_broken_pipe_is_quiet(ckpt):
    p = subprocess.Popen([sys.executable, str(ROOT / "tools/sample.py"), str(ckpt), "--max-new-tokens", "50",
                          "--prompt", "the "],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                     # `... | head` that has read nothing
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=60) == 141 and err == "", err


def test_a_bug_still_shows_its_traceback(capsys):
    @_cli.cli("x.py")
    def main(argv=None):
        return {}["missing"]

    @_cli.cli("x.py")
    def bad_input(argv=None):
        raise ValueError("line one\nline two")
    assert main() == 1
    err = capsys.readouterr().err
    assert err.startswith(f"x.py: internal error: {_cli.BUG_LINE}\n") and "Traceback" in err and "KeyError" in err
    assert bad_input() == 2
    assert capsys.readouterr().err == "x.py: error: line one | line two\n"


# ================================================================================================
# the two sides agree on errors

@pytest.mark.parametrize("Model", IMPLS)
def test_backward_before_forward_is_the_same_error(Model):
    model = Model(small_cfg())
    with pytest.raises(CallOrderError, match="backward\\(\\) called before forward\\(\\)"):
        model.backward()
    model.forward(np.array([[1, 2]]))
    with pytest.raises(CallOrderError, match="targets=None"):
        model.backward()
    assert issubclass(CallOrderError, RuntimeError) and issubclass(CallOrderError, ValueError)


@pytest.mark.parametrize("Model", IMPLS)
@pytest.mark.parametrize("args,message", [
    ((None, {}), "cfg must be a ModelConfig, got NoneType"),
    (("tiny", {}), "cfg must be a ModelConfig, got str"),
    ((small_cfg(), None), "params must be a mapping"),
    ((small_cfg(), [1, 2]), "params must be a mapping"),
    ((small_cfg(), {"transformer.wte.weight": [[1.0]]}), "params must map str names to NumPy arrays"),
])
def test_bad_from_params_arguments_are_the_same_typeerror(Model, args, message):
    with pytest.raises(TypeError, match=message):
        Model.from_params(*args)


@pytest.mark.parametrize("dtype", [np.dtype("float32"), np.float64, np.dtype("float64")])
def test_numpy_dtype_objects_behave_as_their_names_on_both_sides(dtype, tmp_path):
    cfg = small_cfg(dtype=dtype)
    assert cfg == small_cfg(dtype=np.dtype(dtype).name) and isinstance(cfg.dtype, str)
    for Model in IMPLS:
        Model(cfg).save(tmp_path / "m.safetensors")
        assert load_model(tmp_path / "m.safetensors")[0] == cfg


def test_debug_forward_names_the_first_nonfinite_tap():
    cfg = small_cfg()
    params = manual.Model(cfg).params
    params["transformer.h.0.ln_2.weight"][0] = np.inf
    model = manual.Model.from_params(cfg, params, debug=True)
    with pytest.raises(manual.model.DebugCheckError, match=r"after forward, tap h.0.ln_2.out contains"), \
            np.errstate(all="ignore"):
        model.forward(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))


@pytest.mark.parametrize("save_every,expected", [
    (0, r"the loss is nan at step 3 .*; the first non-finite tap: h\.0\.attn\.out holds \d+ non-finite value"),
    (1, r"non-finite parameters after step 2: parameter transformer\.h\.0\.attn\.c_proj\.weight holds 1 "
        r"non-finite value\(s\), the first at \(0, 0\) \(nan\).*the last good checkpoint .* \(step 1\) is kept"),
])
def test_training_stops_naming_the_step_and_the_first_nonfinite_tensor(tmp_path, save_every, expected):
    cfg = small_cfg()
    from manual.data import Batches
    from manual.optim import AdamW
    model = manual.Model(cfg)
    x = np.ones((8, cfg.max_seq_len), np.int64)
    trainer = Trainer(model, AdamW(model.params, model.grads), Batches(x, x, batch_size=4, seed=0),
                      total_steps=5, lr=1e-3, checkpoint_path=tmp_path / "c.safetensors", save_every=save_every)

    def poison(tr, loss, lr):
        if tr.state.step == 2:
            model.params["transformer.h.0.attn.c_proj.weight"][0, 0] = np.nan
    trainer.on_step = poison
    result = trainer.run()
    assert result.stopped == "non-finite"
    assert re.search(expected, result.message), result.message


# ================================================================================================
# no pickle, no eval of anything a file can influence

PY_FILES = [p for d in ("manual", "reference", "conformance", "tools", "examples") for p in (ROOT / d).rglob("*.py")]


def _code_only(path) -> str:
    """The file's code with string literals and comments blanked out: advice text printed to the user
    (tools/convert.py tells how to turn a .pt file into safetensors on the user's side) is not code."""
    import io
    import tokenize
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type not in (tokenize.STRING, tokenize.COMMENT) and not tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            out.append(tok.string)
    return " ".join(out)


def test_code_only_sees_code_not_strings(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('x = "torch.load(p)"  # pickle.loads\ntorch.load(p)\n')
    code = _code_only(f)
    assert code.count("load") == 1 and "pickle" not in code


def test_no_pickle_no_torch_load_and_eval_only_in_the_registry():
    offenders = []
    for path in PY_FILES:
        text = _code_only(path).replace(" . ", ".").replace(" (", "(").replace(" .", ".").replace(". ", ".")
        for pattern in (r"\bimport pickle\b", r"\bpickle\.", r"torch\.load\(", r"allow_pickle\s*=\s*True",
                        r"\bimport (?:dill|cloudpickle|marshal|shelve)\b", r"(?<![\w.])exec\("):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
        if re.search(r"(?<![\w.])eval\(", text) and path != ROOT / "manual/registry.py":
            offenders.append(f"{path.relative_to(ROOT)}: eval(")
    assert not offenders, offenders


def test_spy_nothing_from_a_file_reaches_eval_or_pickle(ckpt, tmp_path, monkeypatch, capsys):
    from manual import registry
    seen = []
    real_eval = builtins.eval

    def spy_eval(expr, *args):
        seen.append(expr)
        return real_eval(expr, *args)
    formulas = {dim for cfg in (small_cfg(), small_cfg(bias=False, tie_embeddings=False, n_future=3))
                for s in registry.param_specs(cfg) + registry.tap_specs(cfg) for dim in s.shape}

    def refuse(*a, **k):
        raise AssertionError("pickle / torch.load was called")
    monkeypatch.setattr(registry, "eval", spy_eval, raising=False)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)

    class RefusingUnpickler(pickle.Unpickler):     # a class, so that modules which subclass it still import
        def __init__(self, *a, **k):
            refuse()
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    import torch
    monkeypatch.setattr(torch, "load", refuse)
    # hostile strings wherever a file can put them
    cfg, *_ = load_model(ckpt)
    d = cfg.to_dict()
    d["activation"] = "__import__('os').system('echo pwned')"
    rewrite(ckpt, tmp_path / "evil.safetensors", config=json.dumps(d), tokenizer="__import__('os')")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "evil.safetensors")
    assert sample.main([str(ckpt), "--max-new-tokens", "3"]) == 0
    assert train.main(["--resume", str(ckpt.parent), "--max-steps", "5", "--quiet", "--out", str(tmp_path / "r")]) == 0
    for Model in IMPLS:
        Model.load(ckpt.parent / train.CHECKPOINT_NAME)
    capsys.readouterr()
    assert seen and set(seen) <= formulas, set(seen) - formulas


# ================================================================================================
# hypothesis: hostile inputs of every class give only the documented errors

_any = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(), max_size=2), st.sampled_from(
                     [np.dtype("float32"), np.float64, "float16", 1e-40, 1e-300, 10**9, "flash", "post"]))
_json = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                  st.text(max_size=8), st.lists(st.integers(), max_size=2),
                  st.sampled_from(["float16", 1e-40, 1e-300, 10**9, "flash", "post"]))
_fields = list(ModelConfig.__dataclass_fields__)


@HSET
@given(st.dictionaries(st.sampled_from(_fields + ["bogus"]), _any, max_size=8), st.booleans())
def test_fuzz_configs_raise_only_valueerror(changes, strict):
    d = {**small_cfg().to_dict(), **changes} if strict else changes
    try:
        cfg = ModelConfig.from_dict(d, strict=strict)
    except ValueError:
        return
    assert isinstance(cfg.dtype, str)
    json.loads(cfg.to_json())                          # always serialisable


@HSET
@given(data=st.data())
def test_fuzz_checkpoint_headers_and_metadata_raise_only_checkpointerror(ckpt, tmp_path_factory, data):
    raw = ckpt.read_bytes()
    path = tmp_path_factory.mktemp("fz") / "f.safetensors"
    how = data.draw(st.sampled_from(["bytes", "header", "meta"]))
    if how == "bytes":
        cut = data.draw(st.integers(0, len(raw)))
        path.write_bytes(raw[:cut] + data.draw(st.binary(max_size=64)))
    elif how == "header":
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        key = data.draw(st.sampled_from(sorted(header)))
        header[key] = data.draw(st.one_of(_json, st.dictionaries(st.text(max_size=5), _json, max_size=3)))
        body = json.dumps(header).encode()
        path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    else:
        cfg = load_model(ckpt)[0].to_dict()
        cfg.update(data.draw(st.dictionaries(st.sampled_from(_fields), _json, max_size=3)))
        meta = {"config": json.dumps(cfg), **data.draw(st.dictionaries(
            st.sampled_from(["format", "format_version", "train_state", "optimizer"]), st.text(max_size=20),
            max_size=2))}
        rewrite(ckpt, path, **meta)
    for Model in IMPLS:
        try:
            Model.load(path)
        except CheckpointError:
            pass


@HSET
@given(data=st.data())
def test_fuzz_train_state_and_cli_args(ckpt, data, capsys):
    text = data.draw(st.one_of(st.text(max_size=30), st.builds(json.dumps, st.dictionaries(
        st.sampled_from(["version", "step", "epoch", "batch", "train_loss", "val", "tokens", "x"]),
        _json, max_size=6))))
    try:
        TrainState.from_json(text)
    except ValueError:
        pass
    flag, value = data.draw(st.sampled_from([
        ("--temperature", st.sampled_from(["nan", "inf", "-1", "1e-320", "1e308", "0", "x", "5e-324"])),
        ("--top-k", st.sampled_from(["0", "-1", "1", "10000", "1.5", "x"])),
        ("--max-new-tokens", st.sampled_from(["0", "-1", "3", "1e3"])),
        ("--prompt", st.text(max_size=6)),
        ("--seed", st.sampled_from(["0", "-1", str(2**70), "x"])),
    ]))
    argv = [str(ckpt), "--max-new-tokens", "2", flag, data.draw(value)]
    try:
        code = sample.main(argv)
    except SystemExit as e:                               # argparse: usage + one error line
        code = e.code
    assert code in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err


@HSET
@given(data=st.data())
def test_fuzz_model_arguments_give_the_same_error_on_both_sides(data):
    cfg = small_cfg()
    params = dict(manual.Model(cfg).params)
    shapes = {k: v.shape for k, v in params.items()}
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(params) + ["extra.weight"]))
        params[name] = data.draw(st.sampled_from([
            None, 1.0, [1.0], np.zeros(3, np.float32), np.zeros((16,), np.float64), np.zeros((), np.float32),
            np.zeros(shapes.get(name, (1,)), np.float32), np.array(["x"])]))
    if data.draw(st.booleans()):
        del params[data.draw(st.sampled_from(sorted(params)))]
    outcomes = []
    for Model in IMPLS:
        try:
            Model.from_params(cfg, params)
            outcomes.append("ok")
        except (TypeError, ValueError) as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1], outcomes


_opt_value = st.one_of(_json, st.lists(_json, max_size=2), st.dictionaries(st.text(max_size=4), _json, max_size=2))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_train_cli_args_and_optimizer_metadata(ckpt, tmp_path_factory, data, capsys):
    """train.py with drawn flag values (each run 1-2 steps) and resumes from drawn optimizer metadata:
    exit 0, 1 (the documented non-finite stop) or 2 (bad input, one line), never a traceback."""
    tmp = tmp_path_factory.mktemp("fzt")
    flag, value = data.draw(st.sampled_from([
        ("--lr", st.sampled_from(["nan", "-1", "0", "1e308", "1e-320", "x", "1e3"])),
        ("--max-seq-len", st.sampled_from(["0", "1", "2", "100000", "10**9", "-5"])),
        ("--batch-size", st.sampled_from(["0", "1", "100000", "1.5"])),
        ("--val-fraction", st.sampled_from(["0", "1", "0.999", "nan", "2"])),
        ("--eval-windows", st.sampled_from(["0", "1", "-1"])),
        ("--clip-norm", st.sampled_from(["0", "inf", "1e-300"])),
        ("--n-heads", st.sampled_from(["3", "0", "16"])),
        ("--warmup", st.sampled_from(["0", "1000000", "-1"])),
    ]))
    argv = FAST + ["--max-steps", "2", "--out", str(tmp / "o"), flag, data.draw(value)]
    if data.draw(st.booleans()):
        meta = json.loads(load_tensors(ckpt)[1]["optimizer"])
        meta[data.draw(st.sampled_from(sorted(meta) + ["kind", "groups", "steps"]))] = data.draw(_opt_value)
        rewrite(ckpt, tmp / train.CHECKPOINT_NAME, optimizer=json.dumps(meta))
        argv = ["--resume", str(tmp), "--max-steps", "6", "--quiet", "--out", str(tmp / "o")]
    try:
        code = train.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2) and "Traceback" not in err, err
    if code == 2 and "usage:" not in err:
        one_line_error(err, "train.py")
