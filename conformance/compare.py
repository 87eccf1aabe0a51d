"""One comparison function for every pair of tensors in the project.

`compare(a, b, ...)` checks shape, then dtype, then values, and returns a `Comparison`
with everything a person needs to judge the result: max absolute error, max relative
error, the worst index and both values there, the tolerance applied at that index, and the
verdict. `a` is the implementation under test (manual, or a user's dump), `b` the reference.

max_rel, the one definition used by every report, table and JSON of the project:

    max_rel = max |a - b| / max(scale, floor)      scale = max |b| over the finite elements

the worst error relative to the TENSOR's scale, not per element (per element, |a - b| / |b|
explodes where b is ~0: 5e+287 on rows that pass). The floor is the dtype's absolute
tolerance (float32 1e-5; float64 and integers: the smallest normal float64 resp. 1), so an
all-zero reference never divides by zero. On a passing float64 row max_rel <= 1e-9; on a
passing float32 row it is at most about 1.

Tolerances come from the dtype (docs/conformance.md, "Tolerances"):

    float64: every element within 1e-9 of the tensor's scale, |a - b| <= 1e-9 * max(|b|)
             (atol = 1e-9 * scale, rtol = 0). Relative to the scale, not per element:
             an element that is 1e-12 in a tensor of scale 1 is noise, not signal.
    float32: torch.testing's float32 table, |a - b| <= atol + rtol * |b| elementwise with
             atol = 1e-5, rtol = 1.3e-6.

A wider tolerance is allowed only per tensor and only with a written reason
(`widen=(factor, reason)`); the reason travels into the report.

The debugger's judges (tools/layerdiff) take their tolerances from here too:

    recomputation   one side against a float64 recomputation of the same step (an optimizer
                    update, global-norm clipping): |got - want| <= RECOMPUTE_REL_TO_SCALE[dtype]
                    * max |want| (`compare_recomputed`);
    finite differences  a layer's backward along random directions: relative error
                    <= FD_REL_TOL (float64 layers, central differences);
    two wrong sides the side whose error/tolerance is BLAME_RATIO times the other's is the
                    one to blame; closer than that, both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

F64_REL_TO_SCALE = 1e-9
F32_RTOL = 1.3e-6
F32_ATOL = 1e-5
TINY = np.finfo(np.float64).tiny
RECOMPUTE_REL_TO_SCALE = {"float64": 1e-9, "float32": 1e-5}
FD_REL_TOL = 1e-6          # |<g, v> - fd| <= FD_REL_TOL * scale of the directional derivative
BLAME_RATIO = 100.0        # badness ratio that singles out one of two disagreeing sides


def rel_floor(dtype) -> float:
    """The scale below which max_rel stops dividing by the scale (see the module docstring)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return F32_ATOL
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return 1.0
    return TINY


def relative_error(max_abs: float, scale: float, dtype) -> float:
    """max_rel = max_abs / max(scale, rel_floor(dtype)); 0 when nothing differs."""
    if max_abs == 0:
        return 0.0
    return max_abs / max(scale, rel_floor(dtype))


@dataclass(frozen=True)
class Tolerance:
    rtol: float      # times |b| per element
    atol: float      # absolute, per element
    rule: str        # human-readable rule

    def widened(self, factor: float) -> "Tolerance":
        return Tolerance(self.rtol * factor, self.atol * factor, f"{self.rule} x{factor:g}")


def tolerance_for(dtype, scale: float) -> Tolerance:
    """The tolerance a tensor of this dtype and scale (max |b|) gets."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return Tolerance(0.0, F64_REL_TO_SCALE * scale, f"|a-b| <= 1e-9 * scale ({scale:.3g})")
    if dtype == np.float32:
        return Tolerance(F32_RTOL, F32_ATOL, "|a-b| <= 1e-5 + 1.3e-6 * |b|")
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return Tolerance(0.0, 0.0, "exact")
    raise ValueError(f"no tolerance rule for dtype {dtype}; expected float32, float64 or an integer type")


@dataclass
class Comparison:
    config: str                  # label of the configuration
    check: str                   # category: param_count, logits, loss, activation, activation_grad, param_grad,
                                 # optimizer, generation, memory
    tensor: str                  # canonical name (or what was compared)
    passed: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    tol: float = 0.0             # the allowed |a - b| at the worst element
    rule: str = ""
    shape: tuple = ()
    dtype: str = ""
    worst_index: tuple = ()
    a_value: float = 0.0         # implementation under test at the worst index
    b_value: float = 0.0         # reference at the worst index
    scale: float = 0.0
    note: str = ""               # shape/dtype problems, widening reasons, ...
    step: int | None = None      # optimizer step, generation position, ...
    extra: dict = field(default_factory=dict)
    layer: str = ""              # failing rows of the walk (external.compare_tensors): the layer(s) that wrote
                                 # the tensor, conformance/graph.py `where`

    @property
    def badness(self) -> float:
        """max_abs / tol: above 1 fails; inf for a nonzero error where nothing is allowed."""
        if self.tol > 0:
            return self.max_abs / self.tol
        return math.inf if self.max_abs > 0 else 0.0

    def as_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        for k in ("max_abs", "max_rel", "tol", "a_value", "b_value", "scale"):
            v = d[k]
            d[k] = None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)
        return d

    def line(self) -> str:
        where = f"[{self.step}]" if self.step is not None else ""
        verdict = "OK" if self.passed else "FAIL"
        text = (f"{self.config:<28} {self.check:<15} {self.tensor + where:<38} "
                f"max_abs {self.max_abs:9.2e}  max_rel {self.max_rel:9.2e}  tol {self.tol:9.2e}  {verdict}")
        if not self.passed:
            if self.worst_index or self.shape:
                text += f"  at {tuple(self.worst_index)}: {self.a_value!r} vs {self.b_value!r}"
            if self.note:
                text += f"  ({self.note})"
        return text


def missing() -> np.ndarray:
    """Stands in for a tensor one side does not have: a shape that never matches, so the row
    reports a shape mismatch instead of a KeyError."""
    return np.full((0,), np.nan)


def compare(a, b, *, tensor: str, check: str, config: str = "", step: int | None = None,
            widen: tuple[float, str] | None = None, expect_dtype=None, note: str = "") -> Comparison:
    """Compare the implementation under test `a` against the reference `b`.

    Order of checks: shape, then dtype (both must equal `expect_dtype` when given, else each
    other), then values. Non-finite values fail unless both sides have the identical value
    (same inf); NaN never passes.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    want = np.dtype(expect_dtype) if expect_dtype is not None else b.dtype
    problem = _shape_or_dtype(a, b, want)
    return _values(a, b, want, tensor_rule=tolerance_for, tensor=tensor, check=check, config=config, step=step,
                   widen=widen, note=note, problem=problem)


