"""Loss of one prediction head, with temperature, ignoring PAD targets.

    z = logits / temperature                       logits (B, T, V), targets (B, T) int
    p = softmax(z) over V                          (B, T, V)
    valid[b, t] = targets[b, t] != pad_id          n = number of valid positions
    cross_entropy:  l[b, t] = -log p[b, t, y]  = logsumexp(z[b, t]) - z[b, t, y]
    brier:          l[b, t] = sum_v (p[b, t, v] - onehot(y)[v])^2
    loss = sum_{valid} l / n                       (PAD positions count neither in the sum nor in n)

Backward, for an upstream scalar gradient dloss (w = dloss / n on valid positions, 0 on PAD; a head
with n = 0 has no loss to differentiate: the model skips it, loss_backward refuses it):
    cross_entropy:  dz = w (p - onehot(y))
    brier:          dz = w * 2 p (e - sum_v e_v p_v),  e = p - onehot(y)
                    (the softmax Jacobian dp_v/dz_k = p_v (delta_vk - p_k) applied to dl/dp = 2 e)
    dlogits = dz / temperature

Cache: LossCache: p (B*T*V, for dz) and targets (B*T int64, 8 bytes each), with the scalars
that define the loss; valid is recomputed from targets (B*T bools) instead of being cached.
`ws`: an optional Workspace (manual/layers/workspace.py): p and dlogits are then its named arrays
(cross entropy; brier allocates as without one).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .workspace import out


class LossCache(NamedTuple):
    p: np.ndarray              # (B, T, V) softmax(logits / temperature)
    targets: np.ndarray        # (B, T) int64
    pad_id: int
    temperature: float
    kind: str                  # 'cross_entropy' or 'brier'
    n: int                     # number of non-PAD targets


def _onehot_subtract(x, targets, w):
    """x[b, t, targets[b, t]] -= w[b, t], in place.  x (B, T, V), targets (B, T), w (B, T) or scalar."""
    idx = targets[..., None]                                   # (B, T, 1)
    picked = np.take_along_axis(x, idx, axis=-1)               # (B, T, 1)
    np.put_along_axis(x, idx, picked - np.asarray(w, dtype=x.dtype)[..., None], axis=-1)


def loss_forward(logits, targets, pad_id, temperature, kind="cross_entropy", ws=None):
    """Returns (loss, n) and the cache. loss is a 0-d array of logits' dtype (nan when n == 0)."""
    dtype = logits.dtype
    z = np.divide(logits, temperature, out=out(ws, "p", logits.shape, dtype))   # (B, T, V) (weak Python float)
    z -= z.max(axis=-1, keepdims=True)                         # shifted so exp(z) <= 1
    valid = targets != pad_id                                  # (B, T)
    n = int(valid.sum())
    if kind == "cross_entropy":
        z_target = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]  # (B, T)
        p = np.exp(z, out=z)                                   # (B, T, V) unnormalised, in place
        sumexp = p.sum(axis=-1)                                # (B, T)
        p /= sumexp[..., None]                                 # (B, T, V) softmax
        per_pos = np.log(sumexp) - z_target                    # (B, T) logsumexp - z_target
    elif kind == "brier":
        p = np.exp(z, out=z)                                   # (B, T, V)
        p /= p.sum(axis=-1, keepdims=True)
        e = p.copy()                                           # (B, T, V) p - onehot
        _onehot_subtract(e, targets, 1)
        per_pos = np.sum(e * e, axis=-1)                       # (B, T)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose 'cross_entropy' or 'brier'")
    total = np.sum(per_pos, where=valid, dtype=dtype)          # () sum over valid positions only
    loss = total / dtype.type(n) if n else dtype.type(np.nan)
    return (np.asarray(loss, dtype=dtype), n), LossCache(p, targets, pad_id, temperature, kind, n)


def loss_backward(dloss, cache, ws=None):
    """dloss: the upstream gradient of this head's loss (a Python float). Returns dlogits (B, T, V)."""
    p, targets = cache.p, cache.targets
    if cache.n == 0:
        raise ValueError("loss_backward: this head has no non-PAD target (n = 0), so its loss (nan) is no part "
                         "of any total and has no gradient; skip the head (manual.Model gives its tap "
                         "gradients as zeros)")
    # w = dloss / n on valid positions, 0 on PAD; / temperature is the backward of z = logits / temperature
    w = (targets != cache.pad_id).astype(p.dtype) * (dloss / (cache.n * cache.temperature))  # (B, T)
    if cache.kind == "cross_entropy":
        dz = np.multiply(p, w[..., None], out=out(ws, "dlogits", p.shape, p.dtype))   # (B, T, V)
        _onehot_subtract(dz, targets, w)                       # w (p - onehot)
    else:
        e = p.copy()                                           # (B, T, V)
        _onehot_subtract(e, targets, 1)                        # e = p - onehot
        ep = np.sum(e * p, axis=-1, keepdims=True)             # (B, T, 1)
        e -= ep
        e *= p
        e *= (2 * w)[..., None]
        dz = e                                                 # (B, T, V)
    return dz
