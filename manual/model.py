"""The manual model: the forward pass as a list of layer calls, the backward pass as the same
list read bottom-up, call for call. Every gradient is written by hand in manual/layers/.

    x = wte[ids] + wpe[:T]                          embed.out          (B, T, C)
    x = block_i(x)  for i = 0 .. L-1                h.{i}.*            (B, T, C)
    xf = LN_f(x)                                    ln_f.out           (B, T, C)
    logits = xf @ W_out^T                           logits             (B, T, V)   W_out = wte (tied) or lm_head
    for j = 2 .. n_future:
        h_j = xf @ mtp.j.weight + mtp.j.bias        mtp.{j}.out        (B, T, C)
        logits_j = h_j @ W_out^T                    mtp.{j}.logits     (B, T, V)
    loss = mean over heads with >= 1 non-PAD target of loss_j(logits_j / temperature, targets shifted by j-1)

A head without any non-PAD target (an "idle" head: T <= j - 1, or PAD wherever it would look) is left
out of that mean. Its logits and taps are still computed, but it keeps no cache (no projection input,
no softmax) and its backward is skipped: its tap gradients are zeros, its mtp.{j} gradients stay zero.

Usage:
    model = Model(cfg, seed=0)            # or Model.from_params(cfg, params) / Model.load(path)
    loss = model.forward(ids, targets)    # ids, targets (B, T) ints
    model.zero_grad(); model.backward()   # model.grads accumulate (+=) until zero_grad, as in PyTorch

`model.params` holds the live arrays the model computes with: editing one in place changes
the model, and replacing an entry with a new array of the same shape and dtype works too
(every forward reads the dict and checks it first; a wrong shape, dtype or a missing name
raises a ValueError listing every problem). `model.grads` is allocated once; zero_grad fills
it with zeros in place.

Activation recomputation (`Model(cfg, recompute="blocks")`; default "none"): each block keeps only
its input x (B, T, C) from the forward; backward runs that block's forward again from x, then its
backward, so at most one block's caches exist at a time. Costs about one extra forward per step;
saves all but L*B*T*C of the blocks' cached activations (manual.memory.activation_breakdown states
both). The gradients are bit-identical to recompute="none" (the recomputed forward is the same
arithmetic on the same input). Keeping every tap would keep what recomputation frees, so in this
mode `model.taps` and `model.tap_grads` hold only the taps outside the blocks and the block
boundaries h.{i}.out (manual.memory.kept_tap_names).

Workspace (`Model(cfg, workspace=True)`; default False): every layer writes its outputs, gradients and
scratch into named arrays of `model.workspace` (manual/layers/workspace.py), made at the first step of a
batch shape and reused by every later step: a steady-state step then allocates almost nothing
(tests/test_alloc.py counts it). The price: model.taps, model.tap_grads and model.logits are views
into the workspace, overwritten by the next forward (copy what you keep). Without it (the default)
every forward returns fresh arrays. With recompute="blocks" the blocks do not use the workspace (it
would keep every block's arrays, which recomputation frees).

Debug mode (`Model(cfg, debug=True)`, or set `model.debug = True`): the "assert versions" of
forward / backward / zero_grad. After forward every tap is finite and of its registered shape
and dtype; after backward every tap gradient and parameter gradient is too, and no parameter
gradient is all zero (a parameter of a head with no target is allowed to be); after zero_grad
every gradient is exactly zero. A failure raises DebugCheckError naming the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import checkpoint, memory
from .checks import check_call_order, check_model_args
from .config import ModelConfig
from .layers import (FLASH_BLOCK, BlockCache, EmbeddingCache, LayerNormCache, LinearCache, LossCache, block_backward,
                     block_forward, embedding_backward, embedding_forward, layernorm_backward, layernorm_forward,
                     linear_backward, linear_forward, loss_backward, loss_forward, unembed_backward, unembed_forward)
from .layers.workspace import Workspace, empty, ws_kw
from .memory import RECOMPUTE
from .registry import future_targets, init_params, param_count, param_shapes, param_specs, tap_shapes, tap_specs


class DebugCheckError(AssertionError):
    """A debug-mode check failed; the message names the tensor."""


class BlockInputCache(NamedTuple):
    """recompute="blocks": all a block keeps from the forward; backward runs block_forward(x) again."""
    x: np.ndarray              # (B, T, C) the block's input (embed.out or the previous block's out)


class MTPCache(NamedTuple):
    """Extra head j's two layers: h_j = xf @ mtp.j.weight + mtp.j.bias, logits_j = h_j @ W_out^T."""
    linear: LinearCache        # x = xf (B, T, C), W = mtp.j.weight
    unembed: LinearCache       # x = h_j (B, T, C), W = W_out


