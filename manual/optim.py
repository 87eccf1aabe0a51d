"""Optimizers (SGD, AdamW) and gradient clipping with PyTorch's semantics, in NumPy.

The optimizers work on the model's live dictionaries, `{canonical name: ndarray}`:

    opt = AdamW(model.params, model.grads, lr=1e-3, groups=decay_groups(cfg, 0.1))
    loss = model.forward(ids, targets); model.backward()
    clip_grad_norm_(model.grads, 1.0)          # the blog post's gradient clipping by norm
    opt.step()                                  # updates model.params IN PLACE
    opt.zero_grad()                             # zeroes model.grads IN PLACE

Each update is written as the sequence of torch operations it mirrors (quoted in the comments),
from torch 2.13's single-tensor CPU path (`torch/optim/adam.py::_single_tensor_adam`,
`torch/optim/sgd.py::_single_tensor_sgd`, `torch/nn/utils/clip_grad.py`).

Two ways to compute AdamW (`AdamW(..., exact=...)`):
- exact=False (default): the formulas below in the arrays' own dtype, no temporaries of another
  dtype. When the gradients are views into one flat buffer (manual.Model's `grad_buffer`), the
  whole update runs over that buffer in cache-sized chunks (`_adamw_chunk`), with two scratch
  chunks the optimizer keeps. Per step that is ~12 NumPy calls per chunk plus 2 per parameter
  tensor, and no allocation; the per-tensor torch mirror is ~15 calls and ~6 temporaries per
  tensor. torch's CPU kernels fuse `lerp` and `addcmul` (one rounding, `vec::fmadd`); here they
  round twice, so float32 results land within a few ulp of torch's per step (tests/test_optim.py).
- exact=True: the per-tensor torch mirror (the exact branch of `AdamW._update`), bit-identical to torch in
  float32 once torch's sqrt is substituted (torch's CPU sqrt, MKL, is not correctly rounded:
  1 ulp off for about one float32 input in six). It reproduces torch's kernels in three details:
  1. a Python-float hyperparameter is rounded to the array's dtype before it touches the array
     (`p.mul_(1 - lr * wd)` multiplies by float32(1 - lr * wd)); the scalar arithmetic itself
     (1 - lr * wd, bias corrections, lr / bias_correction1) happens in Python floats (float64);
  2. fused multiply-adds (`add(other, alpha)`, `lerp`, `addcmul`) round once: `_fma` computes
     float32 ones in float64 (the product of two float32 numbers is exact there) and rounds once;
  3. the order of operations: `addcmul` is self + (value * t1) * t2, `addcdiv` is
     self + (value * t1) / t2, `scalar / tensor` is reciprocal(tensor) * scalar.
  The float64 temporaries of `_fma` cost memory (about 75 MiB per medium float32 step).
SGD always uses the exact per-tensor mirror (bit-identical to torch in float32). float64 agrees
with torch to ~1e-15 of each tensor's scale either way.

Arrays stay in their own dtype: a float32 model yields float32 parameters, gradients and state.
Where torch does not check an argument but a wrong value would silently corrupt training
(a negative clip value, groups that leave a parameter out), these functions raise instead.
Group validation, state_dict and the flat-buffer bookkeeping are in manual/optim_state.py.
"""
from __future__ import annotations

import math

import numpy as np

from .optim_state import FlatLayout, Optimizer

CHUNK = 32768      # elements per chunk of the fused AdamW / clipping: a few chunks of each array fit in L2


# ----------------------------------------------------------------------------------------------
# AdamW

