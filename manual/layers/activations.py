"""Activations of the feed-forward layer: relu, gelu (exact, erf) and gelu_tanh, forward and backward.

    relu(x)      = max(x, 0)                                    relu'(x) = 1 if x > 0 else 0 (0 at x == 0)
    gelu(x)      = 0.5 x (1 + erf(x / sqrt 2))                  gelu'(x) = 0.5 (1 + erf(x / sqrt 2)) + x phi(x)
                   phi(x) = exp(-x^2 / 2) / sqrt(2 pi), the standard normal density
    gelu_tanh(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
                   gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t = tanh(u)

All functions are elementwise, any shape (the MLP calls them on (B, T, F)), and return the
input's dtype. NumPy has no erf, so `erf` below is written out (fdlibm's s_erf.c algorithm).

Caches (what backward needs, see manual/layers/mlp.py for who holds them):
    relu       the output y (relu'(x) = [y > 0], so the input is not needed)
    gelu       the input x and the output y (y is the MLP's c_proj input anyway; Phi(x) = y / x)
    gelu_tanh  the input x (the derivative is a function of x)
"""
from __future__ import annotations

import math

import numpy as np

# -- erf -------------------------------------------------------------------------------------
# fdlibm (Sun Microsystems, 1993) s_erf.c: erf on five intervals of |x|, each a rational
# approximation of degree <= 8 whose error is below 1 ulp of float64:
#   [0, 0.84375)        erf(x) = x + x * P(x^2) / Q(x^2)                  (Taylor-like around 0)
#   [0.84375, 1.25)     erf(x) = erx + P(s) / Q(s),  s = |x| - 1          (erx = erf(1) rounded to 24 bits)
#   [1.25, 1/0.35)      erfc(x) = exp(-x^2 - 0.5625 + R(1/x^2) / S(1/x^2)) / x
#   [1/0.35, 6)         the same with a second (R, S) pair
#   [6, inf)            erf(x) = 1 (erfc(6) < 2^-53)
# erf(-x) = -erf(x). In the erfc branches exp(-x^2 - 0.5625 + ...) is evaluated as
# exp(-z^2 - 0.5625) * exp((z - x)(z + x) + R/S) with z = x rounded to its upper 32 bits, so
# that z^2 is exact and no accuracy is lost in x^2 (the trick that makes it accurate to 1 ulp).
_ERX = 8.45062911510467529297e-01
_EFX = 1.28379167095512586316e-01
_PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
       -5.77027029648944159157e-03, -2.37630166566501626084e-05)
_QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
       1.32494738004321644526e-04, -3.96022827877536812320e-06)
_PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
       3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
       -2.16637559486879084300e-03)
_QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
       1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
_RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
       -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
       -8.12874355063065934246e+01, -9.81432934416914548592e+00)
_SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
       6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
       6.57024977031928170135e+00, -6.04244152148580987438e-02)
_RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
       -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
       -4.83519191608651397019e+02)
_SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
       3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
       -2.24409524465858183362e+01)


def _poly(coeffs, x):
    """c0 + c1 x + c2 x^2 + ... by Horner's rule (float64)."""
    out = np.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        out *= x
        out += c
    return out


