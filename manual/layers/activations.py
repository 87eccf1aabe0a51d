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
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .special import CHUNK, erf, workspace


class ReluCache(NamedTuple):
    y: np.ndarray              # (...) the output


class GeluCache(NamedTuple):
    x: np.ndarray              # (...) the input
    y: np.ndarray              # (...) the output


class GeluTanhCache(NamedTuple):
    x: np.ndarray              # (...) the input


# -- relu --------------------------------------------------------------------------------------

def relu_forward(x):
    """y = max(x, 0).  (...) -> (...)."""
    y = np.maximum(x, 0)                                      # (...) same dtype as x (0 is a weak scalar)
    return y, ReluCache(y)


def relu_backward(dy, cache):
    """dx = dy * [x > 0] = dy * [y > 0]  (0 at x == 0, as PyTorch)."""
    return dy * (cache.y > 0)                                 # (...)


# -- gelu (erf) -------------------------------------------------------------------------------
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x):
    """y = 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x).  (...) -> (...).

    float32 input is computed in float32, with erf's float32 path; y is then within a few ulp of
    x Phi(x), as any float32 evaluation of this formula (PyTorch's included).
    """
    y = erf(x, scale=_INV_SQRT2, offset=1.0)                   # (...) 1 + erf(x / sqrt 2), x's dtype
    y *= x
    y *= 0.5                                                   # 0.5 x (1 + erf(x / sqrt 2))
    return y, GeluCache(x, y)


def gelu_backward(dy, cache):
    """dx = dy * (Phi(x) + x phi(x)),  Phi(x) = 0.5 (1 + erf(x / sqrt 2)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    Phi(x) is recovered as y / x (0.5 at x == 0) rather than by evaluating erf again: y is cached
    anyway (the MLP's c_proj needs it), and erf would cost several float64 temporaries of the
    input's size (B*T*F each) at the moment the backward holds the most memory. y / x is Phi(x)
    to within 2 ulp wherever Phi(x) is a normal number (x > -13 in float32).
    Computed in the input's dtype, chunk by chunk into preallocated work arrays (speed, as erf).
    """
    x, y = cache.x, cache.y
    dx = np.empty(x.shape, dtype=x.dtype)                      # (...) C order, so dxf below is a view
    xf, yf, dyf, dxf = x.reshape(-1), y.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    cdfw, pdfw = workspace(xf.size, 2, x.dtype)
    (nzw,) = workspace(xf.size, 1, np.bool_)
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


def gelu_tanh_forward(x):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).  (...) -> (...)."""
    t = np.tanh(_SQRT_2_OVER_PI * (x + _GELU_K * x * x * x))   # (...)
    return 0.5 * x * (1.0 + t), GeluTanhCache(x)               # (...)


def gelu_tanh_backward(dy, cache):
    """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2))."""
    x = cache.x
    t = np.tanh(_SQRT_2_OVER_PI * (x + _GELU_K * x * x * x))   # (...) recomputed: caching t would cost B*T*F more
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_K * x * x)       # (...)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)  # (...)


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
}