class AdamW(Optimizer):
    """torch.optim.AdamW (amsgrad=False, maximize=False). Per parameter, the plain version:

        step += 1
        p = p * (1 - lr * weight_decay)                          decoupled weight decay
        exp_avg    = lerp(exp_avg, g, 1 - beta1)                 = beta1 * m + (1 - beta1) * g
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
        bias_correction1 = 1 - beta1 ** step;  bias_correction2 = 1 - beta2 ** step
        denom = sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps      (eps AFTER the square root)
        p = p - (lr / bias_correction1) * exp_avg / denom

    state[name] = {"step": int, "exp_avg": array, "exp_avg_sq": array}, created at the first step.
    exact: see the module docstring (False: same-dtype arithmetic, fused over a flat gradient
    buffer when there is one; True: the per-tensor torch mirror, bit-identical in float32).
    """

    kind = "AdamW"
    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: dict, grads: dict, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, groups: list[dict] | None = None, exact: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._check_hyperparameters(defaults, where="arguments")
        super().__init__(params, grads, groups, defaults)
        self.exact = bool(exact)
        self._fused = None           # _FusedAdamW: flat state, scratch and the chunk plan (built at a step)

    # -- the step: fused over the flat buffer when possible, else per tensor -------------------

    def _step(self) -> None:
        fused = self._fused_plan()
        if fused is None:
            super()._step()
        else:
            fused.step(self)

    def _update(self, name, p, g, group):
        """One parameter's update (the per-tensor path)."""
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        st["step"] += 1
        exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
        beta1, beta2, eps, step_size, bias_correction2_sqrt = _adamw_scalars(group, st["step"])
        one = p.dtype.type                      # Python-float scalars are rounded to this dtype
        if group["weight_decay"] != 0:
            # param.mul_(1 - lr * weight_decay)
            p *= one(1 - group["lr"] * group["weight_decay"])
        if not self.exact:
            update, scratch = np.empty_like(g), np.empty_like(g)
            _adamw_chunk(g, exp_avg, exp_avg_sq, update, scratch, beta1, beta2, eps, step_size,
                         bias_correction2_sqrt)
            p += update                          # param.addcdiv_(exp_avg, denom, value=-step_size)
            return
        # exact: the torch mirror, operation for operation (module docstring, points 1-3)
        # exp_avg.lerp_(grad, 1 - beta1)
        _lerp_(exp_avg, g, 1 - beta1)
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg_sq *= one(beta2)
        _addcmul_(exp_avg_sq, g, g, 1 - beta2)
        # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        denom = _sqrt(exp_avg_sq)
        denom /= one(bias_correction2_sqrt)
        denom += one(eps)
        # param.addcdiv_(exp_avg, denom, value=-step_size)
        _addcdiv_(p, exp_avg, denom, -step_size)

    def _fused_plan(self) -> "_FusedAdamW | None":
        """The fused path's plan when it applies, else None (then the per-tensor loop runs).

        It applies when exact is off, the per-tensor update is AdamW's own (a subclass that
        overrides `_update`, as tools/faults.py does to inject a bug, gets the per-tensor loop), the
        gradients tile one flat buffer (manual.Model's) and every parameter is one C-contiguous array
        (its update goes through a flat view). Groups may differ in every hyperparameter and
        parameters in their step counts: the plan cuts its chunks where they do."""
        if self.exact or type(self)._update is not AdamW._update:
            return None
        layout = self.flat_grads()
        if self._fused is None or not self._fused.still(self, layout):
            flat_params = all(isinstance(p, np.ndarray) and p.flags.c_contiguous for p in self.params.values())
            self._fused = _FusedAdamW(self, layout) if layout is not None and flat_params else None
        return self._fused

    # -- validation and state_dict details (the machinery is in manual/optim_state.py) ---------

    def _check_hyperparameters(self, h: dict, where: str) -> None:
        super()._check_hyperparameters(h, where)
        betas = tuple(h["betas"])
        if len(betas) != 2:
            raise ValueError(f"AdamW ({where}): betas must be two numbers, got {h['betas']!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"AdamW ({where}): invalid beta parameter at index {i}: {b!r}; "
                                 f"must be in [0, 1)")
        if not h["eps"] >= 0.0:
            raise ValueError(f"AdamW ({where}): invalid epsilon value eps={h['eps']!r}; must be >= 0")

    def _scalar_state(self) -> dict:
        return {"steps": {name: st["step"] for name, st in self.state.items()}}

    def _load_scalar_state(self, state: dict, meta: dict) -> list[str]:
        steps = meta.get("steps", {})
        problems = [f"meta['steps'] names {n!r}, which is not a parameter" for n in steps
                    if n not in self.params]
        for name in [n for n in self.params if n in steps or n in state]:
            have = sorted(state.get(name, {}))
            if name not in steps:
                problems.append(f"{name!r} has tensors {have} but no step in meta['steps']")
            elif have != ["exp_avg", "exp_avg_sq"]:
                problems.append(f"{name!r} has step {steps[name]} but tensors {have}; "
                                f"expected ['exp_avg', 'exp_avg_sq']")
            else:
                state[name]["step"] = int(steps[name])
        return problems


