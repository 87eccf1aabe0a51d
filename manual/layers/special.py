"""Special functions NumPy lacks: the error function erf, elementwise (the one GELU uses).

    erf(x) = 2 / sqrt(pi) * integral_0^x exp(-t^2) dt          odd: erf(-x) = -erf(x)

`erf(x, scale=s, offset=c)` returns c + erf(s x) in x's dtype (float32 or float64, any shape).
GELU calls it as erf(x, scale=1/sqrt 2, offset=1) = 1 + erf(x / sqrt 2): folding the scale in saves
a temporary, and folding the offset in keeps 1 + erf accurate where erf is near -1 (see `erf`).

Algorithm: fdlibm (Sun Microsystems, 1993) s_erf.c, on five intervals of |x|, each a rational
approximation of degree <= 8 whose error is below 1 ulp of float64:
    [0, 0.84375)        erf(x) = x + x * P(x^2) / Q(x^2)                  (Taylor-like around 0)
    [0.84375, 1.25)     erf(x) = erx + P(s) / Q(s),  s = |x| - 1          (erx = erf(1) rounded to 24 bits)
    [1.25, 1/0.35)      erfc(x) = exp(-x^2 - 0.5625 + R(1/x^2) / S(1/x^2)) / x
    [1/0.35, 6)         the same with a second (R, S) pair
    [6, inf)            erf(x) = 1 (erfc(6) < 2^-53)
In the erfc branches exp(-x^2 - 0.5625 + ...) is evaluated as exp(-z^2 - 0.5625) *
exp((z - x)(z + x) + R/S) with z = x rounded to its upper 32 bits, so that z^2 is exact and no
accuracy is lost in x^2 (the trick that makes it accurate to 1 ulp).

float32 input, |x| < 0.84375 (most of a GELU's inputs): evaluated in float32 with a degree-5
polynomial of its own, erf(x) = x + x y(x^2) (minimax fit of erf(x)/x - 1 on [0, 0.84375^2],
coefficients rounded to float32; fit error 1e-8 absolute, 0.17 ulp of float32). The small
correction x y is added last, so the float32 roundings cost < 1 ulp: checked exhaustively, every
float32 in [2^-30, 0.84375) is within 1 ulp of float32(erf(x)) (94 % exactly equal);
tests/test_layers.py samples it. The other intervals are evaluated in float64 and rounded once.
"""
from __future__ import annotations

import numpy as np

from .workspace import scratch

_ERX = 8.45062911510467529297e-01
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
# the float32 polynomial y of the first interval (see the module docstring)
_ERF32_SMALL = (0.12837916612625122, -0.3761258125305176, 0.11282824724912643, -0.026807019487023354,
                0.005058677401393652, -0.0006359994877129793)
_SMALL = 0.84375 * 0.84375          # x^2 below this: the first interval (729/1024, exact in float32)


