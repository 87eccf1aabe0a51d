"""Model(cfg, workspace=True) (issue 14): the same numbers as without, bit for bit, over several steps,
and a steady-state training step that allocates no NumPy array over 64 KiB (counted, never timed)."""
import gc
import sys
from pathlib import Path

import numpy as np
import pytest

import manual.optim
from conformance.engine import make_batch
from manual.config import ModelConfig
from manual.layers.workspace import Workspace
from manual.model import Model
from manual.registry import decay_groups
from test_model import batch, small_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from memprof import NumpyAllocationCounter  # noqa: E402

VARIANTS = [dict(), dict(norm="post"), dict(attention="flash"), dict(n_future=3, activation="relu"),
            dict(bias=False, tie_embeddings=False, activation="gelu_tanh"), dict(loss="brier", temperature=0.7),
            dict(dtype="float32"), dict(dtype="float32", activation="gelu_tanh", norm="post")]


def vid(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "base"


def trained(cfg, workspace, steps=3):
    """Three AdamW steps on three batches; per step: loss, taps, tap gradients and gradients, copied."""
    m = Model(cfg, seed=1, workspace=workspace)
    opt = manual.optim.AdamW(m.params, m.grads, lr=1e-2, groups=decay_groups(cfg, 0.1))
    out = []
    for s in range(steps):
        ids, targets = batch(cfg, seed=s)
        opt.zero_grad()
        loss = m.forward(ids, targets)
        m.backward()
        copy = lambda d: {k: v.copy() for k, v in d.items()}   # noqa: E731 (the workspace is reused)
        out.append((loss, copy(m.taps), copy(m.tap_grads), copy(m.grads)))
        opt.step()
    return out


@pytest.mark.parametrize("kw", VARIANTS, ids=vid)
def test_workspace_gives_the_same_bits(kw):
    cfg = small_cfg(**kw)
    for (la, ta, tga, ga), (lb, tb, tgb, gb) in zip(trained(cfg, False), trained(cfg, True)):
        assert la == lb
        for a, b in ((ta, tb), (tga, tgb), (ga, gb)):
            assert list(a) == list(b)
            for name in a:
                assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_workspace_with_recompute_gives_the_same_bits():
    cfg = small_cfg()
    ids, targets = batch(cfg)
    a, b = Model(cfg, seed=1), Model(cfg, seed=1, workspace=True, recompute="blocks")
    for m in (a, b):
        m.forward(ids, targets)
        m.backward()
    for name in a.grads:
        assert np.array_equal(a.grads[name], b.grads[name]), name
    assert not any(key.startswith("h.") for key in b.workspace.arrays)   # the blocks use none of it


def medium_step_counter(workspace):
    """NumPy allocations of the third training step of the medium preset (B=8, T=128, float32: the
    configuration issue 14 counts), zero_grad + forward + backward + clip + AdamW."""
    cfg = ModelConfig.preset("medium")
    ids, targets = make_batch(cfg, 8, cfg.max_seq_len, seed=0)
    m = Model(cfg, workspace=workspace)
    opt = manual.optim.AdamW(m.params, m.grads, lr=3e-4, groups=decay_groups(cfg, 0.1))

    def step():
        opt.zero_grad()
        m.forward(ids, targets)
        m.backward()
        manual.optim.clip_grad_norm_(m.grads, 1.0)
        opt.step()

    step()
    step()
    names = (list(m.workspace.arrays), list(m.workspace.scratch), m.workspace.nbytes()) if workspace else None
    gc.collect()
    with NumpyAllocationCounter() as counter:
        step()
    if workspace:   # nothing was added to the workspace by the steady-state step
        assert (list(m.workspace.arrays), list(m.workspace.scratch), m.workspace.nbytes()) == names
    return counter


def test_steady_state_medium_step_allocates_nothing_over_64k():
    with_ws = medium_step_counter(True)
    assert with_ws.large_count == 0, with_ws.top(5)
    assert with_ws.bytes < 8 * 2**20        # what is left: small arrays (row statistics, erf's tail indices)
    without = medium_step_counter(False)    # the counter does see the plain path's arrays
    assert without.large_count > 150 and without.large_bytes > 200 * 2**20


def test_a_new_batch_shape_gets_a_new_workspace():
    cfg = small_cfg()
    m = Model(cfg, workspace=True)
    ids, targets = batch(cfg, B=2, T=6)
    m.forward(ids, targets)
    first = m.workspace
    assert first.batch_shape == (2, 6) and first.nbytes() > 0
    m.forward(ids[:, :4], targets[:, :4])
    assert m.workspace is not first and m.workspace.batch_shape == (2, 4)


def test_taps_are_overwritten_by_the_next_step():
    """The documented price: with a workspace the returned arrays are reused (copy what you keep)."""
    cfg = small_cfg()
    m = Model(cfg, workspace=True)
    m.forward(*batch(cfg, seed=0))
    logits, kept = m.taps["logits"], m.taps["logits"].copy()
    m.forward(*batch(cfg, seed=1))
    assert np.shares_memory(m.taps["logits"], logits) and not np.array_equal(logits, kept)


def test_a_name_keeps_its_shape():
    ws = Workspace((2, 3)).scope("h.0")
    a = ws.get("x", (2, 3, 4), np.float32)
    assert ws.get("x", (2, 3, 4), np.float32) is a
    with pytest.raises(ValueError, match=r"workspace array 'h.0.x' is \(2, 3, 4\) float32, asked for \(2, 3, 5\)"):
        ws.get("x", (2, 3, 5), np.float32)