def _adamw_scalars(group: dict, step: int) -> tuple:
    """(beta1, beta2, eps, step_size, sqrt(bias_correction2)): Python floats, as in torch's
    non-capturable path (bias_correction_i = 1 - beta_i ** step, step_size = lr / bias_correction1)."""
    beta1, beta2 = group["betas"]
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = group["lr"] / bias_correction1
    return beta1, beta2, group["eps"], step_size, bias_correction2 ** 0.5


def _adamw_chunk(g, m, v, out, scratch, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    """AdamW's moments, in place on m and v, and the update -step_size * m / denom into `out`.

    g, m, v, out, scratch: arrays of one shape and dtype (a chunk of the flat buffers, or one
    tensor); every scalar is rounded to that dtype first, as torch does. Weight decay and the
    final `p += out` are the caller's (they need the parameter tensor)."""
    one = g.dtype.type
    # exp_avg.lerp_(grad, 1 - beta1): m + w (g - m), or g + (w - 1)(g - m) when w >= 0.5 (ATen's lerp)
    w = one(1 - beta1)
    np.subtract(g, m, out=out)                                               # g - m
    if abs(w) < 0.5:
        out *= w
        m += out
    else:
        out *= w - one(1)
        np.add(g, out, out=m)
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): v beta2 + ((1 - beta2) g) g
    v *= one(beta2)
    np.multiply(g, one(1 - beta2), out=out)
    out *= g
    v += out
    # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    np.sqrt(v, out=out)
    out /= one(bias_correction2_sqrt)
    out += one(eps)
    # param.addcdiv_(exp_avg, denom, value=-step_size): the update is (-step_size m) / denom
    np.multiply(m, one(-step_size), out=scratch)
    np.divide(scratch, out, out=out)


