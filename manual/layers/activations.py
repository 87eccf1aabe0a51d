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


def _poly(coeffs, x, out=None):
    """c0 + c1 x + c2 x^2 + ... by Horner's rule, in x's dtype (one multiply and one add per degree)."""
    out = np.multiply(x, coeffs[-1], out=out)
    out += coeffs[-2]
    for c in coeffs[-3::-1]:
        out *= x
        out += c
    return out


# Speed: erf and gelu run over the input in chunks of _ERF_CHUNK entries, every pass writing into
# a few preallocated float64 work arrays of one chunk each (4 x 256 kB): the ~30 passes of the
# polynomials then stay in the L2 cache, and no pass allocates (fresh arrays above ~128 kB are
# mmap-ed and page-faulted in by the OS on every call, which costs more than the arithmetic).
_ERF_CHUNK = 32768


def _work(n, count, dtype=np.float64):
    """`count` scratch arrays for chunks of up to min(n, _ERF_CHUNK) entries."""
    return [np.empty(min(n, _ERF_CHUNK), dtype=dtype) for _ in range(count)]


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, accurate to ~1 ulp of float64 (any shape).

    float64 input is evaluated in float64. float32 input is evaluated in float64 and cast back
    explicitly: the result is then the float64 value correctly rounded to float32, the best a
    float32 erf can return (evaluating the polynomials in float32 would lose ~3 bits to
    cancellation near x = 0.84 and in the exp() of the erfc branches). Output dtype = input dtype.
    The input is processed in chunks of _ERF_CHUNK entries (speed: the temporaries stay in
    cache; memory: the float64 workspace is bounded by four chunks).
    """
    x = np.asarray(x)
    flat = x.reshape(-1)                                      # (N,)
    out = np.empty(flat.shape, dtype=x.dtype)                 # (N,)
    xw, ew, zw, qw = _work(flat.size, 4)
    tails = []
    with np.errstate(over="ignore", invalid="ignore"):        # see _erf_small: overwritten entries only
        for start in range(0, flat.size, _ERF_CHUNK):
            n = min(_ERF_CHUNK, flat.size - start)
            xc, e = xw[:n], ew[:n]
            np.copyto(xc, flat[start:start + n])              # x.dtype -> float64
            tails.append(_erf_small(xc, e, zw[:n], qw[:n]) + start)
            out[start:start + n] = e                          # float64 -> x.dtype, explicit cast
    tail = np.concatenate(tails) if tails else np.empty(0, dtype=np.intp)
    if tail.size:                                             # |x| >= 0.84375: the other intervals
        out[tail] = _erf_large(flat[tail].astype(np.float64))
    return out.reshape(x.shape)


def _erf_small(x, out, z, q):
    """out = x + x P(x^2) / Q(x^2) for every entry of the float64 chunk x; returns the indices
    (into x) of the entries with |x| >= 0.84375, whose value in `out` is NOT erf(x) and which
    the caller evaluates with `_erf_large`. z and q are scratch arrays of x's shape.

    Speed: the first interval's formula is odd, so it is evaluated on the signed x of EVERY
    entry (no abs, no gather, no copysign; a GELU's inputs lie mostly in |x| < 0.84375), and the
    few others are gathered once per call, not once per chunk. Large |x| may overflow x^2 here
    (inf / inf = nan, under np.errstate in the caller): those entries are among the returned
    indices (x^2 >= 0.84375^2, exact in float64). nan stays nan and is not returned.
    """
    np.multiply(x, x, out=z)
    _poly(_PP, z, out=out)                                    # |x| < 0.84375: x + x P/Q
    out /= _poly(_QQ, z, out=q)
    out *= x
    out += x
    return np.flatnonzero(z >= 0.84375 * 0.84375)


def _erf_large(x):
    """erf of a flat float64 array whose entries have |x| >= 0.84375 (erf(-x) = -erf(x)).

    In chunks of _ERF_TAIL_CHUNK entries (speed: the temporaries of `_erf_tail`, some forty, stay
    below the size that malloc maps fresh from the OS, which a large tail would pay for each)."""
    out = np.empty_like(x)
    for start in range(0, x.size, _ERF_TAIL_CHUNK):
        xc = x[start:start + _ERF_TAIL_CHUNK]
        out[start:start + _ERF_TAIL_CHUNK] = np.copysign(_erf_tail(np.abs(xc)), xc)
    return out


_ERF_TAIL_CHUNK = 8192  # 64 kB of float64 per temporary


def _erf_tail(a):
    """erf(a) for a >= 0.84375 (a flat float64 array, usually a small fraction of the input)."""
    out = np.ones_like(a)                                     # a >= 6 (and +inf): erf = 1
    m = np.flatnonzero(a < 1.25)                              # s = a - 1: erx + P/Q
    if m.size:
        s = a[m] - 1.0
        out[m] = _ERX + _poly(_PA, s) / _poly(_QA, s)
    for lo, hi, R, S in ((1.25, 1.0 / 0.35, _RA, _SA), (1.0 / 0.35, 6.0, _RB, _SB)):  # erf = 1 - erfc
        m = np.flatnonzero((a >= lo) & (a < hi))
        if m.size:
            xa = a[m]
            s = 1.0 / (xa * xa)
            z = (xa.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)  # upper 32 bits of x
            erfc = np.exp(-z * z - 0.5625) * np.exp((z - xa) * (z + xa) + _poly(R, s) / _poly(S, s)) / xa
            out[m] = 1.0 - erfc
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


# float32 erf on |x| < 0.84375, evaluated in float32: erf(x) = x + x y(x^2) with y a degree-5
# polynomial (minimax fit of erf(x)/x - 1 on [0, 0.84375^2], coefficients rounded to float32;
# fit error 1e-8 absolute, 0.17 ulp of float32). The small correction x y is added last, so
# the float32 roundings cost < 1 ulp: checked exhaustively, every float32 in [2^-30, 0.84375)
# is within 1 ulp of float32(erf(x)) (94 % exactly equal); tests/test_layers.py samples it.
_ERF32_SMALL = (0.12837916612625122, -0.3761258125305176, 0.11282824724912643, -0.026807019487023354,
                0.005058677401393652, -0.0006359994877129793)


def _erf_small_f32(x, out, z):
    """out = erf(x) for the entries of the float32 chunk x with |x| < 0.84375 (float32 arithmetic);
    returns the indices of the others (|x| >= 0.84375, x^2 overflow, ...), whose value in `out`
    is NOT erf(x) and which the caller evaluates with `_erf_large`. z: scratch of x's shape."""
    np.multiply(x, x, out=z)
    _poly(_ERF32_SMALL, z, out=out)                            # Python floats are weak: stays float32
    out *= x
    out += x
    return np.flatnonzero(z >= 0.84375 * 0.84375)              # 0.84375^2 = 729/1024, exact in float32


def gelu_forward(x):
    """y = 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x).  (...) -> (...); the cache is (x, y).

    Chunk by chunk into preallocated work arrays, like `erf` (speed). float64: evaluated as in
    `erf`. float32: evaluated in float32, with erf from `_erf_small_f32` (within 1 ulp) where
    |x / sqrt 2| < 0.84375 and from the float64 `_erf_large` elsewhere; y is then within a
    few ulp of x Phi(x), as any float32 evaluation of this formula (PyTorch's included).
    """
    y = np.empty(x.shape, dtype=x.dtype)                       # (...) C order, so yf below is a view
    xf, yf = x.reshape(-1), y.reshape(-1)                      # (N,)
    f32 = x.dtype == np.float32
    wdtype = np.float32 if f32 else np.float64
    uw, ew, zw, qw = _work(xf.size, 4, wdtype)
    tails = []
    with np.errstate(over="ignore", invalid="ignore"):         # see _erf_small
        for start in range(0, xf.size, _ERF_CHUNK):
            n = min(_ERF_CHUNK, xf.size - start)
            xc, u, e = xf[start:start + n], uw[:n], ew[:n]
            np.multiply(xc, _INV_SQRT2, out=u, dtype=wdtype)   # x / sqrt 2
            if f32:
                idx = _erf_small_f32(u, e, zw[:n])             # erf(x / sqrt 2), but for the tails
            else:
                idx = _erf_small(u, e, zw[:n], qw[:n])
            tails.append(idx + start)
            e += 1.0
            e *= xc
            np.multiply(e, 0.5, out=yf[start:start + n])       # 0.5 x (1 + erf(x / sqrt 2))
    tail = np.concatenate(tails) if tails else np.empty(0, dtype=np.intp)
    if tail.size:                                              # |x / sqrt 2| >= 0.84375: the same, with _erf_large
        xt = xf[tail].astype(np.float64)
        e = _erf_large(xt * _INV_SQRT2)
        e += 1.0
        e *= xt
        e *= 0.5
        yf[tail] = e                                           # float64 -> x's dtype, explicit cast
    return y, (x, y)


def gelu_backward(dy, cache):
    """dx = dy * (Phi(x) + x phi(x)),  Phi(x) = 0.5 (1 + erf(x / sqrt 2)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    Phi(x) is recovered as y / x (0.5 at x == 0) rather than by evaluating erf again: y is cached
    anyway (the MLP's c_proj needs it), and erf would cost several float64 temporaries of the
    input's size (B*T*F each) at the moment the backward holds the most memory. y / x is Phi(x)
    to within 2 ulp wherever Phi(x) is a normal number (x > -13 in float32).
    Computed in the input's dtype, chunk by chunk into preallocated work arrays (speed, as erf).
    """
    x, y = cache
    dx = np.empty(x.shape, dtype=x.dtype)                      # (...) C order, so dxf below is a view
    xf, yf, dyf, dxf = x.reshape(-1), y.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    cdfw, pdfw = _work(xf.size, 2, x.dtype)
    (nzw,) = _work(xf.size, 1, np.bool_)
    for start in range(0, xf.size, _ERF_CHUNK):
        sl, n = slice(start, start + _ERF_CHUNK), min(_ERF_CHUNK, xf.size - start)
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
