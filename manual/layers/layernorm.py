"""Layer norm over the last dimension, biased variance, eps inside the square root.

    mean = sum_c x_c / C          var = sum_c (x_c - mean)^2 / C          rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd      y = xhat * w + b                         x, y (B, T, C); w, b (C,)

Backward (derivation as in llm.c's doc/layernorm): with g = dy * w (the gradient w.r.t. xhat),
    dw += sum_{B,T} dy * xhat        db += sum_{B,T} dy
    dx  = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
(the two means are the gradient flowing through `mean` and through `var`).

Cache: LayerNormCache(xhat, rstd, w) = B*T*C + B*T numbers (w is the parameter, no bytes of its own).
We keep xhat rather than x: backward needs xhat twice and x only through xhat, so caching
x would force recomputing (x - mean) * rstd and keeping mean too (B*T more).

`ws` (manual/layers/workspace.py): with a Workspace, xhat, y and dx are the layer's named arrays and
the squares / products go into a shared scratch: no fresh (B, T, C) array per call (the plain path,
ws=None, allocates them; the arithmetic is the same, operation for operation).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .workspace import out, scratch


class LayerNormCache(NamedTuple):
    xhat: np.ndarray           # (B, T, C) the normalised input (x - mean) * rstd
    rstd: np.ndarray           # (B, T, 1) 1 / sqrt(var + eps)
    w: np.ndarray              # (C,) the weight (the parameter itself), for dx


def layernorm_forward(x, w, b, eps, ws=None):
    """x (B, T, C), w (C,), b (C,) or None -> y (B, T, C)."""
    C = x.shape[-1]
    # the means are written as sum / C: the same arithmetic as np.mean, without its Python overhead
    mean = x.sum(axis=-1, keepdims=True)                       # (B, T, 1)
    mean /= C
    xc = np.subtract(x, mean, out=out(ws, "xhat", x.shape, x.dtype))             # (B, T, C)
    with np.errstate(over="ignore"):                           # an overflowing row is handled below, exactly
        var = np.square(xc, out=scratch(ws, x.shape, x.dtype)).sum(axis=-1, keepdims=True)  # (B, T, 1)
    var /= C                                                   # biased variance
    over = ~np.isfinite(var[..., 0])                           # (B, T) rows whose sum of squares overflowed
    var += eps                                                 # (eps is a weak Python float)
    rstd = np.sqrt(var, out=var)
    rstd = np.divide(1.0, rstd, out=rstd)                      # (B, T, 1) 1 / sqrt(var + eps)
    xc *= rstd                                                 # xhat, in place (B, T, C)
    xhat = xc
    if over.any():                                             # else rstd = 1/inf = 0 would hide it as xhat = 0
        xhat[over], rstd[over] = _rescaled_rows(x[over], eps)
    y = np.multiply(xhat, w, out=out(ws, "y", x.shape, x.dtype))  # (B, T, C)
    if b is not None:
        y += b
    return y, LayerNormCache(xhat, rstd, w)


def _rescaled_rows(x, eps):
    """xhat, rstd of rows (N, C) whose sum of squares overflows (float32: |x - mean| above ~1e18).

    Each row is divided by 2^e >= max|x| first: u = x / 2^e is exact (a power of two), the sums
    cannot overflow, and xhat = (u - mean u) / sqrt(var u + eps / 4^e), rstd = that / 2^e are the
    true values. A non-finite x stays non-finite (inf - inf = nan), as the math gives.
    """
    C = x.shape[-1]
    _, e = np.frexp(np.abs(x).max(axis=-1, keepdims=True))     # (N, 1) 2^e > max|x|
    u = np.ldexp(x, -e)                                        # (N, C) |u| < 1
    u -= u.sum(axis=-1, keepdims=True) / C
    q = np.square(u).sum(axis=-1, keepdims=True) / C + np.ldexp(x.dtype.type(eps), -2 * e)  # (N, 1)
    r = 1 / np.sqrt(q)                                         # (N, 1) 1 / sqrt(var u + eps / 4^e)
    return u * r, np.ldexp(r, -e)                              # (N, C), (N, 1)


def layernorm_backward(dy, cache, dw, db=None, ws=None):
    """Returns dx (B, T, C); accumulates dw, db (C,)."""
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    tmp = scratch(ws, dy.shape, dy.dtype)                      # (B, T, C) products, consumed at once
    dw += np.multiply(dy, xhat, out=tmp).reshape(-1, dy.shape[-1]).sum(axis=0)   # (C,)
    if db is not None:
        db += dy.reshape(-1, dy.shape[-1]).sum(axis=0)         # (C,)
    C = dy.shape[-1]
    g = np.multiply(dy, w, out=out(ws, "dx", dy.shape, dy.dtype))   # (B, T, C) dL/dxhat
    g_mean = g.sum(axis=-1, keepdims=True)                     # (B, T, 1)
    g_mean /= C                                                # mean_c(g) (sum / C, as np.mean)
    gx_mean = np.multiply(g, xhat, out=tmp).sum(axis=-1, keepdims=True)   # (B, T, 1)
    gx_mean /= C                                               # mean_c(g * xhat)
    g -= g_mean
    g -= np.multiply(xhat, gx_mean, out=tmp)
    g *= rstd                                                  # dx, in place (B, T, C)
    return g
