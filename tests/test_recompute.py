"""Activation recomputation (recompute="blocks", issue 14) on both sides: the same gradients, fewer
bytes kept, the closed form of manual/memory.py, and the conformance checks that say so."""
import numpy as np
import pytest

import reference
from conformance import memory as cmem
from conformance.engine import Case, Sides
from manual import checkpoint, memory
from manual.model import Model
from manual.registry import param_specs, tap_specs
from test_model import batch, perturbed_model, small_cfg

VARIANTS = [dict(), dict(norm="post"), dict(attention="flash"), dict(n_future=3, activation="relu"),
            dict(bias=False, tie_embeddings=False, activation="gelu_tanh"), dict(dtype="float32")]


def vid(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "base"


def run(model, ids, targets):
    loss = model.forward(ids, targets)
    kept = model.cache_bytes() if isinstance(model, Model) else None
    model.backward()
    return loss, kept


@pytest.mark.parametrize("kw", VARIANTS, ids=vid)
def test_manual_gradients_bit_identical(kw):
    cfg = small_cfg(**kw)
    ids, targets = batch(cfg)
    plain, rec = perturbed_model(cfg), perturbed_model(cfg, recompute="blocks", debug=True)
    loss_p, kept_p = run(plain, ids, targets)
    loss_r, kept_r = run(rec, ids, targets)
    assert loss_r == loss_p
    for name in plain.grads:
        assert np.array_equal(rec.grads[name], plain.grads[name]), name
    # what recompute keeps: the closed form, entry by entry, and less than without recompute
    assert rec.cache_breakdown() == memory.activation_breakdown(cfg, *ids.shape, recompute="blocks")
    assert kept_r == memory.activation_bytes(cfg, *ids.shape, recompute="blocks") < kept_p
    # the taps it keeps: outside the blocks and the block outputs, equal to those without recompute
    assert list(rec.taps) == list(rec.tap_grads) == memory.kept_tap_names(cfg, "blocks")
    for name in rec.taps:
        assert np.array_equal(rec.taps[name], plain.taps[name]), name
        assert np.array_equal(rec.tap_grads[name], plain.tap_grads[name]), name


@pytest.mark.parametrize("kw", VARIANTS, ids=vid)
def test_reference_checkpoint_matches_manual(kw):
    cfg = small_cfg(**kw)
    ids, targets = batch(cfg)
    m = perturbed_model(cfg, recompute="blocks")
    r = reference.Model.from_params(cfg, m.params, recompute="blocks")
    r0 = reference.Model.from_params(cfg, m.params)
    run(m, ids, targets)
    run(r, ids, targets)
    run(r0, ids, targets)
    tol = dict(rtol=1e-9, atol=1e-12) if cfg.dtype == "float64" else dict(rtol=1e-4, atol=1e-6)
    for name in m.grads:
        np.testing.assert_allclose(m.grads[name], r.grads[name], err_msg=name, **tol)
        np.testing.assert_array_equal(r.grads[name], r0.grads[name], err_msg=name)   # torch: same kernels again
    assert list(r.taps) == list(r.tap_grads) == memory.kept_tap_names(cfg, "blocks")
    from reference.optim import activation_saved_bytes
    m.forward(ids, targets)
    assert m.cache_bytes() / activation_saved_bytes(r, ids, targets) <= 1


def test_reference_saved_tensors_hold_the_checkpointed_inputs():
    """checkpoint keeps each block's input through save_for_backward, so the reference's activation bytes
    (autograd's saved tensors) count it: the figure the manual/reference ratio divides by is complete."""
    import torch
    cfg = small_cfg(n_layers=3)
    ids, targets = batch(cfg)
    r = reference.Model(cfg, recompute="blocks")
    taps = {}
    rows = cmem.saved_tensors(r, lambda: r.module(torch.from_numpy(ids), torch.from_numpy(targets), taps)[1])
    saved = {row["storage"] for row in rows}
    inputs = ["embed.out"] + [f"h.{i}.out" for i in range(cfg.n_layers - 1)]
    assert all(taps[name].untyped_storage().data_ptr() in saved for name in inputs)
    assert sum(row["bytes"] for row in rows) >= memory.activation_bytes(cfg, *ids.shape, recompute="blocks")


def test_recompute_lowers_the_measured_peak():
    cfg = small_cfg(n_layers=4, d_model=16, d_ff=64, max_seq_len=32)
    ids, targets = batch(cfg, B=4, T=32)
    peak = {mode: memory.measured_peak_bytes(Model(cfg, recompute=mode), ids, targets) for mode in memory.RECOMPUTE}
    saved = (memory.activation_bytes(cfg, 4, 32) - memory.activation_bytes(cfg, 4, 32, recompute="blocks")
             - memory.recompute_block_bytes(cfg, 4, 32))
    assert peak["blocks"] < peak["none"] - saved / 2


@pytest.mark.parametrize("make", [lambda cfg: Model(cfg, recompute="all"),
                                  lambda cfg: reference.Model(cfg, recompute="all")], ids=["manual", "reference"])
def test_bad_recompute_value(make):
    with pytest.raises(ValueError, match=r"recompute must be one of \('none', 'blocks'\), got 'all'"):
        make(small_cfg())


def _checks(tmp_path, sides, **kw):
    cfg = small_cfg(**kw)
    path = tmp_path / "case.safetensors"
    m = perturbed_model(cfg)
    checkpoint.save_model(path, cfg, m.params)
    ids, targets = batch(cfg)
    return cmem.recompute_checks(Case("t", cfg), path, ids, targets, sides), cfg


@pytest.mark.parametrize("kw", [dict(), dict(attention="flash", dtype="float32")], ids=vid)
def test_conformance_recompute_checks_pass(tmp_path, kw):
    out, cfg = _checks(tmp_path, Sides.default(), **kw)
    assert all(c.passed for c in out), [c for c in out if not c.passed]
    assert len(out) == 1 + 2 * len(param_specs(cfg)) + 2


def test_conformance_recompute_checks_can_fail(tmp_path):
    """A manual side whose recompute keeps everything (recompute ignored) and one whose recomputed forward
    differs fail the checks that say so."""
    class KeepsAll(Model):
        @classmethod
        def load(cls, path, recompute="none", **kwargs):
            return super().load(path)

    class Drifts(Model):
        def backward(self):
            if self.recompute == "blocks":
                self.params["transformer.h.0.mlp.c_fc.weight"] *= 1 + 1e-6   # seen only by the recomputed forward
            super().backward()

    default = Sides.default()
    out, _ = _checks(tmp_path, Sides(KeepsAll, default.reference, default.manual_optim))
    failed = {c.tensor for c in out if not c.passed}
    assert "activation bytes, recompute=blocks (manual vs closed form)" in failed
    out, _ = _checks(tmp_path, Sides(Drifts, default.reference, default.manual_optim))
    failed = {c.tensor for c in out if not c.passed}
    assert "transformer.h.0.mlp.c_fc.weight grad (manual, recompute=blocks vs none)" in failed
    assert len(tap_specs(small_cfg())) > len(memory.kept_tap_names(small_cfg(), "blocks"))