class _FusedAdamW:
    """AdamW over a flat gradient buffer: exp_avg / exp_avg_sq are two flat buffers of the same
    layout (state[name] holds views into them, so state_dict and memory accounting see per-name
    arrays as before), and the update runs chunk by chunk (at most CHUNK elements) with two scratch
    chunks. Each chunk's update is added into the pieces of the parameter tensors it covers.

    A chunk lies within one run: consecutive parameters (in buffer order) whose groups have the same
    lr, betas and eps and that have taken the same number of steps, so that one set of scalars
    (`_adamw_scalars`) serves the whole chunk. Usually that is one run over the whole buffer; groups
    with their own lr, betas or eps, or a parameter with its own step count (a state loaded so),
    cut it into more. Weight decay is per parameter piece and cuts nothing.

    What it saves against the per-tensor loop: no allocation per step (the per-tensor path makes
    ~6 temporaries per tensor), ~12 NumPy calls per chunk instead of ~15 per tensor, and the
    chunks stay in cache across the ~10 passes AdamW makes over its arrays."""

    def __init__(self, opt: AdamW, layout: FlatLayout):
        buf = layout.buffer
        self.layout, self.grads = layout, buf
        self.params = {name: opt.params[name] for name, _, _ in layout.spans}
        problems = [q for name, p in self.params.items() for q in opt._grad_problems(name, p, opt.grads[name])]
        if problems:
            raise ValueError(f"{opt.kind}.step: " + "; ".join(problems))
        self.exp_avg, self.exp_avg_sq = np.zeros_like(buf), np.zeros_like(buf)
        self.views = {name: (self.exp_avg[lo:hi].reshape(opt.params[name].shape),
                             self.exp_avg_sq[lo:hi].reshape(opt.params[name].shape))
                      for name, lo, hi in layout.spans}
        n = min(CHUNK, buf.size)
        self.out, self.scratch = np.empty(n, buf.dtype), np.empty(n, buf.dtype)
        self.group_of = {name: i for i, g in enumerate(opt.groups) for name in g["names"]}
        self.runs: list[tuple[int, int]] | None = None   # [(first span, end span)] the chunks were cut for
        self.chunks: list = []
        # existing state (a previous per-tensor step, or load_state_dict) moves into the flat buffers
        for name, (m, v) in self.views.items():
            st = opt.state.get(name)
            if st is not None:
                m[...] = st["exp_avg"]
                v[...] = st["exp_avg_sq"]
                st["exp_avg"], st["exp_avg_sq"] = m, v

    def still(self, opt: AdamW, layout: FlatLayout | None) -> bool:
        """The plan fits the optimizer's current params, grads and state (any may have been replaced)."""
        return layout is self.layout and all(opt.params.get(n) is p for n, p in self.params.items()) and \
            all(opt.state[n]["exp_avg"] is m and opt.state[n]["exp_avg_sq"] is v
                for n, (m, v) in self.views.items() if n in opt.state)

    def _runs(self, opt: AdamW) -> list[tuple[int, int]]:
        """[(first span, end span)]: the maximal runs of consecutive spans with equal (lr, betas, eps, step)."""
        keys = []
        for name, _, _ in self.layout.spans:
            g = opt.groups[self.group_of[name]]
            keys.append((g["lr"], tuple(g["betas"]), g["eps"], opt.state[name]["step"]))
        cuts = [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]
        return list(zip([0, *cuts], [*cuts, len(keys)]))

    def _cut(self, runs: list[tuple[int, int]]) -> list:
        """The chunks of `runs`: [(lo, hi, run index, [(flat piece of a parameter, start, stop within
        the chunk, group index)])], each run cut every CHUNK elements from its start."""
        spans, chunks = self.layout.spans, []
        for r, (first, end) in enumerate(runs):
            run = spans[first:end]
            for lo in range(run[0][1], run[-1][2], CHUNK):
                hi = min(lo + CHUNK, run[-1][2])
                pieces = [(self.params[name].reshape(-1)[max(lo, a) - a:min(hi, b) - a], max(lo, a) - lo,
                           min(hi, b) - lo, self.group_of[name])
                          for name, a, b in run if a < hi and b > lo]
                chunks.append((lo, hi, r, pieces))
        return chunks

    def step(self, opt: AdamW) -> None:
        for name, (m, v) in self.views.items():
            st = opt.state.get(name)
            if st is None:                                       # its first step (or its state was deleted)
                m.fill(0)
                v.fill(0)
                st = opt.state[name] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
            st["step"] += 1
        runs = self._runs(opt)
        if runs != self.runs:                                    # the first step, or groups edited since
            self.runs, self.chunks = runs, self._cut(runs)
        spans = self.layout.spans
        scalars = [_adamw_scalars(opt.groups[self.group_of[spans[first][0]]], opt.state[spans[first][0]]["step"])
                   for first, _ in runs]
        one = self.grads.dtype.type
        decay = [one(1 - g["lr"] * g["weight_decay"]) for g in opt.groups]
        for lo, hi, r, pieces in self.chunks:
            out, scratch = self.out[:hi - lo], self.scratch[:hi - lo]
            _adamw_chunk(self.grads[lo:hi], self.exp_avg[lo:hi], self.exp_avg_sq[lo:hi], out, scratch, *scalars[r])
            for p, a, b, gi in pieces:
                if decay[gi] != 1:
                    p *= decay[gi]                               # param.mul_(1 - lr * weight_decay)
                p += out[a:b]                                    # param.addcdiv_(exp_avg, denom, value=-step_size)


# ----------------------------------------------------------------------------------------------
# SGD

