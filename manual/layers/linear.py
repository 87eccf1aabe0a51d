"""Linear layers: y = x @ W + b (weights stored [in, out]) and the output projection y = x @ W^T.

    linear:      y = x W + b        x (..., I), W (I, O), b (O,) or None  ->  y (..., O)
                 dx = dy W^T        dW += x^T dy (summed over every leading position)     db += sum dy
    unembedding: y = x W^T          x (..., C), W (V, C) (the [V, C] token table or lm_head)  ->  y (..., V)
                 dx = dy W          dW += dy^T x

Cache: LinearCache(x, W). x is the layer's input activation (kept for dW); W is a reference to
the parameter (no bytes of its own; memory accounting counts parameters separately).
Leading dimensions are flattened so every product is one matrix multiply (one BLAS call).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LinearCache(NamedTuple):
    """What a linear layer (or the unembedding) keeps for backward."""
    x: np.ndarray              # (..., I) the input, for dW
    W: np.ndarray              # the weight (the parameter itself, not a copy), for dx


def linear_forward(x, W, b=None):
    """y = x @ W + b.   x (..., I), W (I, O), b (O,) -> y (..., O)."""
    y = x.reshape(-1, x.shape[-1]) @ W                         # (N, O), N = product of leading dims
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[1]), LinearCache(x, W)  # (..., O)


def linear_backward(dy, cache, dW, db=None):
    """Returns dx; accumulates dW += x^T dy and db += sum(dy) into the caller's buffers."""
    x, W = cache.x, cache.W
    dy2 = dy.reshape(-1, dy.shape[-1])                         # (N, O) view
    x2 = x.reshape(-1, x.shape[-1])                            # (N, I) view
    dW += x2.T @ dy2                                           # (I, O)
    if db is not None:
        db += dy2.sum(axis=0)                                  # (O,)
    return (dy2 @ W.T).reshape(x.shape)                        # (..., I)


def unembed_forward(x, W):
    """y = x @ W^T.   x (..., C), W (V, C) -> y (..., V)."""
    y = x.reshape(-1, x.shape[-1]) @ W.T                       # (N, V)
    return y.reshape(*x.shape[:-1], W.shape[0]), LinearCache(x, W)  # (..., V)


def unembed_backward(dy, cache, dW):
    """Returns dx = dy @ W; accumulates dW += dy^T x (note: [V, C], the transpose of a linear's dW)."""
    x, W = cache.x, cache.W
    dy2 = dy.reshape(-1, dy.shape[-1])                         # (N, V) view
    dW += dy2.T @ x.reshape(-1, x.shape[-1])                   # (V, C)
    return (dy2 @ W).reshape(x.shape)                          # (..., C)
