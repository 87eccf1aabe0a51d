"""Closed forms of the bytes the manual model keeps for its backward pass.

`activation_breakdown(cfg, B, T)` states, layer by layer, what the manual forward caches and
why; `cache_breakdown(model)` measures the same thing on a live model (every cached array
followed to the buffer that owns its memory, each buffer counted once, parameters excluded),
and `cache_tensors(model)` lists those buffers one by one, named by their cache fields.
tests/test_model.py asserts the two are equal, entry by entry, for several variants.

With s = bytes per float (4 for float32, 8 for float64) and int64 ids (8 bytes):

    layer          what (cache field)                    bytes
    embed          ids                                   8 B T        (rows of wte to add dx into)
    h.i.ln_1       xhat, rstd                            s (B T C + B T)   (dx needs both; mean is not kept)
    h.i.attn       input a (c_attn.x)                    s B T C      (dWqkv = a^T dqkv)
                   qkv (q, k, v are views into it)       s 3 B T C    (dq needs k, dk needs q, dprobs needs v)
                   standard: probs                       s B H T T    (dv = probs^T dy and the softmax backward)
                   flash:    lse (row log-sum-exp)       s B H T      (probs are recomputed block by block)
                   ctx (c_proj.x)                        s B T C      (dWo = ctx^T dout; flash also reads y from it)
    h.i.ln_2       xhat, rstd                            s (B T C + B T)
    h.i.mlp        input m (c_fc.x)                      s B T C      (dW1 = m^T dfc)
                   fc (f.x; gelu, gelu_tanh only)        s B T F      (f'(fc))
                   act (f.y, relu and gelu; c_proj.x)    s B T F      (dW2 = act^T dout; relu' = [act > 0])
    ln_f           xhat, rstd                            s (B T C + B T)
    lm_head        ln_f.out (x)                          s B T C      (dW_out = dlogits^T xf; the mtp heads share it)
    mtp.j          mtp.j.out (unembed.x), j = 2..k       s B T C      (dW_out = dlogits_j^T h_j; k = n_future)
    loss.j         softmax p, targets, j = 1..k          s B T V + 8 B T   (only when forward had targets)

A head without any non-PAD target (heads_with_targets: an "idle" head, e.g. j > T or targets PAD past
the first position) is not part of the loss, so backward skips it and it keeps nothing: its mtp.j and
loss.j rows are 0 (pass `active=heads_with_targets(cfg, targets)`). Autograd keeps a little more there:
the reference builds the head's graph before its loss is left out, so it saves h_j (s B T C) for it.

Activation recomputation (Model(cfg, recompute="blocks")): a block keeps only its input, so every
`h.i.*` row above becomes one row
    h.i            the block's input x (BlockInputCache)  s B T C      (backward reruns the block from it)
and the total is about L s B T C plus what lies outside the blocks. During backward one block's
caches exist at a time on top of that: `recompute_block_bytes` (the four h.i rows above, for one i).

The transient peak of forward + backward is `peak_bytes` (above the parameters and gradient
buffers) and `peak_bytes_closed_form` (everything): see their docstrings.

Not cached (and why): attention's att (backward needs only probs; the tap itself is still held
in model.taps), the masked copy of att (it becomes probs in place), layer-norm inputs (xhat
replaces them), residual sums (an add needs nothing), the PAD mask (recomputed from targets).
"""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np

from .config import ModelConfig

INT64 = 8
RECOMPUTE = ("none", "blocks")     # Model(..., recompute=): what a block keeps for backward


def _float_bytes(cfg: ModelConfig) -> int:
    """s: bytes per float of the config's dtype (4 or 8)."""
    return 4 if cfg.dtype == "float32" else 8


def _check_recompute(recompute: str) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")


