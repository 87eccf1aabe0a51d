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
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LayerNormCache(NamedTuple):
    xhat: np.ndarray           # (B, T, C) the normalised input (x - mean) * rstd
    rstd: np.ndarray           # (B, T, 1) 1 / sqrt(var + eps)
    w: np.ndarray              # (C,) the weight (the parameter itself), for dx


def layernorm_forward(x, w, b, eps):
    """x (B, T, C), w (C,), b (C,) or None -> y (B, T, C)."""
    C = x.shape[-1]
    # the means are written as sum / C: the same arithmetic as np.mean, without its Python overhead
    mean = x.sum(axis=-1, keepdims=True)                       # (B, T, 1)
    mean /= C
    xc = x - mean                                              # (B, T, C)
    var = np.square(xc).sum(axis=-1, keepdims=True)            # (B, T, 1)
    var /= C                                                   # biased variance
    var += eps                                                 # (eps is a weak Python float)
    rstd = np.sqrt(var, out=var)
    rstd = np.divide(1.0, rstd, out=rstd)                      # (B, T, 1) 1 / sqrt(var + eps)
    xc *= rstd                                                 # xhat, in place (B, T, C)
    xhat = xc
    y = xhat * w                                               # (B, T, C)
    if b is not None:
        y += b
    return y, LayerNormCache(xhat, rstd, w)


def layernorm_backward(dy, cache, dw, db=None):
    """Returns dx (B, T, C); accumulates dw, db (C,)."""
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    dw += (dy * xhat).reshape(-1, dy.shape[-1]).sum(axis=0)   # (C,)
    if db is not None:
        db += dy.reshape(-1, dy.shape[-1]).sum(axis=0)         # (C,)
    C = dy.shape[-1]
    g = dy * w                                                 # (B, T, C) dL/dxhat
    g_mean = g.sum(axis=-1, keepdims=True)                     # (B, T, 1)
    g_mean /= C                                                # mean_c(g) (sum / C, as np.mean)
    gx_mean = (g * xhat).sum(axis=-1, keepdims=True)           # (B, T, 1)
    gx_mean /= C                                               # mean_c(g * xhat)
    g -= g_mean
    g -= xhat * gx_mean
    g *= rstd                                                  # dx, in place (B, T, C)
    return g
