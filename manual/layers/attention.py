"""Causal multi-head self-attention (GPT-2 layout: Q|K|V fused in one [C, 3C] matrix).

Shapes: a (B, T, C) -> out (B, T, C); H heads of size D = C / H.

Forward, numbered (backward uses the same numbers):
    1. qkv  = a Wqkv + bqkv                                   (B, T, 3C)   c_attn
    2. q, k, v = split(qkv) -> (B, T, H, D) -> (B, H, T, D)    views into qkv, no copy
    3. att  = (q k^T) / sqrt(D)                               (B, H, T, T)  [tap att, before the mask]
    4. probs = softmax_j(att_ij if j <= i else -inf)          (B, H, T, T)  [tap probs]
    5. y    = probs v                                         (B, H, T, D)
    6. ctx  = y -> (B, T, H, D) -> (B, T, C)                  (B, T, C)     [tap ctx]
    7. out  = ctx Wo + bo                                     (B, T, C)     c_proj

Cache (AttentionCache): a (B*T*C, in c_attn, for dWqkv), qkv (3*B*T*C; backward splits it into
q, k, v views again), ctx (B*T*C, in c_proj, for dWo) and the softmax statistics of step 4:
    'standard'  probs (B*H*T*T); lse is None. att is a tap but not cached: backward needs only
                probs, and the masked copy of att becomes probs in place.
    'flash'     lse (B*H*T); probs is None. Flash computes the same function without ever holding
                a (T, T) matrix per head: steps 3-5 run over blocks of keys with an online softmax
                (running max m and running sum l per query row), and only the row log-sum-exp
                lse = m + log l is kept. Backward recomputes each block of probs from q, k and lse
                (exp(att - lse)).

`ws` (manual/layers/workspace.py), standard attention: with a Workspace every array of the steps
above and of their gradients is the layer's named array (att, probs, y, ctx; dprobs, dv, datt, dq, dk,
dqkv), so a step allocates none of them; ws=None allocates each (the plain path, same arithmetic).
Flash attention allocates as before.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from .linear import LinearCache, linear_backward, linear_forward
from .workspace import empty, out, scratch, ws_kw

FLASH_BLOCK = 64  # keys per block in flash attention


class AttentionCache(NamedTuple):
    c_attn: LinearCache        # 1. x = a (B, T, C), W = Wqkv
    qkv: np.ndarray            # 2. (B, T, 3C) q | k | v
    n_heads: int               # 2. H
    probs: np.ndarray | None   # 4. standard: (B, H, T, T) softmax; None for flash
    lse: np.ndarray | None     # 4. flash: (B, H, T) row log-sum-exp of the masked att; None for standard
    block: int                 # flash: keys per block
    c_proj: LinearCache        # 7. x = ctx (B, T, C), W = Wo

    @property
    def ctx(self) -> np.ndarray:
        """(B, T, C) the merged heads of step 6 (flash backward reads y from it)."""
        return self.c_proj.x


@functools.lru_cache(maxsize=64)
def _causal_mask(T, dtype):
    """Additive mask: 0 where key j <= query i, -inf where j > i.  (T, T), built once per (T, dtype)
    and read-only; flash attention uses slices of it."""
    i = np.arange(T)
    mask = np.where(i[None, :] > i[:, None], -np.inf, 0.0).astype(dtype)     # (T, T)
    mask.setflags(write=False)
    return mask


def _split_heads(qkv, H):
    """2. (B, T, 3C) -> three (B, H, T, D) views into qkv."""
    B, T, C3 = qkv.shape
    qkv5 = qkv.reshape(B, T, 3, H, C3 // (3 * H))              # (B, T, 3, H, D) view
    return tuple(qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # 3 x (B, H, T, D) views


def attention_forward(a, W_attn, b_attn, W_proj, b_proj, n_heads, flash=False, block=FLASH_BLOCK, ws=None):
    """Returns (taps, cache). taps: dict q, k, v, [att, probs,] ctx, out."""
    B, T, C = a.shape
    H, D = n_heads, C // n_heads
    scale = 1.0 / math.sqrt(D)
    dt = a.dtype
    # 1. qkv = a Wqkv + bqkv
    qkv, c_attn = linear_forward(a, W_attn, b_attn, **ws_kw(ws, "c_attn"))   # (B, T, 3C)
    # 2. split into heads
    q, k, v = _split_heads(qkv, H)                             # (B, H, T, D) x 3
    taps = {"q": q, "k": k, "v": v}
    probs = lse = None
    if not flash:
        # 3. att = q k^T / sqrt(D)
        att = np.matmul(q, k.transpose(0, 1, 3, 2), out=out(ws, "att", (B, H, T, T), dt))  # (B, H, T, T)
        att *= scale
        # 4. probs = softmax(masked att); the max is subtracted for stability (exp <= 1)
        probs = np.add(att, _causal_mask(T, dt), out=out(ws, "probs", att.shape, dt))  # masked copy, -> probs in place
        probs -= probs.max(axis=-1, keepdims=True)
        np.exp(probs, out=probs)
        probs /= probs.sum(axis=-1, keepdims=True)
        # 5. y = probs v
        y = np.matmul(probs, v, out=scratch(ws, (B, H, T, D), dt))   # (B, H, T, D), copied into ctx below
        taps["att"], taps["probs"] = att, probs
    else:
        y, lse = _flash_forward(q, k, v, scale, block)         # (B, H, T, D), (B, H, T)
    # 6. merge heads
    ctx = empty(ws, "ctx", (B, T, C), dt)                      # (B, T, C) a contiguous copy
    ctx.reshape(B, T, H, D)[...] = y.transpose(0, 2, 1, 3)
    # 7. out = ctx Wo + bo
    o, c_proj = linear_forward(ctx, W_proj, b_proj, **ws_kw(ws, "c_proj"))   # (B, T, C)
    taps["ctx"], taps["out"] = ctx, o
    return taps, AttentionCache(c_attn, qkv, H, probs, lse, block, c_proj)


def attention_backward(dout, cache, dW_attn, db_attn, dW_proj, db_proj, record=None, ws=None):
    """Returns da (B, T, C); accumulates the four parameter gradients.

    If `record` is a dict, the intermediate gradients are stored in it under the tap names
    (out, ctx, probs, att, q, k, v).
    """
    q, k, v = _split_heads(cache.qkv, cache.n_heads)           # (B, H, T, D) x 3: step 2's views again
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D)                                 # step 3's scale
    dt = dout.dtype
    # 7. out = ctx Wo + bo
    dctx = linear_backward(dout, cache.c_proj, dW_proj, db_proj, **ws_kw(ws, "c_proj"))  # (B, T, C)
    # 6. ctx = y -> (B, T, H, D) -> (B, T, C)
    dy = dctx.reshape(B, T, H, D).transpose(0, 2, 1, 3)        # (B, H, T, D) view
    if cache.probs is not None:                                # standard: step 4 kept probs
        probs = cache.probs
        # 5. y = probs v
        dprobs = np.matmul(dy, v.transpose(0, 1, 3, 2), out=out(ws, "dprobs", probs.shape, dt))  # (B, H, T, T)
        dv = np.matmul(probs.transpose(0, 1, 3, 2), dy, out=out(ws, "dv", q.shape, dt))  # (B, H, T, D)
        # 4. probs = softmax(masked att):  datt_ij = p_ij (dp_ij - sum_k p_ik dp_ik); 0 where masked (p = 0)
        rowdot = np.sum(np.multiply(dprobs, probs, out=scratch(ws, probs.shape, dt)), axis=-1, keepdims=True)
        datt = np.subtract(dprobs, rowdot, out=out(ws, "datt", probs.shape, dt))  # (B, H, T, T)
        datt *= probs
        # 3. att = q k^T / sqrt(D)
        dq = np.matmul(datt, k, out=out(ws, "dq", q.shape, dt))   # (B, H, T, D)
        dq *= scale
        dk = np.matmul(datt.transpose(0, 1, 3, 2), q, out=out(ws, "dk", q.shape, dt))  # (B, H, T, D)
        dk *= scale
        if record is not None:
            record["probs"], record["att"] = dprobs, datt
    else:                                                      # flash: step 4 kept lse
        y = cache.ctx.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D) view of the cached ctx
        dq, dk, dv = _flash_backward(dy, q, k, v, y, cache.lse, scale, cache.block)
    # 2. q, k, v = split(qkv): the three gradients are written side by side
    dqkv = empty(ws, "dqkv", (B, T, 3, H, D), dt)              # (B, T, 3, H, D) = (B, T, 3C)
    dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
    dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
    # 1. qkv = a Wqkv + bqkv
    da = linear_backward(dqkv.reshape(B, T, 3 * H * D), cache.c_attn, dW_attn, db_attn, **ws_kw(ws, "c_attn"))
    if record is not None:
        record["out"], record["ctx"] = dout, dctx
        record["q"], record["k"], record["v"] = dq, dk, dv
    return da


# -- flash attention: the same steps 3-5, blocked over keys ------------------------------------

def _flash_forward(q, k, v, scale, block):
    """Online softmax over key blocks. Returns y (B, H, T, D) and lse (B, H, T).

    Queries i < j0 cannot see any key of the block [j0, j1), so each block only touches rows
    i >= j0 (the causal half of the work is skipped).
    """
    B, H, T, D = q.shape
    m = np.full((B, H, T, 1), -np.inf, dtype=q.dtype)          # (B, H, T, 1) running row max
    l = np.zeros((B, H, T, 1), dtype=q.dtype)                  # (B, H, T, 1) running sum of exp(att - m)
    acc = np.zeros((B, H, T, D), dtype=q.dtype)                # (B, H, T, D) running sum of exp(att - m) v
    for j0 in range(0, T, block):
        j1 = min(j0 + block, T)
        # 3. att = q k^T / sqrt(D), block of keys [j0, j1), query rows [j0, T)
        s = _flash_scores(q, k, scale, j0, j1)                 # (B, H, T-j0, j1-j0)
        # 4. online softmax: rescale what was accumulated with the old max
        m_new = np.maximum(m[:, :, j0:], s.max(axis=-1, keepdims=True))  # (B, H, T-j0, 1), finite (key j0 <= row)
        corr = np.exp(m[:, :, j0:] - m_new)                    # (B, H, T-j0, 1); exp(-inf) = 0 on the first block
        s -= m_new
        p = np.exp(s, out=s)                                   # (B, H, T-j0, j1-j0)
        l[:, :, j0:] *= corr
        l[:, :, j0:] += p.sum(axis=-1, keepdims=True)
        # 5. y = probs v, accumulated block by block
        acc[:, :, j0:] *= corr
        acc[:, :, j0:] += p @ v[:, :, j0:j1]
        m[:, :, j0:] = m_new
    acc /= l                                                   # y (B, H, T, D)
    lse = (m + np.log(l))[..., 0]                              # (B, H, T)
    return acc, lse


def _flash_scores(q, k, scale, j0, j1):
    """3. the masked att of key block [j0, j1), query rows [j0, T): (B, H, T-j0, j1-j0). Forward and
    backward both call this, so backward's att is the forward's bit for bit (its row sums rely on it)."""
    s = q[:, :, j0:] @ k[:, :, j0:j1].transpose(0, 1, 3, 2)    # (B, H, T-j0, j1-j0)
    s *= scale
    s += _causal_mask(q.shape[2], s.dtype)[j0:, j0:j1]
    return s


def _flash_probs(q, k, lse, scale, j0, j1):
    """4. exp(att - lse) of key block [j0, j1), query rows [j0, T): (B, H, T-j0, j1-j0), 0 where masked."""
    s = _flash_scores(q, k, scale, j0, j1)                     # (B, H, T-j0, j1-j0)
    s -= lse[:, :, j0:, None]
    return np.exp(s, out=s)


def _flash_backward(dy, q, k, v, y, lse, scale, block):
    """Recomputes each block of probs = exp(att - lse) / rowsum and returns dq, dk, dv (B, H, T, D).

    rowsum = sum_j exp(att_ij - lse_i) is 1 up to the rounding of lse: a float32 lse is off by up to
    half its spacing (2^-12 at scores ~6.5e3), one factor exp(-err) shared by the whole row, which
    without this division gave flash's gradients up to 2x the float32 error of standard attention
    (tests/test_numerics.py). A first pass over the key blocks sums it (one more q k^T per block).
    Uses sum_j p_ij dp_ij = dy_i . y_i (the softmax backward's row sum without the (T, T) matrix).
    """
    B, H, T, D = q.shape
    rowdot = np.sum(dy * y, axis=-1, keepdims=True)            # (B, H, T, 1)
    rowsum = np.zeros_like(rowdot)                             # (B, H, T, 1)
    for j0 in range(0, T, block):
        rowsum[:, :, j0:] += _flash_probs(q, k, lse, scale, j0, min(j0 + block, T)).sum(axis=-1, keepdims=True)
    dq = np.zeros_like(q)                                      # (B, H, T, D)
    dk = np.empty_like(k)                                      # (B, H, T, D)
    dv = np.empty_like(v)                                      # (B, H, T, D)
    for j0 in range(0, T, block):
        j1 = min(j0 + block, T)
        qi, kj, vj, dyi = q[:, :, j0:], k[:, :, j0:j1], v[:, :, j0:j1], dy[:, :, j0:]
        # 3.-4. recompute probs of this block: p = exp(att - lse) / rowsum, 0 where masked
        p = _flash_probs(q, k, lse, scale, j0, j1)             # (B, H, T-j0, j1-j0)
        p /= rowsum[:, :, j0:]
        # 5. y = probs v
        dv[:, :, j0:j1] = p.transpose(0, 1, 3, 2) @ dyi        # (B, H, j1-j0, D)
        dp = dyi @ vj.transpose(0, 1, 3, 2)                    # (B, H, T-j0, j1-j0)
        # 4. softmax: datt = p (dp - rowdot)
        dp -= rowdot[:, :, j0:]
        dp *= p                                                # datt of this block
        # 3. att = q k^T / sqrt(D)
        dq[:, :, j0:] += (dp @ kj) * scale
        dk[:, :, j0:j1] = (dp.transpose(0, 1, 3, 2) @ qi) * scale
    return dq, dk, dv