def kept_tap_names(cfg: ModelConfig, recompute: str = "none") -> list[str]:
    """The taps a model keeps after forward (and whose gradients it keeps after backward), registry
    order: all of them, or with recompute="blocks" those outside the blocks and the block outputs
    h.{i}.out (the next block's input, kept anyway). Both implementations use this list."""
    from .registry import tap_specs
    _check_recompute(recompute)
    names = [s.name for s in tap_specs(cfg)]
    if recompute == "none":
        return names
    outs = {f"h.{i}.out" for i in range(cfg.n_layers)}
    return [n for n in names if not n.startswith("h.") or n in outs]


def heads_with_targets(cfg: ModelConfig, targets) -> tuple[bool, ...]:
    """Per prediction head j = 1..n_future: whether its targets (`targets` (B, T) shifted left by j - 1,
    registry.future_targets) hold at least one non-PAD token. A head without is left out of the loss."""
    from .registry import future_targets
    return tuple(bool((future_targets(targets, j, cfg.pad_id) != cfg.pad_id).any())
                 for j in range(1, cfg.n_future + 1))


def _active(cfg: ModelConfig, active) -> tuple[bool, ...]:
    """`active` as a checked tuple of n_future bools (None: every head has targets)."""
    if active is None:
        return (True,) * cfg.n_future
    active = tuple(bool(a) for a in active)
    if len(active) != cfg.n_future:
        raise ValueError(f"active must hold one flag per prediction head (n_future = {cfg.n_future}), "
                         f"got {len(active)}: {active}")
    return active


def activation_breakdown(cfg: ModelConfig, B: int, T: int, with_targets: bool = True,
                         recompute: str = "none", active=None) -> dict[str, int]:
    """Bytes cached for backward per layer, keyed like Model.cache_breakdown() (one 'h.{i}' entry per
    block, its input, with recompute="blocks"). `active`: per head j = 1..k whether it has a non-PAD
    target (heads_with_targets; default: every head), read only with targets: a head without keeps 0."""
    _check_recompute(recompute)
    active = _active(cfg, active) if with_targets else (True,) * cfg.n_future
    s = _float_bytes(cfg)
    C, H, F, V = cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.vocab_size
    BT = B * T
    ln = s * (BT * C + BT)
    probs = B * H * T * T if cfg.attention == "standard" else B * H * T
    attn = s * (BT * C + 3 * BT * C + probs + BT * C)
    mlp = s * (BT * C + BT * F * (1 if cfg.activation == "relu" else 2))
    out = {"embed": INT64 * BT}
    for i in range(cfg.n_layers):
        if recompute == "blocks":
            out[f"h.{i}"] = s * BT * C
        else:
            out.update({f"h.{i}.ln_1": ln, f"h.{i}.attn": attn, f"h.{i}.ln_2": ln, f"h.{i}.mlp": mlp})
    out["ln_f"] = ln
    out["lm_head"] = s * BT * C
    for j in range(2, cfg.n_future + 1):
        out[f"mtp.{j}"] = s * BT * C * active[j - 1]
    if with_targets:
        for j in range(1, cfg.n_future + 1):
            out[f"loss.{j}"] = (s * BT * V + INT64 * BT) * active[j - 1]
    return out


def activation_bytes(cfg: ModelConfig, B: int, T: int, with_targets: bool = True, recompute: str = "none",
                     active=None) -> int:
    """Total bytes the manual forward keeps for backward (with recompute="blocks" each block's
    L * (...) term below is replaced by s B T C, its input):

        8 B T (ids)
      + L * s * (2 (B T C + B T)                  two layer norms
                 + 5 B T C + [B H T T | B H T]    attention: input, qkv, ctx, probs | lse
                 + B T C + (1 | 2) B T F)         mlp: input, act [, fc]
      + s (B T C + B T) + s B T C                 ln_f, the heads' shared input
      + (n_future - 1) s B T C                    extra heads' outputs
      + n_future (s B T V + 8 B T)                losses (with targets)
    where a head without targets (`active`, see activation_breakdown) counts in neither of the last two.
    """
    return sum(activation_breakdown(cfg, B, T, with_targets, recompute, active).values())