class SGD(Optimizer):
    """torch.optim.SGD (maximize=False). Per parameter, with g its gradient:

        d_p = g + weight_decay * p                  (a new array; the grad buffer is untouched)
        if momentum != 0:
            buf = clone(d_p)                          on the first step (torch: no dampening then)
            buf = momentum * buf + (1 - dampening) * d_p      afterwards
            d_p = d_p + momentum * buf  if nesterov  else  buf
        p = p - lr * d_p

    state[name] = {"momentum_buffer": buf}, created at the first step and only when momentum != 0.
    """

    kind = "SGD"
    state_keys = ("momentum_buffer",)

    def __init__(self, params: dict, grads: dict, lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 groups: list[dict] | None = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay)
        self._check_hyperparameters(defaults, where="arguments")
        super().__init__(params, grads, groups, defaults)

    def _check_hyperparameters(self, h: dict, where: str) -> None:
        super()._check_hyperparameters(h, where)
        if not h["momentum"] >= 0.0:
            raise ValueError(f"SGD ({where}): invalid momentum={h['momentum']!r}; must be >= 0")
        if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise ValueError(f"SGD ({where}): Nesterov momentum requires a momentum and zero dampening "
                             f"(got momentum={h['momentum']!r}, dampening={h['dampening']!r})")

    def _update(self, name, p, g, group):
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        d_p = g
        if group["weight_decay"] != 0:
            # grad = grad.add(param, alpha=weight_decay)
            d_p = _add(g, p, group["weight_decay"])
        if momentum != 0:
            st = self.state.setdefault(name, {})
            buf = st.get("momentum_buffer")
            if buf is None:
                # buf = grad.detach().clone()
                buf = st["momentum_buffer"] = d_p.copy()
            else:
                # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                buf *= buf.dtype.type(momentum)
                buf[...] = _add(buf, d_p, 1 - dampening)
            if group["nesterov"]:
                # grad = grad.add(buf, alpha=momentum)
                d_p = _add(d_p, buf, momentum)
            else:
                d_p = buf
        # param.add_(grad, alpha=-lr)
        p[...] = _add(p, d_p, -lr)


# ----------------------------------------------------------------------------------------------
# gradient clipping

def _named(grads) -> list[tuple[str, np.ndarray]]:
    if isinstance(grads, dict):
        items = [(str(k), v) for k, v in grads.items()]
    elif isinstance(grads, np.ndarray):
        items = [("grads", grads)]
    else:
        items = [(f"grads[{i}]", g) for i, g in enumerate(grads)]
    bad = [n for n, g in items if not isinstance(g, np.ndarray) or g.dtype.kind != "f"]
    if bad:
        raise TypeError(f"gradients must be floating-point ndarrays; not so for {bad}")
    return items


def clip_grad_norm_(grads, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = True) -> float:
    """torch.nn.utils.clip_grad_norm_ on gradient arrays (a dict {name: array} or a list), in place.

        norms      = [norm(g, norm_type) for g in grads]        one norm per tensor
        total_norm = norm(norms, norm_type)                     the norm of the norms
        clip_coef  = min(max_norm / (total_norm + 1e-6), 1.0)
        g *= clip_coef                                          for every g, in g's dtype

    Returns the total norm BEFORE clipping, as a Python float. norm_type is a positive number
    or inf (max |g|). The 2-norm (the usual case) is the same number written as
    sqrt(sum of every g^2): dot products over CHUNK elements in the gradients' dtype, summed in
    float64 (no float64 copy of the gradients; about 1e-8 relative in float32), and when the
    gradients are views into one flat buffer (manual.Model's) it is one pass over that buffer
    and the scaling is one multiply. Other orders go tensor by tensor, accumulated in float64.
    torch sums in another order, so the returned norm may differ from torch's in the last bits.

    Differences from torch, on purpose: error_if_nonfinite defaults to True (a NaN/inf norm
    means a broken step), the error is a ValueError naming the non-finite tensors, and a
    negative or NaN max_norm raises (it would flip or poison every gradient).
    """
    items = _named(grads)
    max_norm = float(max_norm)
    norm_type = float(norm_type)
    if not max_norm >= 0.0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    if not norm_type > 0.0:
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type}")
    if not items:
        return 0.0
    dtype = np.result_type(*[g.dtype for _, g in items])
    flat = FlatLayout.of(grads) if isinstance(grads, dict) else None
    arrays = [flat.buffer] if flat is not None else [g for _, g in items]     # what gets scaled
    if norm_type == 2.0:
        total_norm = dtype.type(math.sqrt(sum(_sum_of_squares(a) for a in arrays)))
    else:
        norms = np.array([_norm(g, norm_type) for _, g in items], dtype=dtype)    # (n_tensors,)
        total_norm = dtype.type(_norm(norms, norm_type))
    if not np.isfinite(total_norm):
        if error_if_nonfinite:
            bad = [name for name, g in items if not np.all(np.isfinite(g))]
            raise ValueError(
                f"the total gradient norm (order {norm_type}) is {float(total_norm)}, so it cannot "
                f"be clipped; non-finite values in: {bad if bad else 'none (the norm overflowed)'}. "
                f"Lower the learning rate or find the layer that produced them "
                f"(error_if_nonfinite=False scales by the non-finite norm anyway, as torch does).")
    # clip_coef = max_norm / (total_norm + 1e-6); torch computes scalar / tensor as
    # reciprocal(tensor) * scalar, in the norm's dtype.
    clip_coef = (dtype.type(1) / (total_norm + dtype.type(1e-6))) * dtype.type(max_norm)
    clip_coef_clamped = min(clip_coef, dtype.type(1.0)) if not np.isnan(clip_coef) else clip_coef
    with np.errstate(invalid="ignore"):          # inf * 0 when scaling by a non-finite norm
        for g in arrays:
            g *= g.dtype.type(clip_coef_clamped)
    return float(total_norm)


