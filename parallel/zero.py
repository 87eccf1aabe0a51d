"""ZeRO-1 for the manual side: AdamW whose state is split across the ranks (--shard-optimizer).

Every rank holds the whole model and its gradients, but only 1/W of AdamW's exp_avg and
exp_avg_sq: the slice [r S, (r + 1) S) of the flat parameter order, S = ceil(P / W) (the last
rank's slice is padded with zeros up to S). One step:

    reduce-scatter the flat gradient buffer        rank r receives the SUM of its slice    (S,)
    / W                                            the mean over ranks (parallel/dp.py's weighting)
    clip: total norm = sqrt(all_reduce(sum of the slice's squares))    the same on every rank
    AdamW on the slice only                        decoupled decay, moments, update: manual.optim's
                                                   own chunk arithmetic (_adamw_chunk)
    all-gather the parameter slices                every rank gets the whole updated model

For that, the parameters and gradients are moved into two padded flat buffers (P_pad = W S), and
model.params / model.grads become views into them (manual.Model allows replacing entries with
arrays of the same shape and dtype); model.grad_buffer is the first P elements of the gradient one.

Memory per rank: the optimizer state is 2 S elements instead of 2 P; the price is a gradient slice
(S), a send buffer (S) and two scratch slices (2 S) for the update. Communication per step: one
reduce-scatter and one all-gather, the same bytes as the all-reduce they replace, plus one scalar.

Checkpoints hold the FULL state in manual.optim.AdamW's format (state_dict all-gathers it, so
every rank must call it), so a sharded run resumes unsharded, or with another world size.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from manual.optim import AdamW, _adamw_chunk, _adamw_scalars

from .dp import Context, _collective


class ZeroAdamW(AdamW):
    """manual.optim.AdamW with its state sharded across the ranks (module docstring)."""

    kind = "AdamW"

    def __init__(self, model, ctx: Context, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, groups=None):
        self.ctx = ctx
        W, r = ctx.world, ctx.rank
        sizes = {name: p.size for name, p in model.params.items()}
        P = sum(sizes.values())
        S = -(-P // W)                                               # ceil(P / W)
        dtype = np.dtype(model.cfg.dtype)
        self.flat_p = np.zeros(W * S, dtype=dtype)                   # (W S,) every parameter, padded
        self.flat_g = np.zeros(W * S, dtype=dtype)                   # (W S,) every gradient, padded
        off = 0
        for name, p in list(model.params.items()):
            n = sizes[name]
            self.flat_p[off:off + n] = p.reshape(-1)
            model.params[name] = self.flat_p[off:off + n].reshape(p.shape)
            model.grads[name] = self.flat_g[off:off + n].reshape(p.shape)
            off += n
        model.grad_buffer = self.flat_g[:P]                          # (P,) as manual.Model lays it out
        self.model, self.P, self.S, self.lo = model, P, S, r * S
        super().__init__(model.params, model.grads, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         groups=groups)
        # this rank's slice, as runs of (start, stop, group index) in slice coordinates
        index = {name: i for i, g in enumerate(self.groups) for name in g["names"]}
        self._runs, off = [], 0
        for name, n in sizes.items():
            a, b = max(off, self.lo), min(off + n, self.lo + S)
            if a < b:
                self._runs.append((a - self.lo, b - self.lo, index[name]))
            off += n
        self.g_shard = np.zeros(S, dtype=dtype)                      # (S,) the reduced gradient slice
        self.m, self.v = np.zeros(S, dtype=dtype), np.zeros(S, dtype=dtype)     # (S,) each: the state
        self._out, self._scratch, self._send = (np.zeros(S, dtype=dtype) for _ in range(3))
        self.t = 0                                                   # AdamW's step (the same for all)

    # -- the gradient: reduce-scatter, then clipping on the slice --------------------------------

    def reduce_gradients(self, step: int) -> None:
        """g_shard = (sum over ranks of this slice of the flat gradients) / W."""
        chunks = list(torch.from_numpy(self.flat_g).split(self.S))
        out = torch.from_numpy(self.g_shard)
        _collective(self.ctx, f"gradient reduce-scatter at step {step}", lambda: dist.reduce_scatter(out, chunks))
        self.g_shard /= self.ctx.world

    def clip_grad_norm(self, max_norm: float) -> float:
        """manual.optim.clip_grad_norm_ (2-norm) over the sharded gradient: the sum of squares is
        all-reduced, so the norm, and hence the clip factor, is the same on every rank."""
        dtype = self.g_shard.dtype
        local = torch.tensor([float(np.dot(self.g_shard, self.g_shard))], dtype=torch.float64)
        _collective(self.ctx, "all-reduce of the gradient norm", lambda: dist.all_reduce(local))
        total = dtype.type(math.sqrt(float(local.item())))
        coef = (dtype.type(1) / (total + dtype.type(1e-6))) * dtype.type(max_norm)
        coef = min(coef, dtype.type(1.0)) if not np.isnan(coef) else coef
        with np.errstate(invalid="ignore"):
            self.g_shard *= dtype.type(coef)
        return float(total)

    def clip_grad_value(self, value: float) -> None:
        np.clip(self.g_shard, -value, value, out=self.g_shard)

    # -- the step -------------------------------------------------------------------------------

    def _step(self) -> None:
        first = self.groups[0]
        if any(g[k] != first[k] for g in self.groups for k in ("lr", "betas", "eps")):
            raise ValueError("--shard-optimizer needs one lr, betas and eps for every group (weight decay may differ)")
        self.t += 1
        p = self.flat_p[self.lo:self.lo + self.S]                    # (S,) this rank's parameters
        one = p.dtype.type
        for a, b, gi in self._runs:                                  # param.mul_(1 - lr * weight_decay)
            wd = self.groups[gi]["weight_decay"]
            if wd != 0:
                p[a:b] *= one(1 - first["lr"] * wd)
        beta1, beta2, eps, step_size, bc2 = _adamw_scalars(first, self.t)
        _adamw_chunk(self.g_shard, self.m, self.v, self._out, self._scratch, beta1, beta2, eps, step_size, bc2)
        p += self._out                                               # param.addcdiv_(exp_avg, denom, -step_size)
        self._send[...] = p
        views = list(torch.from_numpy(self.flat_p).split(self.S))
        _collective(self.ctx, f"parameter all-gather at step {self.t}",
                    lambda: dist.all_gather(views, torch.from_numpy(self._send)))

    def zero_grad(self) -> None:
        self.flat_g.fill(0)
        self.g_shard.fill(0)

    # -- checkpoints: the full state, in manual.optim.AdamW's format ------------------------------

    def _gather(self, shard: np.ndarray) -> np.ndarray:
        full = np.zeros(self.ctx.world * self.S, dtype=shard.dtype)
        views = list(torch.from_numpy(full).split(self.S))
        _collective(self.ctx, "optimizer-state all-gather", lambda: dist.all_gather(views, torch.from_numpy(shard)))
        return full[:self.P]

    def state_dict(self):
        """The full state (collective: every rank must call it; rank 0 writes it)."""
        m, v = self._gather(self.m), self._gather(self.v)
        self.state = {}
        if self.t:
            off = 0
            for name, p in self.params.items():
                n = p.size
                self.state[name] = {"step": self.t, "exp_avg": m[off:off + n].reshape(p.shape),
                                    "exp_avg_sq": v[off:off + n].reshape(p.shape)}
                off += n
        try:
            return super().state_dict()
        finally:
            self.state = {}

    def load_state_dict(self, tensors, meta) -> None:
        """Check and load a full AdamW state (sharded or not when saved), keep this rank's slice."""
        super().load_state_dict(tensors, meta)
        steps = {st["step"] for st in self.state.values()}
        if len(steps) > 1:
            raise ValueError(f"--shard-optimizer needs every parameter at the same AdamW step, got {sorted(steps)}")
        self.t = steps.pop() if steps else 0
        for key, shard in (("exp_avg", self.m), ("exp_avg_sq", self.v)):
            full = np.zeros(self.ctx.world * self.S, dtype=shard.dtype)
            if self.state:
                full[:self.P] = np.concatenate([self.state[n][key].reshape(-1) for n in self.params])
            shard[...] = full[self.lo:self.lo + self.S]
        self.state = {}

    def state_bytes(self) -> int:
        """Optimizer-state bytes held by this rank (2 S elements)."""
        return self.m.nbytes + self.v.nbytes