_ERF_CHUNK = 32768  # entries per pass: 256 kB of float64, so the ~40 passes of the polynomials stay in cache


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, accurate to ~1 ulp of float64 (any shape).

    float64 input is evaluated in float64. float32 input is evaluated in float64 and cast back
    explicitly: the result is then the float64 value correctly rounded to float32, the best a
    float32 erf can return (evaluating the polynomials in float32 would lose ~3 bits to
    cancellation near x = 0.84 and in the exp() of the erfc branches). Output dtype = input dtype.
    The input is processed in chunks of _ERF_CHUNK entries (speed: the temporaries stay in
    cache; memory: the float64 workspace is bounded by a few chunks).
    """
    x = np.asarray(x)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, dtype=x.dtype)                 # (N,)
    for start in range(0, flat.size, _ERF_CHUNK):
        chunk = flat[start:start + _ERF_CHUNK]
        out[start:start + _ERF_CHUNK] = _erf_chunk(chunk)      # float64 -> x.dtype, explicit cast
    return out.reshape(x.shape)


def _erf_chunk(x):
    """erf of a flat chunk, in float64 (the five intervals above, each on its own entries)."""
    a = np.abs(x, dtype=np.float64)                           # |x| in float64 (a new array)
    out = np.ones_like(a)                                     # |x| >= 6 (and +-inf): erf = 1
    out[np.isnan(a)] = np.nan
    m = np.flatnonzero(a < 0.84375)                           # |x| < 0.84375: |x| + |x| P/Q
    if m.size:
        xa = a[m]
        z = xa * xa
        out[m] = xa + xa * (_poly(_PP, z) / _poly(_QQ, z))
    m = np.flatnonzero((a >= 0.84375) & (a < 1.25))           # s = |x| - 1: erx + P/Q
    if m.size:
        s = a[m] - 1.0
        out[m] = _ERX + _poly(_PA, s) / _poly(_QA, s)
    m = np.flatnonzero((a >= 1.25) & (a < 6.0))               # erf = 1 - erfc
    if m.size:
        xa = a[m]
        s = 1.0 / (xa * xa)
        small = xa < 1.0 / 0.35
        r = np.where(small, _poly(_RA, s), _poly(_RB, s))
        q = np.where(small, _poly(_SA, s), _poly(_SB, s))
        z = (xa.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)  # upper 32 bits of x
        erfc = np.exp(-z * z - 0.5625) * np.exp((z - xa) * (z + xa) + r / q) / xa
        out[m] = 1.0 - erfc
    np.copysign(out, x, out=out)                              # erf(-x) = -erf(x)
    return out


# -- relu --------------------------------------------------------------------------------------

def relu_forward(x):
    """y = max(x, 0).  (...) -> (...); the cache is y itself (relu'(x) = [y > 0])."""
    y = np.maximum(x, 0)                                      # (...) same dtype as x (0 is a weak scalar)
    return y, y


def relu_backward(dy, y):
    """dx = dy * [x > 0] = dy * [y > 0]  (0 at x == 0, as PyTorch)."""
    return dy * (y > 0)                                       # (...)


# -- gelu (erf) -------------------------------------------------------------------------------
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x):
    """y = 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x).  (...) -> (...); the cache is (x, y)."""
    y = 0.5 * x * (1.0 + erf(x * _INV_SQRT2))                  # (...) Python floats are weak: dtype stays x's
    return y, (x, y)


def gelu_backward(dy, cache):
    """dx = dy * (Phi(x) + x phi(x)),  Phi(x) = 0.5 (1 + erf(x / sqrt 2)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    Phi(x) is recovered as y / x (0.5 at x == 0) rather than by evaluating erf again: y is cached
    anyway (the MLP's c_proj needs it), and erf would cost several float64 temporaries of the
    input's size (B*T*F each) at the moment the backward holds the most memory. y / x is Phi(x)
    to within 2 ulp wherever Phi(x) is a normal number (x > -13 in float32).
    """
    x, y = cache
    cdf = np.divide(y, x, out=np.full_like(x, 0.5), where=x != 0)  # (...) Phi(x)
    pdf = np.exp(-0.5 * x * x)                                 # (...)
    pdf *= _INV_SQRT_2PI                                       # phi(x)
    pdf *= x
    pdf += cdf                                                 # Phi(x) + x phi(x)
    pdf *= dy
    return pdf                                                 # (...)


# -- gelu_tanh ---------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def gelu_tanh_forward(x):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).  (...) -> (...); the cache is x."""
    t = np.tanh(_SQRT_2_OVER_PI * (x + _GELU_K * x * x * x))   # (...)
    return 0.5 * x * (1.0 + t), x                              # (...)


def gelu_tanh_backward(dy, x):
    """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2))."""
    t = np.tanh(_SQRT_2_OVER_PI * (x + _GELU_K * x * x * x))   # (...) recomputed: caching t would cost B*T*F more
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_K * x * x)       # (...)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)  # (...)


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
}