def compare_recomputed(got, want, *, tensor: str, check: str, config: str = "", step: int | None = None,
                       note: str = "") -> Comparison:
    """One side's `got` (float32 or float64) against a float64 recomputation `want` of the same
    step: |got - want| <= RECOMPUTE_REL_TO_SCALE[got's dtype] * max |want|. Used by the debugger's
    judges, where `want` is exact up to float64 rounding and `got` carries its own dtype's."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    problem = _shape_or_dtype(got, want, None)

    def rule(dtype, scale):
        key = str(np.dtype(dtype))
        if key not in RECOMPUTE_REL_TO_SCALE:
            raise ValueError(f"no recomputation tolerance for dtype {key}; expected float32 or float64")
        rel = RECOMPUTE_REL_TO_SCALE[key]
        return Tolerance(0.0, rel * scale, f"|got-want| <= {rel:g} * scale ({scale:.3g})")

    return _values(got, want, got.dtype, tensor_rule=rule, tensor=tensor, check=check, config=config, step=step,
                   widen=None, note=note, problem=problem)


def _shape_or_dtype(a, b, want) -> str:
    """What makes the values incomparable, or ''. `want` None: the dtypes are not checked."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
    if want is not None and (a.dtype != want or b.dtype != want):
        return f"dtype {a.dtype} vs reference {b.dtype}, expected {want}"
    return ""


def _values(a, b, want, *, tensor_rule, tensor, check, config, step, widen, note, problem) -> Comparison:
    """The value comparison behind compare / compare_recomputed; tensor_rule(dtype, scale) -> Tolerance."""
    base = dict(config=config, check=check, tensor=tensor, step=step, shape=tuple(b.shape), dtype=str(b.dtype))
    if problem:
        return Comparison(passed=False, note=problem, max_abs=math.inf, max_rel=math.inf, **base)
    if a.size == 0:
        return Comparison(passed=True, note="empty", **base)
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    finite_b = np.isfinite(b64)
    scale = float(np.max(np.abs(b64[finite_b]))) if finite_b.any() else 0.0
    tol = tensor_rule(want, scale)
    if widen is not None:
        factor, reason = widen
        tol = tol.widened(factor)
        note = (note + "; " if note else "") + f"widened x{factor:g}: {reason}"
    with np.errstate(invalid="ignore", over="ignore"):
        same_nonfinite = (a64 == b64) & ~np.isfinite(b64)       # identical +-inf on both sides
        err = np.where(same_nonfinite, 0.0, np.abs(a64 - b64))
        err = np.where(np.isnan(err), np.inf, err)              # NaN anywhere is an infinite error
        allowed = tol.atol + tol.rtol * np.where(np.isfinite(b64), np.abs(b64), 0.0)
        # worst element: the one furthest past (or closest to) its allowance
        excess = np.where(allowed > 0, err / np.where(allowed > 0, allowed, 1.0), np.where(err > 0, np.inf, 0.0))
    flat = int(np.argmax(excess)) if np.any(excess > 0) else int(np.argmax(err))
    idx = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    passed = bool(np.all(err <= allowed))
    max_abs = float(np.max(err))
    return Comparison(passed=passed, max_abs=max_abs, max_rel=relative_error(max_abs, scale, want),
                      tol=float(allowed.reshape(-1)[flat]), rule=tol.rule, worst_index=idx,
                      a_value=a64.reshape(-1)[flat].item(), b_value=b64.reshape(-1)[flat].item(),
                      scale=scale, note=note, **base)


def compare_exact(a, b, *, tensor: str, check: str, config: str = "", step: int | None = None,
                  note: str = "") -> Comparison:
    """Integers, counts, token ids, bytes: equal or not. Scalars or arrays."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        return Comparison(config=config, check=check, tensor=tensor, passed=False, step=step,
                          note=f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}",
                          max_abs=math.inf, max_rel=math.inf, shape=tuple(b.shape))
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    passed = bool(np.all(diff == 0))
    flat = int(np.argmax(diff)) if diff.size else 0
    idx = tuple(int(i) for i in np.unravel_index(flat, a.shape)) if a.ndim else ()
    av = a.reshape(-1)[flat].item() if a.size else 0
    bv = b.reshape(-1)[flat].item() if b.size else 0
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(b.astype(np.float64)).max()) if b.size else 0.0
    return Comparison(config=config, check=check, tensor=tensor, passed=passed,
                      max_abs=max_abs, max_rel=relative_error(max_abs, scale, np.int64), tol=0.0, rule="exact",
                      shape=tuple(b.shape), dtype=str(b.dtype), worst_index=idx, a_value=av, b_value=bv,
                      note=note, step=step)
