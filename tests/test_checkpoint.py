"""Checkpoint I/O (manual/checkpoint.py): atomic writes, strict loads, one error listing every problem."""
import os

import numpy as np
import pytest

from manual import checkpoint
from manual.checkpoint import CheckpointError, load_model, load_tensors, save_model, save_tensors
from manual.config import ModelConfig
from manual.registry import init_params

CFG = ModelConfig(vocab_size=11, max_seq_len=6, d_model=8, n_heads=2, d_ff=12, n_layers=2, dtype="float64")


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_bit_for_bit_with_optimizer_tensors_and_metadata(tmp_path):
    params = init_params(CFG, seed=3)
    extra = {"optim.exp_avg.transformer.wte.weight": np.full((11, 8), 0.5)}
    save_model(tmp_path / "c.safetensors", CFG, params, extra_tensors=extra, extra_metadata={"step": 7})
    cfg, loaded, extras, meta = load_model(tmp_path / "c.safetensors")
    assert cfg == CFG
    assert list(loaded) == list(params)
    for name in params:
        assert loaded[name].dtype == params[name].dtype
        assert np.array_equal(loaded[name], params[name])
    assert np.array_equal(extras["optim.exp_avg.transformer.wte.weight"], extra["optim.exp_avg.transformer.wte.weight"])
    assert meta["step"] == "7" and meta["format"] == checkpoint.FORMAT


@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, stage):
    path = tmp_path / "c.safetensors"
    save_model(path, CFG, init_params(CFG, seed=0))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"simulated failure at {stage}")

    if stage == "write":
        real_fdopen = os.fdopen

        class FailingFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])   # half the file, then the disk is full
                raise OSError("simulated failure at write: no space left on device")

        monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: FailingFile(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(checkpoint.os, stage, boom)
    with pytest.raises(OSError, match="simulated failure"):
        save_model(path, CFG, init_params(CFG, seed=1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    cfg, params, _, _ = load_model(path)
    assert np.array_equal(params["transformer.wte.weight"], init_params(CFG, seed=0)["transformer.wte.weight"])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_model(tmp_path / "nope" / "c.safetensors", CFG, init_params(CFG))


def test_load_lists_every_missing_unexpected_and_mismatched_tensor(tmp_path):
    params = init_params(CFG)
    tensors = dict(params)
    del tensors["transformer.wpe.weight"]
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.c_attn.weight"] = np.zeros((8, 8))          # should be (8, 24)
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"].astype(np.float32)
    tensors["lm_head.weight"] = np.zeros((11, 8))                                # tied: not stored
    save_tensors(tmp_path / "bad.safetensors", tensors, checkpoint.model_metadata(CFG))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "2 missing, 1 unexpected, 2 mismatched" in msg
    for needle in ("missing:    transformer.wpe.weight (6, 8)", "missing:    transformer.h.1.mlp.c_fc.bias (12,)",
                   "unexpected: lm_head.weight (11, 8)", "transformer.h.0.attn.c_attn.weight: shape (8, 8), expected (8, 24)",
                   "transformer.ln_f.weight: dtype float32, expected float64", "ties embeddings"):
        assert needle in msg


def test_a_different_config_is_named_field_by_field(tmp_path):
    save_model(tmp_path / "c.safetensors", CFG, init_params(CFG))
    with pytest.raises(CheckpointError, match=r"d_ff: file 12 vs expected 16"):
        load_model(tmp_path / "c.safetensors", CFG.replace(d_ff=16))


@pytest.mark.parametrize("metadata,match", [
    ({}, "format None"),
    ({"format": checkpoint.FORMAT, "format_version": "99", "config": CFG.to_json()}, "format_version '99'"),
    ({"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION}, "no 'config'"),
    ({"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "config": "{not json"},
     "invalid config"),
    ({"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION,
      "config": CFG.replace().to_json().replace('"n_heads": 2', '"n_heads": 3')}, "not divisible by n_heads 3"),
])
def test_bad_metadata_is_refused(tmp_path, metadata, match):
    save_tensors(tmp_path / "m.safetensors", init_params(CFG), metadata)
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "m.safetensors")


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_tensors(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tensors(tmp_path / "absent.safetensors")


def test_saving_wrong_parameters_is_refused_before_anything_is_written(tmp_path):
    params = init_params(CFG)
    params["transformer.wte.weight"] = params["transformer.wte.weight"][:5]
    with pytest.raises(CheckpointError, match="mismatched"):
        save_model(tmp_path / "c.safetensors", CFG, params)
    assert list(tmp_path.iterdir()) == []