def _sum_of_squares(x: np.ndarray) -> float:
    """sum(x**2) as a float: BLAS dot products over CHUNK elements, added up in float64."""
    flat = x.reshape(-1)                     # a view of a contiguous array (a copy otherwise)
    return math.fsum(float(np.dot(flat[i:i + CHUNK], flat[i:i + CHUNK])) for i in range(0, flat.size, CHUNK))


def _norm(x: np.ndarray, norm_type: float) -> float:
    """The norm_type-norm of x flattened, accumulated in float64."""
    a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
    if a.size == 0:
        return 0.0
    if math.isinf(norm_type):
        return float(a.max())
    if norm_type == 1.0:
        return float(a.sum())
    return float(np.sum(a ** norm_type) ** (1.0 / norm_type))


def clip_grad_value_(grads, clip_value: float) -> None:
    """torch.nn.utils.clip_grad_value_ (the blog post's clip_value): clamp every gradient in place
    to [-clip_value, clip_value]. NaN stays NaN, as in torch. Unlike torch, a negative or NaN
    clip_value raises (torch would silently set every gradient to -|clip_value|)."""
    items = _named(grads)
    clip_value = float(clip_value)
    if not clip_value >= 0.0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    for _, g in items:
        np.clip(g, g.dtype.type(-clip_value), g.dtype.type(clip_value), out=g)


# ----------------------------------------------------------------------------------------------
# torch's CPU kernels, one helper each for AdamW(exact=True) and SGD (module docstring)

def _fma(a, b, c):
    """a * b + c rounded once, like the fused multiply-add torch's vectorized kernels use.

    Returns an array of c's dtype. float32: exact product and sum in float64, one rounding to
    float32. float64: two roundings (NumPy has no wider type); at most 1 ulp from torch.
    """
    c = np.asarray(c)
    if c.dtype == np.float32:
        wide = np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)
        wide += c
        return wide.astype(np.float32)
    return a * b + c


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """torch's `start.lerp_(end, weight)` with a scalar weight, in place on start.

    ATen's lerp: weight w = dtype(weight);
        |w| <  0.5:  start + w * (end - start)          (one fused multiply-add)
        |w| >= 0.5:  end + (w - 1) * (end - start)      (same value, better rounding near w = 1)
    """
    w = start.dtype.type(weight)
    diff = end - start
    if abs(w) < 0.5:
        start[...] = _fma(w, diff, start)
    else:
        start[...] = _fma(w - start.dtype.type(1), diff, end)


def _addcmul_(self: np.ndarray, t1: np.ndarray, t2: np.ndarray, value: float) -> None:
    """torch's `self.addcmul_(t1, t2, value=value)`: self + (value * t1) * t2, in place."""
    self[...] = _fma(self.dtype.type(value) * t1, t2, self)


def _addcdiv_(self: np.ndarray, t1: np.ndarray, t2: np.ndarray, value: float) -> None:
    """torch's `self.addcdiv_(t1, t2, value=value)`: self + (value * t1) / t2, in place."""
    self += (self.dtype.type(value) * t1) / t2


def _add(self: np.ndarray, other: np.ndarray, alpha: float) -> np.ndarray:
    """torch's `self.add(other, alpha=alpha)`: other * alpha + self (fused), as a new array."""
    return _fma(other, self.dtype.type(alpha), self)


# np.sqrt is correctly rounded; torch's CPU sqrt (MKL VML) is not: it is 1 ulp off for about one
# float32 input in six. That is the ONLY operation in which AdamW differs from torch in float32.
# A module attribute, so that a test can substitute torch's sqrt and check every other
# operation bit for bit.
_sqrt = np.sqrt
