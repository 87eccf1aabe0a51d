"""The reference training step: torch.optim.AdamW / SGD, torch's gradient clipping, and the
measurements the conformance suite compares against manual/ (optimizer state by canonical
name, bytes autograd saves for the backward pass).

Parameter groups come from manual.registry.decay_groups (matrices decay; biases, layer
norms and embeddings do not), so both implementations optimise the same groups.
`foreach=False` keeps torch on its plain per-parameter loop (the arithmetic manual/ writes out).
"""
from __future__ import annotations

import numpy as np
import torch

from manual.registry import decay_groups

from manual.checkpoint import OPTIM_PREFIX

# optimizer state tensors by torch class, named "optim.<state>.<param name>" in checkpoints / conformance
STATE_KEYS = {"AdamW": ("exp_avg", "exp_avg_sq"), "SGD": ("momentum_buffer",)}


def make_optimizer(model, kind: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                   groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """torch.optim.AdamW or SGD over parameter groups of `model` (a reference.Model).

    groups: in manual/optim.py's form, [{"names": [...], hyperparameter: value, ...}]: each group's
    own hyperparameters over the arguments (torch's param_groups); a parameter in no group is not
    optimised (frozen). Default: manual.registry.decay_groups(cfg, weight_decay), the decay / no-decay
    groups. Each group carries its canonical names as "param_names".
    """
    params = model.torch_params
    if groups is None:
        groups = decay_groups(model.cfg, weight_decay)
    unknown = sorted({n for g in groups for n in g["names"]} - set(params))
    if unknown:
        raise ValueError(f"optimizer groups name {unknown}, which are not parameters of the model "
                         f"({len(params)} parameters, e.g. {list(params)[:3]})")
    groups = [{"params": [params[n] for n in g["names"]], "param_names": list(g["names"]),
               **{k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "names"}}
              for g in groups if g["names"]]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                               weight_decay=weight_decay, foreach=False)
    raise ValueError(f"optimizer kind must be 'adamw' or 'sgd', got {kind!r}")


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

    torch's rule: coef = max_norm / (norm + 1e-6), applied only when coef < 1. A NaN/inf norm raises.
    """
    norm = torch.nn.utils.clip_grad_norm_(list(model.torch_params.values()), max_norm,
                                          error_if_nonfinite=True, foreach=False)
    return float(norm)


def clip_grad_value(model, clip_value: float) -> None:
    """Clamp every gradient element into [-clip_value, clip_value]."""
    torch.nn.utils.clip_grad_value_(list(model.torch_params.values()), clip_value, foreach=False)


def optimizer_state(model, opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """{"optim.<state>.<param name>": ndarray} copies: AdamW exp_avg / exp_avg_sq, SGD momentum_buffer.

    Parameters without state yet (before the first step, or SGD without momentum) are absent.
    """
    out = {}
    for name, p in model.torch_params.items():
        state = opt.state.get(p, {})
        for key in STATE_KEYS[type(opt).__name__]:
            value = state.get(key)
            if value is not None:
                out[f"{OPTIM_PREFIX}{key}.{name}"] = value.detach().numpy().copy()
    return out


def activation_saved_bytes(model, ids, targets) -> int:
    """Bytes autograd keeps for the backward pass during one forward (ids, targets).

    Measured with torch.autograd.graph.saved_tensors_hooks: every tensor saved for
    backward is counted by its storage (untyped_storage().nbytes()), each storage once
    (by data_ptr); storages of parameters are excluded (they are counted as parameters), and
    so are module buffers (the constant causal mask, S*S bools, is model state, not an activation).
    The int64 ids / positions / targets autograd keeps for the embedding and loss backward count.
    Taps are not recorded during the measurement (retain_grad saves nothing anyway).
    """
    from . import check_ids, check_targets

    ids = check_ids(model.cfg, ids)
    targets = check_targets(model.cfg, targets, ids.shape)
    state = list(model.module.parameters()) + list(model.module.buffers())
    param_ptrs = {t.untyped_storage().data_ptr() for t in state}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _heads, loss = model.module(torch.from_numpy(ids), torch.from_numpy(targets))
    del loss, _heads
    return sum(seen.values())
