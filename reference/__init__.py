"""reference: the same transformer in idiomatic PyTorch (CPU); autograd does the backward.

`from reference import Model` gives a thin adapter with exactly the interface of
`manual.Model` (see notes on the contract in manual/), so conformance and tools drive
both implementations the same way:

    Model(cfg, seed=0)               parameters = manual.registry.init_params(cfg, seed)
    Model(cfg, recompute="blocks")   blocks under torch.utils.checkpoint (reference/model.py); also
                                     from_params / load's keyword
    Model.from_params(cfg, params)   a copy of {canonical name: ndarray}, checked first
    Model.load(path) / model.save(path)   through manual/checkpoint.py (safetensors)
    model.forward(ids, targets=None) -> float loss (None without targets)
    model.backward(); model.zero_grad()
    model.params     {name: ndarray} views sharing memory with the torch Parameters
    model.grads      {name: ndarray} copies of the accumulated .grad (zeros after zero_grad)
    model.taps, model.tap_grads, model.logits, model.loss, model.num_params(), model.module

and, for measurements that need the torch objects themselves (reference.optim, tools/memprof.py):

    model.torch_params   {name: torch Parameter} in registry order (the tied matrix once, as wte)
    model.loss_tensor    the loss tensor of the last forward (None without targets), graph attached

Inputs are checked here, before torch sees them, with the numbers in the message.
"""
from __future__ import annotations

import numpy as np
import torch

from manual.checkpoint import load_model, save_model
from manual.config import ModelConfig
from manual.checks import LiveParams, check_call_order, check_model_args
from manual.memory import kept_tap_names
from manual.registry import init_params, param_shapes

from .model import GPT, build, canonical_parameters, export_params, load_params

__all__ = ["Model", "GPT", "check_ids", "check_targets"]


def check_ids(cfg: ModelConfig, ids, what: str = "token id", name: str = "ids") -> np.ndarray:
    """Validate a (B, T) integer array of token ids; returns it as int64. Raises TypeError/ValueError."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}"
                        + (" (round or cast the ids to int64 first)" if arr.dtype.kind == "f" else ""))
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (B, T), got shape {arr.shape} (rank {arr.ndim})")
    B, T = arr.shape
    if B < 1 or T < 1:
        raise ValueError(f"{name} must hold at least one sequence of at least one token, got shape {arr.shape}")
    if T > cfg.max_seq_len:
        raise ValueError(f"Cannot forward sequence of length {T}, max_seq_len is only {cfg.max_seq_len}")
    bad = (arr < 0) | (arr >= cfg.vocab_size)                 # compared in the array's own integer type: no wrap
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what} {int(arr[b, t])} at position ({b}, {t}) is outside the vocabulary "
                         f"[0, {cfg.vocab_size}) ({int(bad.sum())} such value(s) in {name})")
    return arr.astype(np.int64)


def check_targets(cfg: ModelConfig, targets, shape: tuple) -> np.ndarray:
    """Validate next-token targets against the ids' shape; at least one must be non-PAD."""
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    arr = np.asarray(targets)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"targets must be an integer array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"targets must have the shape of ids {tuple(shape)}, got {arr.shape}")
    bad = (arr < 0) | (arr >= cfg.vocab_size)
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"target id {int(arr[b, t])} at position ({b}, {t}) is outside the vocabulary "
                         f"[0, {cfg.vocab_size}) ({int(bad.sum())} such value(s) in targets)")
    if not (arr != cfg.pad_id).any():
        raise ValueError(f"every target is PAD (pad_id={cfg.pad_id}): the loss would average over no positions")
    return arr.astype(np.int64)


