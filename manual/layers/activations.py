"""Activations of the feed-forward layer: relu, gelu (exact, erf) and gelu_tanh, forward and backward.

    relu(x)      = max(x, 0)                                    relu'(x) = 1 if x > 0 else 0 (0 at x == 0)
    gelu(x)      = 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x)       gelu'(x) = Phi(x) + x phi(x)
                   Phi(x) = 0.5 (1 + erf(x / sqrt 2)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi): the standard
                   normal distribution and density; erf from manual/layers/special.py (NumPy has none)
    gelu_tanh(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
                   gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t = tanh(u)

All functions are elementwise, any shape (the MLP calls them on (B, T, F)), and return the
input's dtype.

Caches (what backward needs, see manual/layers/mlp.py for who holds them):
    relu       ReluCache(y): the output (relu'(x) = [y > 0], so the input is not needed)
    gelu       GeluCache(x, y): the input and the output (y is the MLP's c_proj input anyway; Phi(x) = y / x)
    gelu_tanh  GeluTanhCache(x): the input (the derivative is a function of x)

`ws` (manual/layers/workspace.py): with a Workspace the output and dx are the layer's named arrays
and every intermediate goes into shared scratch arrays, updated in place: GELU and its backward run
without a chain of temporaries (each `a * b + c` of the formula would otherwise be one fresh
(B, T, F) array). The plain formula is in each docstring; the in-place lines compute it operation for
operation in the same order, so the results are the same bits.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .special import CHUNK, erf, workspace
from .workspace import empty, out, scratch


class ReluCache(NamedTuple):
    y: np.ndarray              # (...) the output


class GeluCache(NamedTuple):
    x: np.ndarray              # (...) the input
    y: np.ndarray              # (...) the output


class GeluTanhCache(NamedTuple):
    x: np.ndarray              # (...) the input


# -- relu --------------------------------------------------------------------------------------

def relu_forward(x, ws=None):
    """y = max(x, 0).  (...) -> (...)."""
    y = np.maximum(x, 0, out=out(ws, "y", x.shape, x.dtype))  # (...) same dtype as x (0 is a weak scalar)
    return y, ReluCache(y)


def relu_backward(dy, cache, ws=None):
    """dx = dy * [x > 0] = dy * [y > 0]  (0 at x == 0, as PyTorch)."""
    positive = np.greater(cache.y, 0, out=scratch(ws, dy.shape, np.bool_))   # (...)
    return np.multiply(dy, positive, out=out(ws, "dx", dy.shape, dy.dtype))  # (...)


# -- gelu (erf) -------------------------------------------------------------------------------
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x, ws=None):
    """y = 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x).  (...) -> (...).

    float32 input is computed in float32, with erf's float32 path; y is then within a few ulp of
    x Phi(x), as any float32 evaluation of this formula (PyTorch's included).
    """
    y = erf(x, scale=_INV_SQRT2, offset=1.0, out=out(ws, "y", x.shape, x.dtype), ws=ws)  # (...) 1 + erf(x / sqrt 2)
    y *= x
    y *= 0.5                                                   # 0.5 x (1 + erf(x / sqrt 2))
    return y, GeluCache(x, y)


def gelu_backward(dy, cache, ws=None):
    """dx = dy * (Phi(x) + x phi(x)),  Phi(x) = 0.5 (1 + erf(x / sqrt 2)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    Phi(x) is recovered as y / x (0.5 at x == 0) rather than by evaluating erf again: y is cached
    anyway (the MLP's c_proj needs it), and erf would cost several float64 temporaries of the
    input's size (B*T*F each) at the moment the backward holds the most memory. y / x is Phi(x)
    to within 2 ulp wherever Phi(x) is a normal number (x > -13 in float32).
    Computed in the input's dtype, chunk by chunk into preallocated work arrays (speed, as erf).
    """
    x, y = cache.x, cache.y
    dx = empty(ws, "dx", x.shape, x.dtype)                     # (...) C order, so dxf below is a view
    xf, yf, dyf, dxf = x.reshape(-1), y.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    cdfw, pdfw = workspace(xf.size, 2, x.dtype, ws)
    (nzw,) = workspace(xf.size, 1, np.bool_, ws)
    for start in range(0, xf.size, CHUNK):
        sl, n = slice(start, start + CHUNK), min(CHUNK, xf.size - start)
        xc, cdf, pdf, nz = xf[sl], cdfw[:n], pdfw[:n], nzw[:n]
        np.not_equal(xc, 0, out=nz)
        cdf.fill(0.5)
        np.divide(yf[sl], xc, out=cdf, where=nz)               # Phi(x) = y / x (0.5 at x == 0)
        np.multiply(xc, xc, out=pdf)
        pdf *= -0.5
        np.exp(pdf, out=pdf)
        pdf *= _INV_SQRT_2PI                                   # phi(x)
        pdf *= xc
        pdf += cdf                                             # Phi(x) + x phi(x)
        np.multiply(pdf, dyf[sl], out=dxf[sl])
    return dx                                                  # (...)


# -- gelu_tanh ---------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def _tanh_u(x, t):
    """t = tanh(sqrt(2/pi) (x + 0.044715 x x x)), computed in place in t (x's shape)."""
    np.multiply(x, _GELU_K, out=t)                             # 0.044715 x
    t *= x
    t *= x                                                     # 0.044715 x x x
    t += x
    t *= _SQRT_2_OVER_PI                                       # u
    return np.tanh(t, out=t)


def gelu_tanh_forward(x, ws=None):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).  (...) -> (...).

    Plain form:  t = np.tanh(sqrt(2/pi) * (x + 0.044715 * x * x * x));  y = 0.5 * x * (1.0 + t)
    """
    t = _tanh_u(x, np.empty_like(x) if ws is None else scratch(ws, x.shape, x.dtype))   # (...)
    t += 1.0
    y = np.multiply(x, 0.5, out=out(ws, "y", x.shape, x.dtype))   # 0.5 x
    y *= t                                                     # 0.5 x (1 + t)
    return y, GeluTanhCache(x)                                 # (...)


def gelu_tanh_backward(dy, cache, ws=None):
    """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)).

    Plain form:  du = sqrt(2/pi) * (1.0 + 3.0 * 0.044715 * x * x)
                 dx = dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
    t is recomputed: caching it would cost B*T*F more.
    """
    x = cache.x
    t, du, b, tt = (np.empty_like(x) if ws is None else scratch(ws, x.shape, x.dtype, slot) for slot in range(4))
    _tanh_u(x, t)                                              # (...) t
    np.multiply(x, 3.0 * _GELU_K, out=du)
    du *= x
    du += 1.0
    du *= _SQRT_2_OVER_PI                                      # du
    np.multiply(t, t, out=tt)
    np.subtract(1.0, tt, out=tt)                               # 1 - t t
    np.multiply(x, 0.5, out=b)                                 # 0.5 x
    b *= tt
    b *= du                                                    # 0.5 x (1 - t t) du
    t += 1.0
    t *= 0.5                                                   # 0.5 (1 + t)
    t += b
    return np.multiply(dy, t, out=out(ws, "dx", x.shape, x.dtype))   # (...)



ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
}