def recompute_block_bytes(cfg: ModelConfig, B: int, T: int) -> int:
    """recompute="blocks": bytes of the one block's caches that backward rebuilds at a time (on top of
    activation_bytes(..., recompute="blocks") during backward): the h.0.* rows of activation_breakdown."""
    rows = activation_breakdown(cfg, B, T, with_targets=False)
    return sum(v for k, v in rows.items() if k.startswith("h.0."))


def held_after_forward_bytes(cfg: ModelConfig, B: int, T: int, active=None) -> int:
    """Bytes a forward with targets allocates and keeps (caches and taps together, each buffer once).

    Per block: 12 B T C (embed-free residual stream values: layer-norm xhat and outputs x2,
    qkv 3, ctx, attn.out, resid_1 [, resid_2], mlp.out, out) + 2 B T (rstd x2) + 2 B T F (fc, act)
    + 2 B H T T (att, probs) for standard attention, or B H T (lse) for flash.
    Around the blocks: ids and targets (8 B T each, + 8 B T per extra head's shifted targets),
    embed.out (B T C), ln_f (2 B T C + B T), per head logits and softmax (2 B T V), per extra head
    its output (B T C). A head without targets (`active`, see activation_breakdown) keeps its logits
    and output (taps) but no softmax and no shifted targets.
    """
    s = _float_bytes(cfg)
    C, H, F, V, L, k = cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.vocab_size, cfg.n_layers, cfg.n_future
    n = sum(_active(cfg, active))          # heads with targets (head 1 always)
    BT = B * T
    att = 2 * B * H * T * T if cfg.attention == "standard" else B * H * T
    block = 12 * BT * C + 2 * BT + 2 * BT * F + att
    return (INT64 * BT * (1 + n) + s * (BT * C + L * block + 2 * BT * C + BT + (k + n) * BT * V
                                        + (k - 1) * BT * C))


def tap_grad_bytes(cfg: ModelConfig, B: int, T: int) -> int:
    """Bytes of model.tap_grads after backward (arrays shared by two taps counted once).

    Per block 8 B T C (standard and flash alike: the gradients w.r.t. ln_2.out / resid_2, resid_1,
    ctx, q, k, v, ln_1.out and the block's input) + 2 B T F (fc, act) + 2 B H T T (probs, att;
    standard only); outside the blocks dlogits (B T V per head), the extra heads' outputs
    ((n_future - 1) B T C), ln_f.out and the last block's output (2 B T C).
    """
    s = _float_bytes(cfg)
    C, H, F, V, L, k = cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.vocab_size, cfg.n_layers, cfg.n_future
    BT = B * T
    att = 2 * B * H * T * T if cfg.attention == "standard" else 0
    return s * (k * BT * V + (k - 1) * BT * C + 2 * BT * C + L * (8 * BT * C + 2 * BT * F + att))


def param_bytes(cfg: ModelConfig) -> int:
    """Bytes of the parameters (the tied matrix once); the gradients take the same again."""
    from .registry import param_count
    return (4 if cfg.dtype == "float32" else 8) * param_count(cfg)