class Model:
    """The reference model behind the shared Model interface (NumPy in, NumPy out)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, *, recompute: str = "none"):
        check_model_args(cfg)
        self._setup(cfg, init_params(cfg, seed), recompute)

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: dict[str, np.ndarray], *, recompute: str = "none") -> "Model":
        """A model holding a copy of `params` (checked: every name, shape and dtype)."""
        self = cls.__new__(cls)
        self._setup(cfg, params, recompute)
        return self

    @classmethod
    def load(cls, path, *, recompute: str = "none") -> "Model":
        cfg, params, _extras, _metadata = load_model(path)
        return cls.from_params(cfg, params, recompute=recompute)

    def save(self, path, extra_tensors=None, extra_metadata=None) -> None:
        save_model(path, self.cfg, export_params(self.module), extra_tensors, extra_metadata)

    def _setup(self, cfg: ModelConfig, params: dict[str, np.ndarray], recompute: str = "none") -> None:
        check_model_args(cfg, params)
        self.cfg = cfg
        self.recompute = recompute
        # registry order (only the block outputs inside the blocks with recompute="blocks"), checked after every forward
        self._tap_names = kept_tap_names(cfg, recompute)
        self._shapes = param_shapes(cfg)
        self.module: GPT = build(cfg, recompute)
        load_params(self.module, params)
        self._params = canonical_parameters(self.module)        # {name: Parameter}, registry order
        for p in self._params.values():                           # grads always exist (zeros, not None)
            p.grad = torch.zeros_like(p)
        self._taps: dict[str, torch.Tensor] = {}
        self._heads: list[torch.Tensor] = []
        self._loss: torch.Tensor | None = None
        self._tap_grads: dict[str, np.ndarray] = {}
        self.loss: float | None = None

    # -- the interface ------------------------------------------------------------------
    def forward(self, ids, targets=None) -> float | None:
        """Run the model on ids (B, T); with targets (B, T) also the loss. Returns the loss as a float."""
        ids = check_ids(self.cfg, ids)
        tgt = None if targets is None else check_targets(self.cfg, targets, ids.shape)
        taps: dict[str, torch.Tensor] = {}
        with torch.set_grad_enabled(tgt is not None):
            heads, loss = self.module(torch.from_numpy(ids), None if tgt is None else torch.from_numpy(tgt), taps)
        if list(taps) != self._tap_names:   # a module bug: tap names or order differ from the registry
            raise AssertionError(f"taps {list(taps)} differ from the registry's {self._tap_names}")
        self._taps, self._heads, self._loss, self._tap_grads = taps, heads, loss, {}
        self.loss = None if loss is None else float(loss.detach())
        return self.loss

    def backward(self) -> None:
        """d loss / d everything; parameter gradients accumulate (+=) until zero_grad()."""
        check_call_order(bool(self._heads), self._loss is not None)   # same error as manual.Model
        for t in self._taps.values():     # tap gradients are those of this backward, not accumulated
            t.grad = None
        # retain_graph: backward may be called again on the same forward, accumulating again
        self._loss.backward(retain_graph=True)
        self._tap_grads = {name: (torch.zeros_like(t) if t.grad is None else t.grad).detach().numpy().copy()
                           for name, t in self._taps.items()}

    def zero_grad(self) -> None:
        for p in self._params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    @property
    def torch_params(self) -> dict[str, torch.nn.Parameter]:
        """{canonical name: the torch Parameter}, registry order; .grad is the accumulated gradient."""
        return dict(self._params)

    @property
    def loss_tensor(self) -> torch.Tensor | None:
        """The loss tensor of the last forward with targets (None otherwise); backward() differentiates it."""
        return self._loss

    @property
    def params(self) -> dict[str, np.ndarray]:
        """{name: ndarray} sharing memory with the Parameters: editing one in place edits the model, and
        so does `params[name] = new_array` (checked, then copied in), as in manual.Model."""
        return LiveParams(export_params(self.module), self.cfg, self._shapes)

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """{name: ndarray} copies of the accumulated gradients, same keys as params."""
        return {n: (torch.zeros_like(p) if p.grad is None else p.grad).detach().numpy().copy()
                for n, p in self._params.items()}

    @property
    def taps(self) -> dict[str, np.ndarray]:
        return {n: t.detach().numpy().copy() for n, t in self._taps.items()}

    @property
    def tap_grads(self) -> dict[str, np.ndarray]:
        return dict(self._tap_grads)

    @property
    def logits(self) -> np.ndarray | None:
        return self._heads[0].detach().numpy().copy() if self._heads else None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())   # the tied matrix once

    def __repr__(self) -> str:
        return f"reference.Model({self.cfg!r}, {self.num_params():,} parameters)"
