"""The plumbing under manual/optim.py: the Optimizer base class (checked params/grads dicts,
parameter groups, the per-tensor step loop, zero_grad, state_dict / load_state_dict) and
FlatLayout, which recognises gradients that are views into one flat buffer (manual.Model's
`grad_buffer`) so that zero_grad, AdamW and clipping can work on the whole buffer at once.

The optimizer math itself (SGD, AdamW, clipping) is in manual/optim.py.
"""
from __future__ import annotations

import numbers

import numpy as np

from .checkpoint import OPTIM_PREFIX  # optimizer tensors in a checkpoint: optim.<state key>.<param name>


class FlatLayout:
    """Where each array of a dict lives inside the one 1-D buffer they all view, tiling it exactly.

    buffer      the 1-D array that owns the memory (e.g. manual.Model.grad_buffer)
    views       {name: array}: the dict's arrays at the time the layout was taken
    spans       [(name, start, stop)] in buffer order: arrays[name] is buffer[start:stop] reshaped
    `of(arrays)` returns None unless every array is a C-contiguous view of the same 1-D buffer, of
    its dtype, and together they cover it with no gap and no overlap. `still(arrays)` says whether
    the dict still holds exactly those arrays (a caller may replace an entry at any time).
    """

    def __init__(self, buffer: np.ndarray, views: dict, spans: list):
        self.buffer, self.views, self.spans = buffer, views, spans

    @classmethod
    def of(cls, arrays: dict) -> "FlatLayout | None":
        if not arrays:
            return None
        buf = next(iter(arrays.values())).base
        if not isinstance(buf, np.ndarray) or buf.ndim != 1 or not buf.flags.c_contiguous:
            return None
        start = buf.__array_interface__["data"][0]
        spans = []
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray) or a.base is not buf or a.dtype != buf.dtype or not a.flags.c_contiguous:
                return None
            offset, rest = divmod(a.__array_interface__["data"][0] - start, buf.itemsize)
            if rest:
                return None
            spans.append((name, offset, offset + a.size))
        spans.sort(key=lambda s: s[1])
        end = 0
        for _name, lo, hi in spans:
            if lo != end:
                return None                    # a gap or an overlap
            end = hi
        if end != buf.size:
            return None
        return cls(buf, dict(arrays), spans)

    def still(self, arrays: dict) -> bool:
        return len(arrays) == len(self.views) and all(arrays.get(n) is a for n, a in self.views.items())


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
        self._grad_layout: FlatLayout | None = None

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
        self._step()
        self.step_count += 1

    def _step(self) -> None:
        """One update of every parameter: the per-tensor loop (a subclass may fuse it)."""
        for group in self.groups:
            for name in group["names"]:
                p, g = self._checked(name)
                self._update(name, p, g, group)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, group: dict) -> None:
        raise NotImplementedError

    def flat_grads(self) -> FlatLayout | None:
        """The gradients' FlatLayout when they are views tiling one buffer (manual.Model's), else None."""
        if self._grad_layout is None or not self._grad_layout.still(self.grads):
            self._grad_layout = FlatLayout.of(self.grads)
        return self._grad_layout

    def zero_grad(self) -> None:
        """Zero every gradient in place (the blog's zero_grad; torch's set_to_none=False): one fill of
        the flat gradient buffer when the gradients are views into one, else one fill per tensor."""
        flat = self.flat_grads()
        if flat is not None:
            flat.buffer.fill(0)
            return
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