def erf(x: np.ndarray, *, scale: float = 1.0, offset: float = 0.0, out=None, ws=None) -> np.ndarray:
    """offset + erf(scale * x), elementwise; x float32 or float64, any shape; returns x's dtype.

    Accuracy: float64 within ~1 ulp of the exact value. float32: within 1 ulp where |scale x| <
    0.84375 (float32 arithmetic), elsewhere the float64 value (offset included) rounded once.
    Rounding once matters for offset = 1: near erf = -1, 1 + erf(u) = erfc(-u) is tiny, and a
    float32 erf rounded BEFORE the 1 is added would leave it with a relative error of up to
    ~3e-8 / erfc(-u) (5e-4 at u = -2.8).
    Speed: the first interval's formula is evaluated on every entry in chunks of CHUNK entries
    (the ~20 passes of its polynomials stay in the L2 cache); the entries of the other intervals
    (the tails) are then gathered once and evaluated together. nan stays nan, +-inf gives
    offset +- 1. `out` (x's shape and dtype) receives the result; `ws` (a Workspace) lends the
    chunk scratch arrays (manual/layers/workspace.py; None: fresh ones).
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"erf takes a float32 or float64 array, got dtype {x.dtype}")
    scale, offset = float(scale), float(offset)                # Python floats: weak, keep x's dtype
    small = _small_f32 if x.dtype == np.float32 else _small_f64
    xf = x.reshape(-1)                                         # (N,)
    result = np.empty(x.shape, dtype=x.dtype) if out is None else out
    out = result.reshape(-1)                                   # (N,) view
    u, z, q = workspace(xf.size, 3, x.dtype, ws)
    tails = []
    with np.errstate(over="ignore", invalid="ignore"):         # see _small_f64: overwritten entries only
        for start in range(0, xf.size, CHUNK):
            n = min(CHUNK, xf.size - start)
            np.multiply(xf[start:start + n], scale, out=u[:n])   # scale x
            e = out[start:start + n]
            tails.append(small(u[:n], e, z[:n], q[:n]) + start)  # erf, but for the tails
            e += offset
    tail = np.concatenate(tails) if tails else np.empty(0, dtype=np.intp)
    if tail.size:                                              # |scale x| >= 0.84375: the other intervals
        ut = xf[tail].astype(np.float64)
        ut *= scale
        e = _tails(ut)
        e += offset
        out[tail] = e                                          # float64 -> x's dtype, explicit cast
    return result


# Speed: CHUNK entries per pass, every pass writing into a few preallocated work arrays of one
# chunk each (256 kB in float64): they stay in the L2 cache, and no pass allocates (fresh arrays
# above ~128 kB are mmap-ed and page-faulted in by the OS on every call, which costs more than
# the arithmetic). GELU's backward uses the same chunks.
CHUNK = 32768


def workspace(n: int, count: int, dtype, ws=None) -> list[np.ndarray]:
    """`count` scratch arrays for chunks of up to min(n, CHUNK) entries: fresh ones, or with a
    Workspace `ws` its shared scratch arrays (slots 0 .. count - 1)."""
    if ws is None:
        return [np.empty(min(n, CHUNK), dtype=dtype) for _ in range(count)]
    return [scratch(ws, (min(n, CHUNK),), dtype, slot) for slot in range(count)]


def _poly(coeffs, x, out=None):
    """c0 + c1 x + c2 x^2 + ... by Horner's rule, in x's dtype (one multiply and one add per degree)."""
    out = np.multiply(x, coeffs[-1], out=out)
    out += coeffs[-2]
    for c in coeffs[-3::-1]:
        out *= x
        out += c
    return out


def _small_f64(x, out, z, q):
    """out = x + x P(x^2) / Q(x^2) for every entry of the float64 chunk x; returns the indices
    (into x) of the entries with |x| >= 0.84375, whose value in `out` is NOT erf(x) and which
    the caller evaluates with `_tails`. z and q are scratch arrays of x's shape.

    The first interval's formula is odd, so it is evaluated on the signed x of EVERY entry (no abs,
    no gather, no copysign; a GELU's inputs lie mostly in |x| < 0.84375). Large |x| may overflow
    x^2 here (inf / inf = nan, under np.errstate in the caller): those entries are among the
    returned indices (x^2 >= 0.84375^2, exact in float64). nan stays nan and is not returned.
    """
    np.multiply(x, x, out=z)
    _poly(_PP, z, out=out)                                     # |x| < 0.84375: x + x P/Q
    out /= _poly(_QQ, z, out=q)
    out *= x
    out += x
    return np.flatnonzero(z >= _SMALL)


def _small_f32(x, out, z, _q):
    """As _small_f64 for a float32 chunk, in float32 arithmetic with the float32 polynomial
    (one polynomial, no division: the scratch array _q is not needed)."""
    np.multiply(x, x, out=z)
    _poly(_ERF32_SMALL, z, out=out)                            # Python floats are weak: stays float32
    out *= x
    out += x
    return np.flatnonzero(z >= _SMALL)


# Speed: the tails run in chunks of _TAIL_CHUNK entries, so that the temporaries of `_tail`, some
# forty, stay below the size that malloc maps fresh from the OS (64 kB of float64 each).
_TAIL_CHUNK = 8192


def _tails(x):
    """erf of a flat float64 array whose entries have |x| >= 0.84375 (erf(-x) = -erf(x))."""
    out = np.empty_like(x)
    for start in range(0, x.size, _TAIL_CHUNK):
        xc = x[start:start + _TAIL_CHUNK]
        out[start:start + _TAIL_CHUNK] = np.copysign(_tail(np.abs(xc)), xc)
    return out


def _tail(a):
    """erf(a) for a >= 0.84375 (a flat float64 array)."""
    out = np.ones_like(a)                                      # a >= 6 (and +inf): erf = 1
    m = np.flatnonzero(a < 1.25)                               # s = a - 1: erx + P/Q
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
