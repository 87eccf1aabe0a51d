"""Optimizers (SGD, AdamW) and gradient clipping with PyTorch's exact semantics, in NumPy.

The optimizers work on the model's live dictionaries, `{canonical name: ndarray}`:

    opt = AdamW(model.params, model.grads, lr=1e-3, groups=decay_groups(cfg, 0.1))
    loss = model.forward(ids, targets); model.backward()
    clip_grad_norm_(model.grads, 1.0)          # the blog post's gradient clipping by norm
    opt.step()                                  # updates model.params IN PLACE
    opt.zero_grad()                             # zeroes model.grads IN PLACE

Each update is written as the sequence of torch operations it mirrors (quoted in the comments),
taken from torch 2.13's single-tensor CPU path (`torch/optim/adam.py::_single_tensor_adam`,
`torch/optim/sgd.py::_single_tensor_sgd`, `torch/nn/utils/clip_grad.py`). To match torch to the
last bit in float32, three details of torch's CPU kernels are reproduced:

1. A Python-float hyperparameter is rounded to the array's dtype before it touches the array
   (`p.mul_(1 - lr * wd)` multiplies by float32(1 - lr * wd)); the scalar arithmetic itself
   (1 - lr * wd, bias corrections, lr / bias_correction1) happens in Python floats (float64).
2. `add(other, alpha)`, `lerp` and `addcmul` are computed by a fused multiply-add (`vec::fmadd`)
   that rounds once. `_fma` below reproduces that for float32 arrays by computing in float64
   (the product of two float32 numbers is exact in float64) and rounding once to float32. For
   float64 arrays NumPy has no wider type, so `_fma` rounds twice there: float64 results may
   differ from torch's in the last bit (the tests hold them to 1e-12 relative).
3. The order of operations: `addcmul` is self + (value * t1) * t2, `addcdiv` is
   self + (value * t1) / t2, `scalar / tensor` is reciprocal(tensor) * scalar.

Measured against torch 2.13 (CPU, AVX512) in tests/test_optim.py: SGD float32 is bit-identical
over many steps. AdamW float32 is bit-identical too once torch's own sqrt is substituted for
`_sqrt`; with NumPy's sqrt it is not, because torch's CPU sqrt (MKL) is not correctly rounded
(1 ulp off for about one float32 input in six), so each step lands within a few ulp of torch's.
float64 agrees to ~1e-15 of each tensor's scale.

Arrays stay in their own dtype: a float32 model yields float32 parameters, gradients and state.
The float64 temporaries inside `_fma` exist only to round once, as the FMA instruction does.

Where torch does not check an argument but a wrong value would silently corrupt training
(a negative clip value, groups that leave a parameter out), these functions raise instead;
each such place says so.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .checkpoint import OPTIM_PREFIX  # optimizer tensors in a checkpoint: optim.<state key>.<param name>


# ----------------------------------------------------------------------------------------------
# torch's CPU kernels, one helper each (see the module docstring, points 2 and 3)

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


# ----------------------------------------------------------------------------------------------
# the shared machinery: checked dictionaries, parameter groups, zero_grad, state_dict

class Optimizer:
    """Base class: holds the live params/grads dicts, the parameter groups and per-name state.

    params, grads   {name: ndarray}, the same keys, shapes and dtypes (float32 or float64).
                    The arrays are looked up by name at every step, and params are updated in place.
    groups          list of dicts, each {"names": [...], hyperparameter: value, ...}: the defaults
                    filled in for every hyperparameter a group does not set, as torch's
                    param_groups. Live: `opt.groups[0]["lr"] = 3e-4` takes effect at the next step.
    state           {name: {state key: value}} with torch's keys, created lazily at the first step.
    step_count      number of step() calls so far.

    Unlike torch, every parameter must belong to exactly one group: a parameter left out of
    every group would silently never train. To freeze one, give it a group with "lr": 0.0.
    """

    kind = "Optimizer"
    state_keys: tuple[str, ...] = ()      # array-valued state entries, saved as optim.<key>.<name>

    def __init__(self, params: dict, grads: dict, groups, defaults: dict):
        if not isinstance(params, dict) or not isinstance(grads, dict):
            raise TypeError(f"params and grads must be dicts {{name: ndarray}}; got "
                            f"{type(params).__name__} and {type(grads).__name__}")
        self.params = params
        self.grads = grads
        self.defaults = dict(defaults)
        self._check_arrays()
        self.groups = self._make_groups(groups)
        self.state: dict[str, dict] = {}
        self.step_count = 0

    # -- validation --------------------------------------------------------------------------

    def _check_arrays(self) -> None:
        problems = []
        missing = [n for n in self.params if n not in self.grads]
        extra = [n for n in self.grads if n not in self.params]
        if missing:
            problems.append(f"grads has no entry for {missing}")
        if extra:
            problems.append(f"grads has entries {extra} that are not in params")
        for name, p in self.params.items():
            if not isinstance(p, np.ndarray):
                problems.append(f"params[{name!r}] is a {type(p).__name__}, not an ndarray")
                continue
            if p.dtype not in (np.float32, np.float64):
                problems.append(f"params[{name!r}] has dtype {p.dtype}; expected float32 or float64")
            if not p.flags.writeable:
                problems.append(f"params[{name!r}] is read-only; the optimizer updates it in place")
            if name in self.grads:
                problems += self._grad_problems(name, p, self.grads[name])
        if problems:
            raise ValueError(f"{self.kind}: bad params/grads:\n  " + "\n  ".join(problems))

    @staticmethod
    def _grad_problems(name: str, p: np.ndarray, g) -> list[str]:
        if not isinstance(g, np.ndarray):
            return [f"grads[{name!r}] is a {type(g).__name__}, not an ndarray"]
        out = []
        if g.shape != p.shape:
            out.append(f"grads[{name!r}] has shape {g.shape} but params[{name!r}] has shape {p.shape}")
        if g.dtype != p.dtype:
            out.append(f"grads[{name!r}] has dtype {g.dtype} but params[{name!r}] has dtype {p.dtype}")
        return out

    def _make_groups(self, groups) -> list[dict]:
        if groups is None:
            groups = [{"names": list(self.params)}]
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
            raise TypeError(f"{self.kind}: groups must be a list of dicts like "
                            f"{{'names': [...], 'weight_decay': 0.0}}; got {groups!r:.200}")
        allowed = {"names", *self.defaults}
        owner: dict[str, int] = {}
        problems = []
        out = []
        for i, group in enumerate(groups):
            unknown = sorted(set(group) - allowed)
            if unknown:
                problems.append(f"group {i} has unknown keys {unknown}; allowed: {sorted(allowed)}")
            if "names" not in group:
                problems.append(f"group {i} has no 'names' list")
                continue
            names = list(group["names"])
            for name in names:
                if name not in self.params:
                    problems.append(f"group {i} names {name!r}, which is not in params "
                                    f"({len(self.params)} names, e.g. {list(self.params)[:3]})")
                elif name in owner:
                    problems.append(f"{name!r} is in group {owner[name]} and in group {i}; "
                                    f"a parameter must be in exactly one group")
                else:
                    owner[name] = i
            filled = {"names": names}
            filled.update({k: group.get(k, v) for k, v in self.defaults.items()})
            out.append(filled)
        left_out = [n for n in self.params if n not in owner]
        if left_out and not problems:
            problems.append(f"{len(left_out)} parameter(s) are in no group and would never train: "
                            f"{left_out[:5]}{' ...' if len(left_out) > 5 else ''} "
                            f"(to freeze one on purpose, put it in a group with 'lr': 0.0)")
        if problems:
            raise ValueError(f"{self.kind}: bad parameter groups:\n  " + "\n  ".join(problems))
        for i, group in enumerate(out):
            self._check_hyperparameters(group, where=f"group {i}")
        return out

    def _check_hyperparameters(self, h: dict, where: str) -> None:
        """Raise ValueError for hyperparameters torch rejects; subclasses add their own rules."""
        lr, wd = h["lr"], h["weight_decay"]
        if not isinstance(lr, numbers.Real) or not lr >= 0.0:
            raise ValueError(f"{self.kind} ({where}): invalid learning rate lr={lr!r}; must be >= 0")
        if not isinstance(wd, numbers.Real) or not wd >= 0.0:
            raise ValueError(f"{self.kind} ({where}): invalid weight_decay={wd!r}; must be >= 0")

    def _checked(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The live (param, grad) pair for `name`, checked (the dicts may have been edited)."""
        p, g = self.params[name], self.grads[name]
        problems = self._grad_problems(name, p, g)
        if problems:
            raise ValueError(f"{self.kind}.step: " + "; ".join(problems))
        return p, g

    # -- the public interface ----------------------------------------------------------------

    def step(self) -> None:
        for i, group in enumerate(self.groups):      # schedules edit groups live: check them all
            self._check_hyperparameters(group, where=f"group {i}")   # before changing anything
        for group in self.groups:
            for name in group["names"]:
                p, g = self._checked(name)
                self._update(name, p, g, group)
        self.step_count += 1

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, group: dict) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Zero every gradient in place (the blog's zero_grad; torch's set_to_none=False)."""
        for g in self.grads.values():
            g.fill(0)

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(tensors, meta) for a checkpoint: copies of the state arrays under
        `optim.<state key>.<param name>`, and a JSON-able dict with the kind, the defaults, the
        groups (names and hyperparameters), step_count and any scalar state (AdamW's "steps")."""
        tensors = {}
        for name, st in self.state.items():
            for key in self.state_keys:
                if key in st:
                    tensors[f"{OPTIM_PREFIX}{key}.{name}"] = st[key].copy()
        meta = {"kind": self.kind,
                "defaults": _jsonable(self.defaults),
                "groups": [_jsonable(g) for g in self.groups],
                "step_count": self.step_count}
        meta.update(self._scalar_state())
        return tensors, meta

    def _scalar_state(self) -> dict:
        return {}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict) -> None:
        """Restore what state_dict() returned, exactly (bit-exact resume).

        The groups must hold the same names in the same order; their hyperparameters (lr included,
        as in torch) are taken from `meta`. Every `optim.*` tensor must name a known state key and
        parameter with the parameter's shape and dtype; one ValueError lists every problem.
        """
        if not isinstance(meta, dict) or meta.get("kind") != self.kind:
            kind = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"cannot load {kind!r} optimizer state into {self.kind}")
        problems = []
        saved_groups = meta.get("groups", [])
        if [g.get("names") for g in saved_groups] != [g["names"] for g in self.groups]:
            problems.append(
                "parameter groups differ: saved sizes "
                f"{[len(g.get('names', [])) for g in saved_groups]}, current sizes "
                f"{[len(g['names']) for g in self.groups]} (names must match group by group, in order)")
        state: dict[str, dict] = {}
        for key, arr in tensors.items():
            if not key.startswith(OPTIM_PREFIX):
                continue
            parts = key[len(OPTIM_PREFIX):].split(".", 1)
            if len(parts) != 2 or parts[0] not in self.state_keys:
                problems.append(f"unexpected tensor {key!r} ({self.kind} state keys: {list(self.state_keys)})")
                continue
            skey, name = parts
            if name not in self.params:
                problems.append(f"tensor {key!r} is for {name!r}, which is not a parameter")
                continue
            p = self.params[name]
            if arr.shape != p.shape or arr.dtype != p.dtype:
                problems.append(f"tensor {key!r} is {arr.dtype}{list(arr.shape)}, "
                                f"parameter is {p.dtype}{list(p.shape)}")
                continue
            state.setdefault(name, {})[skey] = np.array(arr, copy=True)
        problems += self._load_scalar_state(state, meta)
        if problems:
            raise ValueError(f"cannot load {self.kind} state:\n  " + "\n  ".join(problems))
        for group, saved in zip(self.groups, saved_groups):
            for k in self.defaults:
                if k in saved:
                    group[k] = tuple(saved[k]) if isinstance(saved[k], list) else saved[k]
        for i, group in enumerate(self.groups):
            self._check_hyperparameters(group, where=f"saved group {i}")
        self.state = state
        self.step_count = int(meta.get("step_count", 0))

    def _load_scalar_state(self, state: dict, meta: dict) -> list[str]:
        return []


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ----------------------------------------------------------------------------------------------

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