def sharded_adamw_state_bytes(cfg: ModelConfig, world: int) -> int:
    """AdamW state bytes held by ONE rank under ZeRO-1 (parallel/zero.py, --shard-optimizer):
    exp_avg and exp_avg_sq for a slice of S = ceil(P / world) elements of the flat parameter order
    (the last slice padded with zeros up to S), against 2 P unsharded."""
    if int(world) < 1:
        raise ValueError(f"world must be a positive number of ranks, got {world}")
    from .registry import param_count
    S = -(-param_count(cfg) // int(world))                     # ceil(P / world)
    return 2 * S * (4 if cfg.dtype == "float32" else 8)


def peak_bytes(cfg: ModelConfig, B: int, T: int, active=None) -> int:
    """Transient peak of one forward + backward (with targets) ABOVE what was live before it.

    The parameters and gradient buffers exist before and are not counted; neither is the
    previous step's state (a forward drops the previous caches, taps and tap gradients first).
    The peak is reached at the end of the backward pass, when the model holds
        held_after_forward_bytes   every cache and tap of the forward (each buffer once)
      + tap_grad_bytes             every tap gradient of the backward
      + workspace                  s (3 B T C + max(V C, C F, 3 C C)): the last attention backward's
                                   dqkv (B, T, 3C) and the largest parameter-shaped temporary
                                   (x^T dy before it is added into the gradient buffer).
    Python objects (dicts, tuples) add a few kB; measured with tracemalloc the prediction holds
    to within a few percent for B T >= 64 (tests/test_model.py, conformance/memory.py). `active`: the
    heads with targets (see activation_breakdown); the tap gradients of the others are zeros, full size.
    """
    s = _float_bytes(cfg)
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    workspace = s * (3 * B * T * C + max(V * C, C * F, 3 * C * C))
    return held_after_forward_bytes(cfg, B, T, active) + tap_grad_bytes(cfg, B, T) + workspace


def peak_bytes_closed_form(cfg: ModelConfig, B: int, T: int) -> int:
    """Peak of a training step's forward + backward in total: parameters + gradients + peak_bytes."""
    return 2 * param_bytes(cfg) + peak_bytes(cfg, B, T)


def measured_peak_bytes(model, ids, targets) -> int:
    """tracemalloc peak of one forward + backward, above what was live before it (params, grads).

    The measurement `peak_bytes` predicts; the conformance memory check and tools/memprof.py use it."""
    model.forward(ids, targets)    # warm-up: first-call allocations (lazy buffers) are not the steady state
    model.backward()
    model.zero_grad()
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        model.forward(ids, targets)
        model.backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def cache_tensors(model) -> list[dict]:
    """Every buffer the manual model's last forward keeps for backward, in forward order.

    `model` is a manual.Model; its `forward_cache.layers()` gives each layer's cache. Arrays are
    followed to the buffer that owns their memory; each buffer is counted once, at the first layer
    (and field) that holds it; parameters are excluded. Each row: layer, name (the cache field that
    holds it: "xhat", "c_attn.x", "qkv", "probs", ...), shape, dtype, bytes, tap (the tap that shares
    the buffer, "" if none). An empty list before the first forward.
    """
    cache = model.forward_cache
    if cache is None:
        return []
    seen = {id(buffer_owner(a)) for a in model.params.values()}
    tap_of = {}
    for name, t in model.taps.items():
        tap_of.setdefault(id(buffer_owner(t)), name)
    rows = []
    for layer, layer_cache in cache.layers():
        for name, a in _named_arrays(layer_cache):
            owner = buffer_owner(a)
            if id(owner) in seen:
                continue
            seen.add(id(owner))
            rows.append({"layer": layer, "name": name, "shape": list(owner.shape), "dtype": str(owner.dtype),
                         "bytes": int(owner.nbytes), "tap": tap_of.get(id(owner), "")})
    return rows


def cache_breakdown(model) -> dict[str, int]:
    """Bytes held by the caches of the last forward of `model` (a manual.Model), per layer, keyed like
    activation_breakdown (layers that hold no bytes of their own give 0): cache_tensors summed."""
    cache = model.forward_cache
    if cache is None:
        return {}
    out = {layer: 0 for layer, _ in cache.layers()}
    for row in cache_tensors(model):
        out[row["layer"]] += row["bytes"]
    return out


def _named_arrays(obj, prefix: str = ""):
    """(field path, ndarray) for every array inside a cache: NamedTuples by field name ("c_attn.x"),
    other tuples and lists by index ("[2]"); scalars and None hold no arrays."""
    if isinstance(obj, np.ndarray):
        yield prefix, obj
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for field, item in zip(obj._fields, obj):
            yield from _named_arrays(item, f"{prefix}.{field}" if prefix else field)
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from _named_arrays(item, f"{prefix}[{i}]")


def buffer_owner(a: np.ndarray) -> np.ndarray:
    """The array that owns a view's memory (follow .base while it is an ndarray): bytes are
    counted once per owner."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a