@dataclass
class ForwardCache:
    """Everything the last forward kept for backward (and nothing else)."""
    embed: EmbeddingCache
    blocks: list[BlockCache] | list[BlockInputCache]   # one per layer (BlockInputCache: recompute="blocks")
    ln_f: LayerNormCache
    head: LinearCache          # unembed cache of head 1: x = xf (B, T, C), W = W_out
    mtp: list[MTPCache | None]     # per extra head j = 2..k; None: a head without targets (nothing to keep)
    loss: list[LossCache | None] | None   # per head; None when forward had no targets, None for a head without
    n_valid: list[int] | None      # per head: number of non-PAD targets

    def layers(self) -> list[tuple[str, tuple]]:
        """(layer name, that layer's cache) in forward order, named as manual.memory.activation_breakdown
        names them ('embed', 'h.0.ln_1', 'h.0.attn', ..., 'ln_f', 'lm_head', 'mtp.2', 'loss.1', ...); with
        recompute="blocks" a block is one entry 'h.{i}' (its input)."""
        out = [("embed", self.embed)]
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, BlockInputCache):
                out.append((f"h.{i}", blk))
                continue
            out += [(f"h.{i}.ln_1", blk.ln_1), (f"h.{i}.attn", blk.attn), (f"h.{i}.ln_2", blk.ln_2),
                    (f"h.{i}.mlp", blk.mlp)]
        out += [("ln_f", self.ln_f), ("lm_head", self.head)]
        out += [(f"mtp.{j}", c) for j, c in enumerate(self.mtp, start=2)]
        out += [(f"loss.{j}", c) for j, c in enumerate(self.loss or [], start=1)]
        return out


# -- input checks -------------------------------------------------------------------------------

def _first_index(mask):
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_token_array(x, cfg: ModelConfig, what: str = "ids") -> np.ndarray:
    """Validate ids or targets: integer (not bool), 2-D (B, T), 1 <= T <= max_seq_len, values in [0, V).

    Returns an int64 copy (the caller's array is never kept or modified).
    """
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        raise TypeError(f"{what} have dtype bool; token ids must be integers in [0, {cfg.vocab_size})")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array of token ids, got dtype {arr.dtype} "
                        f"(convert with .astype(np.int64) if the values are whole numbers)")
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (B, T), got shape {arr.shape} with {arr.ndim} dimension(s); "
                         f"use {what}[None] for a single sequence")
    B, T = arr.shape
    if B == 0 or T == 0:
        raise ValueError(f"{what} of shape {arr.shape} are empty; need B >= 1 and 1 <= T <= max_seq_len "
                         f"= {cfg.max_seq_len}")
    if T > cfg.max_seq_len:
        raise ValueError(f"cannot forward a sequence of length T = {T}: max_seq_len is only {cfg.max_seq_len} "
                         f"({what} shape {arr.shape})")
    bad = (arr < 0) | (arr >= cfg.vocab_size)
    if bad.any():
        pos = _first_index(bad)
        value = int(arr[pos])
        label = "token id" if what == "ids" else "target"
        hint = " (a negative id would silently wrap around in NumPy indexing)" if value < 0 else ""
        raise ValueError(f"{label} {value} at position {pos} is outside the vocabulary [0, {cfg.vocab_size})"
                         f"{hint}; {int(bad.sum())} {what} value(s) out of range")
    return arr.astype(np.int64)