class AdamW(Optimizer):
    """torch.optim.AdamW (amsgrad=False, maximize=False), single-tensor CPU path. Per parameter:

        step += 1
        p = p * (1 - lr * weight_decay)                          decoupled weight decay
        exp_avg    = lerp(exp_avg, g, 1 - beta1)                 = beta1 * m + (1 - beta1) * g
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
        bias_correction1 = 1 - beta1 ** step;  bias_correction2 = 1 - beta2 ** step
        denom = sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps      (eps AFTER the square root)
        p = p - (lr / bias_correction1) * exp_avg / denom

    state[name] = {"step": int, "exp_avg": array, "exp_avg_sq": array}, created at the first step.
    """

    kind = "AdamW"
    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: dict, grads: dict, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, groups: list[dict] | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._check_hyperparameters(defaults, where="arguments")
        super().__init__(params, grads, groups, defaults)

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

    def _update(self, name, p, g, group):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        one = p.dtype.type                      # Python-float scalars are rounded to this dtype
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"step": 0, "exp_avg": np.zeros_like(p),
                                     "exp_avg_sq": np.zeros_like(p)}
        exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]

        # step_t += 1
        st["step"] += 1
        step = st["step"]
        if wd != 0:
            # param.mul_(1 - lr * weight_decay)
            p *= one(1 - lr * wd)
        # exp_avg.lerp_(grad, 1 - beta1)
        _lerp_(exp_avg, g, 1 - beta1)
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg_sq *= one(beta2)
        _addcmul_(exp_avg_sq, g, g, 1 - beta2)

        # Python floats, as in torch's non-capturable path
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5

        # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        denom = _sqrt(exp_avg_sq)
        denom /= one(bias_correction2_sqrt)
        denom += one(eps)
        # param.addcdiv_(exp_avg, denom, value=-step_size)
        _addcdiv_(p, exp_avg, denom, -step_size)

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
    or inf (max |g|). The norms are computed in the gradients' dtype with float64 accumulation;
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
        for _, g in items:
            g *= g.dtype.type(clip_coef_clamped)
    return float(total_norm)


def _norm(x: np.ndarray, norm_type: float) -> float:
    """The norm_type-norm of x flattened, accumulated in float64."""
    a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
    if a.size == 0:
        return 0.0
    if math.isinf(norm_type):
        return float(a.max())
    if norm_type == 2.0:
        return float(np.sqrt(np.dot(a, a)))
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
