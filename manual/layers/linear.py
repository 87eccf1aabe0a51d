"""Linear layers: y = x @ W + b (weights stored [in, out]) and the output projection y = x @ W^T.

    linear:      y = x W + b        x (..., I), W (I, O), b (O,) or None  ->  y (..., O)
                 dx = dy W^T        dW += x^T dy (summed over every leading position)     db += sum dy
    unembedding: y = x W^T          x (..., C), W (V, C) (the [V, C] token table or lm_head)  ->  y (..., V)
                 dx = dy W          dW += dy^T x

Cache: LinearCache(x, W). x is the layer's input activation (kept for dW); W is a reference to
the parameter (no bytes of its own; memory accounting counts parameters separately).
Leading dimensions are flattened so every product is one matrix multiply (one BLAS call).

`ws` (manual/layers/workspace.py): None allocates every result (the plain path); a Workspace makes
each product write into the layer's named arrays instead (y, dx) and x^T dy into a shared scratch
before the +=, which saves one fresh array per product per step.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .workspace import out, scratch


class LinearCache(NamedTuple):
    """What a linear layer (or the unembedding) keeps for backward."""
    x: np.ndarray              # (..., I) the input, for dW
    W: np.ndarray              # the weight (the parameter itself, not a copy), for dx


def linear_forward(x, W, b=None, ws=None):
    """y = x @ W + b.   x (..., I), W (I, O), b (O,) -> y (..., O)."""
    x2 = x.reshape(-1, x.shape[-1])                            # (N, I) view, N = product of leading dims
    y = np.matmul(x2, W, out=out(ws, "y", (x2.shape[0], W.shape[1]), x.dtype))   # (N, O)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[1]), LinearCache(x, W)  # (..., O)


def linear_backward(dy, cache, dW, db=None, ws=None):
    """Returns dx; accumulates dW += x^T dy and db += sum(dy) into the caller's buffers."""
    x, W = cache.x, cache.W
    dy2 = dy.reshape(-1, dy.shape[-1])                         # (N, O) view
    x2 = x.reshape(-1, x.shape[-1])                            # (N, I) view
    dW += np.matmul(x2.T, dy2, out=scratch(ws, dW.shape, dW.dtype))   # (I, O)
    if db is not None:
        db += dy2.sum(axis=0)                                  # (O,)
    dx = np.matmul(dy2, W.T, out=out(ws, "dx", x2.shape, dy.dtype))   # (N, I)
    return dx.reshape(x.shape)                                 # (..., I)


def unembed_forward(x, W, ws=None):
    """y = x @ W^T.   x (..., C), W (V, C) -> y (..., V)."""
    x2 = x.reshape(-1, x.shape[-1])                            # (N, C) view
    y = np.matmul(x2, W.T, out=out(ws, "y", (x2.shape[0], W.shape[0]), x.dtype))  # (N, V)
    return y.reshape(*x.shape[:-1], W.shape[0]), LinearCache(x, W)  # (..., V)


def unembed_backward(dy, cache, dW, ws=None):
    """Returns dx = dy @ W; accumulates dW += dy^T x (note: [V, C], the transpose of a linear's dW)."""
    x, W = cache.x, cache.W
    dy2 = dy.reshape(-1, dy.shape[-1])                         # (N, V) view
    x2 = x.reshape(-1, x.shape[-1])                            # (N, C) view
    dW += np.matmul(dy2.T, x2, out=scratch(ws, dW.shape, dW.dtype))   # (V, C)
    dx = np.matmul(dy2, W, out=out(ws, "dx", x2.shape, dy.dtype))     # (N, C)
    return dx.reshape(x.shape)                                 # (..., C)
