"""Reference-side glue for manual/trainer.py: torch.optim behind the interface of manual.optim.

manual.trainer.Trainer drives an optimizer through five things: `step()`, `zero_grad()`,
`groups` (dicts whose "lr" it sets before every step), `state_dict() -> (tensors, meta)` and
`load_state_dict(tensors, meta)`. `TorchOptimizer` gives torch.optim.AdamW / SGD (built by
reference.optim.make_optimizer: the registry's decay groups, foreach=False) exactly that
interface, with the checkpoint format of manual.optim:

    tensors   {"optim.exp_avg.<param name>": ndarray, "optim.exp_avg_sq.<param name>": ...}
              (SGD: "optim.momentum_buffer.<param name>"), copies
    meta      {"kind": "AdamW" | "SGD", "defaults": {...}, "groups": [{"names": [...], "lr": ..., ...}],
               "step_count": int, "steps": {param name: int}}          ("steps": AdamW only)

so a checkpoint written while training one implementation resumes on the other.

`clip_functions(model)` gives the trainer torch's clipping of the model's gradients in place
(model.grads of a reference.Model is a copy; clipping that would change nothing).
"""
from __future__ import annotations

import numpy as np
import torch

from manual.checkpoint import OPTIM_PREFIX

from .model import canonical_parameters
from .optim import STATE_KEYS, make_optimizer, optimizer_state

KINDS = {"adamw": "AdamW", "sgd": "SGD"}
# the hyperparameters saved per group, the same keys as manual.optim's defaults
HYPER = {"AdamW": ("lr", "betas", "eps", "weight_decay"),
         "SGD": ("lr", "momentum", "dampening", "nesterov", "weight_decay")}


class TorchOptimizer:
    """torch.optim.AdamW or SGD over a reference.Model, behind manual.optim's interface.

        opt = TorchOptimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
        opt.groups[0]["lr"] = 3e-4          # torch's param_groups themselves: takes effect at the next step
        opt.zero_grad(); model.forward(ids, targets); model.backward(); opt.step()
    """

    def __init__(self, model, kind: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False):
        if kind not in KINDS:
            raise ValueError(f"optimizer kind must be one of {sorted(KINDS)}, got {kind!r}")
        self.model = model
        self.kind = KINDS[kind]
        self.opt = make_optimizer(model, kind=kind, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                  momentum=momentum, dampening=dampening, nesterov=nesterov)
        if self.kind == "AdamW":
            self.defaults = dict(lr=lr, betas=list(betas), eps=eps, weight_decay=weight_decay)
        else:
            self.defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                 weight_decay=weight_decay)
        self.params = canonical_parameters(model.module)        # {name: Parameter}
        self.step_count = 0

    @property
    def groups(self) -> list[dict]:
        """torch's param_groups (live dicts); "param_names" lists each group's canonical names."""
        return self.opt.param_groups

    def step(self) -> None:
        self.opt.step()
        self.step_count += 1

    def zero_grad(self) -> None:
        """Zero every gradient in place (the model keeps zero tensors, never None)."""
        self.model.zero_grad()

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        tensors, steps = optimizer_state(self.model, self.opt), {}
        for name, p in self.params.items():
            st = self.opt.state.get(p, {})
            if "step" in st:
                steps[name] = int(st["step"].item() if torch.is_tensor(st["step"]) else st["step"])
        groups = []
        for g in self.opt.param_groups:
            d = {"names": list(g["param_names"])}
            for k in HYPER[self.kind]:
                d[k] = list(g[k]) if isinstance(g[k], tuple) else g[k]
            groups.append(d)
        meta = {"kind": self.kind, "defaults": dict(self.defaults), "groups": groups, "step_count": self.step_count}
        if self.kind == "AdamW":
            meta["steps"] = steps
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict) -> None:
        """Restore what state_dict() (this class's or manual.optim's) returned, exactly.

        Goes through torch's own Optimizer.load_state_dict: the saved tensors and steps become
        torch's per-parameter state, the saved hyperparameters the groups'. One ValueError lists
        every problem.
        """
        if not isinstance(meta, dict) or meta.get("kind") != self.kind:
            kind = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"cannot load {kind!r} optimizer state into torch {self.kind}")
        problems = []
        saved_groups = meta.get("groups", [])
        mine = [list(g["param_names"]) for g in self.opt.param_groups]
        if [g.get("names") for g in saved_groups] != mine:
            problems.append(f"parameter groups differ: saved sizes {[len(g.get('names', [])) for g in saved_groups]}, "
                            f"current sizes {[len(n) for n in mine]} (names must match group by group, in order)")
        state: dict[str, dict] = {}
        for key, arr in tensors.items():
            if not key.startswith(OPTIM_PREFIX):
                continue
            skey, _, name = key[len(OPTIM_PREFIX):].partition(".")
            if skey not in STATE_KEYS[self.kind] or name not in self.params:
                problems.append(f"unexpected tensor {key!r} (torch {self.kind} state keys: {list(STATE_KEYS[self.kind])})")
                continue
            p = self.params[name]
            if tuple(arr.shape) != tuple(p.shape) or arr.dtype != p.detach().numpy().dtype:
                problems.append(f"tensor {key!r} is {arr.dtype}{list(arr.shape)}, parameter is {p.dtype}{list(p.shape)}")
                continue
            state.setdefault(name, {})[skey] = torch.from_numpy(np.array(arr, copy=True))
        if self.kind == "AdamW":
            steps = meta.get("steps", {})
            for name in set(steps) | set(state):
                if name not in self.params:
                    problems.append(f"meta['steps'] names {name!r}, which is not a parameter")
                elif name not in steps or sorted(state.get(name, {})) != ["exp_avg", "exp_avg_sq"]:
                    problems.append(f"{name!r}: step {steps.get(name)} with tensors {sorted(state.get(name, {}))}; "
                                    f"expected a step and ['exp_avg', 'exp_avg_sq']")
                else:
                    # torch keeps the step as a scalar tensor of the default scalar dtype (float32: exact to 2**24)
                    state[name]["step"] = torch.tensor(float(steps[name]))
        if problems:
            raise ValueError(f"cannot load {self.kind} state:\n  " + "\n  ".join(problems))
        sd = self.opt.state_dict()                  # torch's format: params numbered across groups in order
        index = {}
        for g_sd, g in zip(sd["param_groups"], self.opt.param_groups):
            index.update(zip(g["param_names"], g_sd["params"]))
        sd["state"] = {index[name]: st for name, st in state.items()}
        for g_sd, saved in zip(sd["param_groups"], saved_groups):
            for k in HYPER[self.kind]:
                if k in saved:
                    g_sd[k] = tuple(saved[k]) if isinstance(saved[k], list) else saved[k]
        self.opt.load_state_dict(sd)
        self.step_count = int(meta.get("step_count", 0))


def clip_functions(model):
    """(clip_grad_norm(max_norm) -> total norm before clipping, clip_grad_value(value)) acting on
    the reference model's gradients in place: torch.nn.utils.clip_grad_norm_ / clip_grad_value_
    with foreach=False. A non-finite norm is returned, not raised (error_if_nonfinite=False), so
    the trainer can stop with its own message, naming the step, before the optimizer steps."""
    params = list(canonical_parameters(model.module).values())

    def clip_grad_norm(max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False, foreach=False))

    def clip_grad_value(value: float) -> None:
        torch.nn.utils.clip_grad_value_(params, value, foreach=False)

    return clip_grad_norm, clip_grad_value