class Model:
    """A decoder-only transformer in NumPy with hand-written backward passes (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, *, debug: bool = False, flash_block: int = FLASH_BLOCK,
                 recompute: str = "none", workspace: bool = False, _params: dict | None = None):
        check_model_args(cfg)
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        self.cfg = cfg
        self.recompute = recompute
        self.use_workspace = bool(workspace)
        self.workspace: Workspace | None = None   # made by the first forward (use_workspace), one batch shape
        self.debug = bool(debug)
        self.flash_block = int(flash_block)   # keys per block of 'flash' attention
        self.params = init_params(cfg, seed) if _params is None else _params
        # All gradients live in one zeroed buffer; model.grads[name] are views into it, so that
        # zeroing, clipping and AdamW can each run over the whole buffer at once (manual/optim.py).
        self.grad_buffer = np.zeros(sum(arr.size for arr in self.params.values()), dtype=cfg.dtype)   # (P,)
        self.grads, offset = {}, 0
        for name, arr in self.params.items():
            self.grads[name] = self.grad_buffer[offset:offset + arr.size].reshape(arr.shape)
            offset += arr.size
        self._dtype = np.dtype(cfg.dtype)
        self._param_shapes = param_shapes(cfg)
        self._tap_names = memory.kept_tap_names(cfg, recompute)
        self._block_names: list | None = None     # per block: (short, full) parameter names, see _block
        self._cache: ForwardCache | None = None
        self.taps: dict[str, np.ndarray] = {}
        self.tap_grads: dict[str, np.ndarray] = {}
        self.loss: float | None = None

    # -- construction / checkpoints ------------------------------------------------------------
    @classmethod
    def from_params(cls, cfg: ModelConfig, params: dict, **kwargs) -> "Model":
        """A model holding copies of `params` (checked: every name, shape and dtype, all problems listed)."""
        check_model_args(cfg, params)
        checkpoint.check_params(cfg, params, where="params given to Model.from_params", allow_prefixes=())
        own = {s.name: np.array(params[s.name], dtype=cfg.dtype, order="C", copy=True) for s in param_specs(cfg)}
        return cls(cfg, _params=own, **kwargs)

    @classmethod
    def load(cls, path, **kwargs) -> "Model":
        """Load a checkpoint written by save (strict: one CheckpointError lists every problem)."""
        cfg, params, _extras, _meta = checkpoint.load_model(path)
        return cls.from_params(cfg, params, **kwargs)

    def save(self, path) -> None:
        """Write the parameters and the config to one safetensors file, atomically."""
        checkpoint.save_model(path, self.cfg, self.params)

    def num_params(self) -> int:
        return param_count(self.cfg)

    @property
    def logits(self):
        """(B, T, V) logits of head 1 from the last forward (None before the first)."""
        return self.taps.get("logits")

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, ids, targets=None):
        """ids (B, T) ints in [0, V); targets (B, T) or None. Returns the loss (float) or None."""
        cfg = self.cfg
        ids = check_token_array(ids, cfg, "ids")                                     # (B, T) int64
        if targets is not None:
            targets = check_token_array(targets, cfg, "targets")                     # (B, T) int64
            if targets.shape != ids.shape:
                raise ValueError(f"targets have shape {targets.shape} but ids have shape {ids.shape}; "
                                 f"they must match")
            if not (targets != cfg.pad_id).any():
                raise ValueError(f"every target is PAD (pad_id={cfg.pad_id}) in targets of shape {targets.shape}; "
                                 f"the loss is an average over no positions")
        self._check_tensors(self.params, "model.params")
        self._cache, self.taps, self.tap_grads, self.loss = None, {}, {}, None
        p, L, k = self.params, cfg.n_layers, cfg.n_future
        W_out = p["transformer.wte.weight"] if cfg.tie_embeddings else p["lm_head.weight"]     # (V, C)
        taps = {}
        ws = self._workspace(ids.shape)        # None without workspace=True
        ws_blocks = None if self.recompute == "blocks" else ws

        x, c_embed = embedding_forward(ids, p["transformer.wte.weight"], p["transformer.wpe.weight"],
                                       **ws_kw(ws, "embed"))                         # (B, T, C)
        taps["embed.out"] = x
        c_blocks = []
        for i in range(L):
            x_in = x
            x, t, c = block_forward(x, self._block(p, i), cfg, self.flash_block, **ws_kw(ws_blocks, f"h.{i}"))
            if self.recompute == "blocks":      # keep the input only; t and c are dropped here
                t, c = {"out": x}, BlockInputCache(x_in)
            taps.update({f"h.{i}.{name}": v for name, v in t.items()})
            c_blocks.append(c)
        xf, c_lnf = layernorm_forward(x, p["transformer.ln_f.weight"], p.get("transformer.ln_f.bias"),
                                      cfg.ln_eps, **ws_kw(ws, "ln_f"))               # (B, T, C)
        taps["ln_f.out"] = xf
        logits, c_head = unembed_forward(xf, W_out, **ws_kw(ws, "lm_head"))          # (B, T, V)
        taps["logits"] = logits
        # which heads have a target (without targets there is no loss to leave a head out of: all keep)
        active = (True,) * k if targets is None else memory.heads_with_targets(cfg, targets)
        head_logits, c_mtp = [logits], []
        for j in range(2, k + 1):
            h_j, c_lin = linear_forward(xf, p[f"mtp.{j}.weight"], p.get(f"mtp.{j}.bias"),
                                        **ws_kw(ws, f"mtp.{j}"))                     # (B, T, C)
            logits_j, c_un = unembed_forward(h_j, W_out, **ws_kw(ws, f"mtp.{j}.logits"))  # (B, T, V)
            taps[f"mtp.{j}.out"], taps[f"mtp.{j}.logits"] = h_j, logits_j
            head_logits.append(logits_j)
            # a head without targets: backward skips it, so it keeps nothing (h_j lives on as a tap only)
            c_mtp.append(MTPCache(c_lin, c_un) if active[j - 1] else None)

        c_loss = n_valid = None
        if targets is not None:
            c_loss, n_valid, losses = [], [], []
            for j in range(1, k + 1):
                if not active[j - 1]:          # no target: not in the mean, no softmax computed or kept
                    c_loss.append(None)
                    n_valid.append(0)
                    continue
                (loss_j, n_j), c = loss_forward(head_logits[j - 1], future_targets(targets, j, cfg.pad_id),
                                                cfg.pad_id, cfg.temperature, cfg.loss, **ws_kw(ws, f"loss.{j}"))
                c_loss.append(c)
                n_valid.append(n_j)
                losses.append(loss_j)
            # mean over the heads that have at least one non-PAD target (head 1 always has one here)
            self.loss = float(np.sum(losses, dtype=self._dtype) / self._dtype.type(len(losses)))

        self.taps = {name: taps[name] for name in self._tap_names}
        self._cache = ForwardCache(c_embed, c_blocks, c_lnf, c_head, c_mtp, c_loss, n_valid)
        if self.debug:
            self._check_all("forward", self.taps, self._kept(tap_shapes(cfg, *ids.shape)), "tap")
            if self.loss is not None and not np.isfinite(self.loss):
                raise DebugCheckError(f"debug: after forward, the loss is {self.loss} although every tap is finite "
                                      f"(the loss's own {self._dtype} arithmetic overflowed)")
        return self.loss

    # -- backward ---------------------------------------------------------------------------------
    def backward(self) -> None:
        """Accumulate dLoss/dparam into self.grads (+=); set self.tap_grads for this backward."""
        cfg, c = self.cfg, self._cache
        check_call_order(c is not None, c is not None and c.loss is not None)   # same error as the reference
        self._check_tensors(self.grads, "model.grads")
        g, L, k = self.grads, cfg.n_layers, cfg.n_future
        dW_out = g["transformer.wte.weight"] if cfg.tie_embeddings else g["lm_head.weight"]    # (V, C)
        rec = {}
        ws = self.workspace                    # the forward's (None without workspace=True)
        ws_blocks = None if self.recompute == "blocks" else ws

        # The seed: loss = (1 / n_active) * sum over active heads of loss_j (the mean over heads), so the
        # backward of that mean sends dloss / n_active to each active head; a head without targets is
        # not in the sum and gets nothing (its branch is skipped below).
        dloss = 1.0
        n_active = sum(1 for n in c.n_valid if n)
        dloss_head = dloss / n_active

        xf = c.head.x
        dxf = empty(ws, "ln_f.dout", xf.shape, xf.dtype)                             # (B, T, C) sum over heads
        dxf.fill(0)
        for j in range(k, 1, -1):
            c_mtp = c.mtp[j - 2]
            if c_mtp is None:                  # no target: the loss does not depend on head j at all
                dlogits_j = empty(ws, f"mtp.{j}.logits.dout", xf.shape[:2] + (cfg.vocab_size,), xf.dtype)
                dh_j = empty(ws, f"mtp.{j}.dout", xf.shape, xf.dtype)
                dlogits_j.fill(0)                                                    # (B, T, V)
                dh_j.fill(0)                                                         # (B, T, C)
                rec[f"mtp.{j}.logits"], rec[f"mtp.{j}.out"] = dlogits_j, dh_j
                continue
            # loss_j = loss(logits_j / temperature, targets shifted by j - 1)
            dlogits_j = loss_backward(dloss_head, c.loss[j - 1], **ws_kw(ws, f"loss.{j}"))   # (B, T, V)
            # logits_j = h_j @ W_out^T        (W_out: contribution of head j)
            dh_j = unembed_backward(dlogits_j, c_mtp.unembed, dW_out, **ws_kw(ws, f"mtp.{j}.logits"))  # (B, T, C)
            # h_j = xf @ mtp.j.weight + mtp.j.bias
            dxf += linear_backward(dh_j, c_mtp.linear, g[f"mtp.{j}.weight"], g.get(f"mtp.{j}.bias"),
                                   **ws_kw(ws, f"mtp.{j}"))
            rec[f"mtp.{j}.logits"], rec[f"mtp.{j}.out"] = dlogits_j, dh_j
        # loss_1 = loss(logits / temperature, targets)
        dlogits = loss_backward(dloss_head, c.loss[0], **ws_kw(ws, "loss.1"))     # (B, T, V)
        rec["logits"] = dlogits
        # logits = xf @ W_out^T               (W_out: contribution of head 1)
        dxf += unembed_backward(dlogits, c.head, dW_out, **ws_kw(ws, "lm_head"))    # (B, T, C)
        rec["ln_f.out"] = dxf
        # xf = LN_f(x)
        dx = layernorm_backward(dxf, c.ln_f, g["transformer.ln_f.weight"], g.get("transformer.ln_f.bias"),
                                **ws_kw(ws, "ln_f"))
        for i in range(L - 1, -1, -1):
            # x = block_i(x)
            rec[f"h.{i}.out"] = dx
            rec_i, c_i = {}, c.blocks[i]
            if isinstance(c_i, BlockInputCache):   # recompute="blocks": this block's forward again, from its input
                _, _, c_i = block_forward(c_i.x, self._block(self.params, i), cfg, self.flash_block)
                rec_i = None                       # its inner tap gradients are not kept either
            dx = block_backward(dx, c_i, self._block(g, i), record=rec_i, **ws_kw(ws_blocks, f"h.{i}"))  # (B, T, C)
            del c_i                                # recompute: at most one block's caches live at a time
            rec_i = rec_i or {}
            rec.update({f"h.{i}.{name}": v for name, v in rec_i.items()})
        rec["embed.out"] = dx
        # x = wte[ids] + wpe[:T]. Tied: dwte already holds the output projection's contribution(s) from
        # above; the lookup's contribution is added to the SAME buffer here (the two uses of one matrix).
        embedding_backward(dx, c.embed, g["transformer.wte.weight"], g["transformer.wpe.weight"],
                           **ws_kw(ws, "embed"))

        self.tap_grads = {name: rec[name] for name in self._tap_names}
        if self.debug:
            self._check_all("backward", self.tap_grads, self._kept(tap_shapes(cfg, *c.embed.ids.shape)),
                            "gradient of tap")
            self._check_all("backward", self.grads, self._param_shapes, "gradient of", nonzero=True)

    def zero_grad(self) -> None:
        """Set every gradient buffer to zero, in place (the buffers are allocated once)."""
        for arr in self.grads.values():
            arr.fill(0)
        if self.debug:
            for name, arr in self.grads.items():
                if np.any(arr != 0):
                    raise DebugCheckError(f"debug: zero_grad left {int(np.count_nonzero(arr))} non-zero values "
                                          f"in the gradient of {name}")

    # -- helpers ------------------------------------------------------------------------------------
    def _check_tensors(self, d: dict, where: str) -> None:
        """Every registered name present with its shape and the config dtype, nothing else (else one
        ValueError listing every problem). The fast path costs one comparison per tensor."""
        if len(d) == len(self._param_shapes) and all(
                isinstance(a, np.ndarray) and a.shape == shape and a.dtype == self._dtype
                for a, shape in ((d.get(name), shape) for name, shape in self._param_shapes.items())):
            return
        bad = {k: type(v).__name__ for k, v in d.items() if not isinstance(v, np.ndarray)}
        if bad:
            raise TypeError(f"{where} must hold NumPy arrays; got {bad}")
        checkpoint.check_params(self.cfg, d, where=where, allow_prefixes=())

    def _block(self, d: dict, i: int) -> dict:
        """The entries of block i, keyed without the "transformer.h.{i}." prefix.

        The (short, full) name pairs are listed once per model (speed: no walk over every name of
        the dict for each block); _check_tensors has already checked that every name is present."""
        if self._block_names is None:
            self._block_names = [[(name[len(f"transformer.h.{j}."):], name) for name in self._param_shapes
                                  if name.startswith(f"transformer.h.{j}.")] for j in range(self.cfg.n_layers)]
        return {short: d[full] for short, full in self._block_names[i]}

    def _workspace(self, batch_shape) -> Workspace | None:
        """The workspace of this batch shape (a new one replaces the old at a new shape); None without."""
        if not self.use_workspace:
            return None
        if self.workspace is None or self.workspace.batch_shape != tuple(batch_shape):
            self.workspace = Workspace(batch_shape)
        return self.workspace

    def _kept(self, shapes: dict) -> dict:
        """{name: shape} of the taps this model keeps (all of them unless recompute="blocks")."""
        return {name: shapes[name] for name in self._tap_names}

    @property
    def forward_cache(self) -> ForwardCache | None:
        """What the last forward kept for backward (None before the first forward); read-only use."""
        return self._cache

    def cache_breakdown(self) -> dict[str, int]:
        """Bytes held by the caches of the last forward, per layer: manual.memory.cache_breakdown."""
        return memory.cache_breakdown(self)

    def cache_bytes(self) -> int:
        """Total bytes held for backward by the last forward (each buffer once, parameters excluded)."""
        return sum(self.cache_breakdown().values())

    def _check_all(self, stage: str, tensors: dict, expected: dict, what: str, nonzero: bool = False):
        """Debug checks of `tensors` against `expected` ({name: registered shape}): present, that shape,
        the config dtype, finite, and with `nonzero` (parameter gradients) not all zero. `what` names
        the tensors in the messages ("tap", "gradient of tap", "gradient of")."""
        idle = set()
        if nonzero and self._cache is not None:   # a head without any target gets no gradient, legitimately
            idle = {name for j in range(2, self.cfg.n_future + 1) if not self._cache.n_valid[j - 1]
                    for name in (f"mtp.{j}.weight", f"mtp.{j}.bias")}
        for name, shape in expected.items():
            if name not in tensors:
                raise DebugCheckError(f"debug: after {stage}, {what} {name} is missing")
            arr = tensors[name]
            if tuple(arr.shape) != shape:
                raise DebugCheckError(f"debug: after {stage}, {what} {name} has shape {tuple(arr.shape)}, "
                                      f"registered shape is {shape}")
            if arr.dtype != self._dtype:
                raise DebugCheckError(f"debug: after {stage}, {what} {name} has dtype {arr.dtype}, "
                                      f"config dtype is {self._dtype}")
            bad = ~np.isfinite(arr)
            if bad.any():
                raise DebugCheckError(f"debug: after {stage}, {what} {name} contains {int(bad.sum())} non-finite "
                                      f"values (first at {_first_index(bad)}: {arr[_first_index(bad)]})")
            if nonzero and name not in idle and not np.any(arr):
                raise DebugCheckError(f"debug: after {stage}, {what} {name} is all zero "
                                      f"(shape {shape}): no gradient reached it")

