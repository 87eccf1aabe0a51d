"""The reference model: the architecture of manual/, written as idiomatic PyTorch (CPU).

Autograd does the backward pass. Modelled on nanoGPT's model.py: submodules are named
after the GPT-2 checkpoint keys, so `module.named_parameters()` yields the canonical names
of manual/registry.py (`transformer.h.0.attn.c_attn.weight`, ...) with their canonical
shapes. The config is manual's `ModelConfig` (one definition for both sides); this file
imports manual's config, registry and checkpoint code, never its math.

Shape legend: B batch, T time, C = d_model, H heads, D head size, F = d_ff, V vocab,
S = max_seq_len, L layers.

Exact formulas (the same ones manual/ states):
    LayerNorm   (x - mean) / sqrt(biased var + ln_eps) * weight + bias     (nn.LayerNorm; float64 for
                float32 rows whose variance would overflow, see LayerNorm below)
    linear      y = x @ W + b with W stored [in, out]                       (Conv1D below)
    attention   att = (q @ k^T) * (1 / sqrt(D)); probs = softmax(att with j > i set to -inf)
    gelu        0.5 x (1 + erf(x / sqrt 2))                                 F.gelu(approximate='none')
    gelu_tanh   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))             F.gelu(approximate='tanh')
    relu        max(x, 0)                                                   F.relu
    logits      ln_f.out @ W_out^T, W_out = wte (tied: the same Parameter) or lm_head.weight
    loss        cross entropy (F.cross_entropy, ignore_index=pad_id) or brier of logits / temperature,
                mean over non-PAD positions; total = mean over heads that have a non-PAD target.

Taps: `GPT.forward(..., taps=dict)` fills `taps` with the named intermediate tensors of
manual.registry.tap_specs(cfg), in forward order, and calls `retain_grad()` on each, so
after `loss.backward()` every tap's `.grad` is d loss / d tap.

Activation recomputation (`GPT(cfg, recompute="blocks")`, default "none"): each block runs under
torch.utils.checkpoint (use_reentrant=False), which keeps the block's input and runs the block's
forward again inside backward, as manual's Model(cfg, recompute="blocks") does. Taps inside the
blocks are then not recorded (keeping them would keep what recomputation frees): only the block
outputs h.{i}.out and the taps outside the blocks (manual.memory.kept_tap_names).

Weight layout (the checked one-to-one copy in `load_params` / `export_params`): no transposes
are needed, because both sides store every weight in the canonical layout. Conv1D weights
(c_attn, c_proj, c_fc, mtp.{j}) are [in, out] here as in the checkpoint (y = x @ W + b, like
GPT-2's Conv1D); wte (nn.Embedding) and the untied lm_head (nn.Linear, logits = x @ W^T) are
[V, C] in torch's native layout, which is the checkpoint's too. The copy checks every name,
shape and dtype. (Were a layer an nn.Linear [out, in] weight, its copy would need a transpose.)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from manual.checkpoint import CheckpointError, check_params
from manual.config import ModelConfig
from manual.memory import RECOMPUTE
from manual.registry import future_targets, param_specs

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _tap(taps: dict | None, name: str, t: torch.Tensor) -> torch.Tensor:
    """Record `t` under `name` (and keep its gradient after backward). Returns `t` unchanged."""
    if taps is not None:
        taps[name] = t
        if t.requires_grad:
            t.retain_grad()
    return t



def causal_mask(S: int) -> torch.Tensor:
    """(S, S) bool, True where key j is in the future of query i (j > i): those scores become -inf."""
    return torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)

class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, but a float32 input large enough for its sum of squares to overflow is normalised
    in float64 and cast back. torch's float32 kernel gives xhat = 0 there (rstd = 1/inf; |x| ~ 1e19) or
    NaN (|x| ~ 1e21), where the true result is finite; manual's layernorm_forward rescales those rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bound = 4 * x.shape[-1] * float(x.detach().abs().amax()) ** 2     # >= sum_c (x_c - mean)^2
        if x.dtype == torch.float32 and not bound < torch.finfo(torch.float32).max:   # (nan included)
            w, b = (None if t is None else t.double() for t in (self.weight, self.bias))
            return F.layer_norm(x.double(), self.normalized_shape, w, b, self.eps).float()
        return super().forward(x)


class Conv1D(nn.Module):
    """y = x @ weight + bias with weight stored [in, out], as in GPT-2 / Hugging Face's Conv1D."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))      # (in, out)
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight                                          # (..., out)
        if self.bias is not None:
            y = y + self.bias
        return y


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_heads, cfg.d_model
        self.flash = cfg.attention == "flash"
        self.c_attn = Conv1D(cfg.d_model, 3 * cfg.d_model, cfg.bias)   # Q | K | V
        self.c_proj = Conv1D(cfg.d_model, cfg.d_model, cfg.bias)
        self.register_buffer("mask", causal_mask(cfg.max_seq_len), persistent=False)   # (S, S)

    def forward(self, x: torch.Tensor, taps: dict | None = None, name: str = "attn") -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        # 1. project to queries, keys and values
        q, k, v = self.c_attn(x).split(C, dim=2)                       # 3 x (B, T, C)
        q = _tap(taps, f"{name}.q", q.view(B, T, H, D).transpose(1, 2))  # (B, H, T, D)
        k = _tap(taps, f"{name}.k", k.view(B, T, H, D).transpose(1, 2))  # (B, H, T, D)
        v = _tap(taps, f"{name}.v", v.view(B, T, H, D).transpose(1, 2))  # (B, H, T, D)
        if self.flash:
            # fused kernel: never materialises att / probs (no taps for them, as the registry says)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(D))  # (B, H, T, D)
        else:
            # 2. scaled scores, tapped before the causal mask
            att = _tap(taps, f"{name}.att", (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D)))  # (B, H, T, T)
            # 3. causal mask and softmax
            att_masked = att.masked_fill(self.mask[:T, :T], float("-inf"))                    # (B, H, T, T)
            probs = _tap(taps, f"{name}.probs", F.softmax(att_masked, dim=-1))                # (B, H, T, T)
            # 4. weighted sum of values
            y = probs @ v                                                                        # (B, H, T, D)
        # 5. merge heads, output projection
        ctx = _tap(taps, f"{name}.ctx", y.transpose(1, 2).contiguous().view(B, T, C))        # (B, T, C)
        return _tap(taps, f"{name}.out", self.c_proj(ctx))                                   # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.d_model, cfg.d_ff, cfg.bias)
        self.c_proj = Conv1D(cfg.d_ff, cfg.d_model, cfg.bias)
        self.activation = cfg.activation

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "gelu":
            return F.gelu(x, approximate="none")
        return F.gelu(x, approximate="tanh")

    def forward(self, x: torch.Tensor, taps: dict | None = None, name: str = "mlp") -> torch.Tensor:
        fc = _tap(taps, f"{name}.fc", self.c_fc(x))                    # (B, T, F)
        act = _tap(taps, f"{name}.act", self.act(fc))                  # (B, T, F)
        return _tap(taps, f"{name}.out", self.c_proj(act))             # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre = cfg.norm == "pre"
        self.ln_1 = LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, taps: dict | None = None, name: str = "h.0") -> torch.Tensor:
        if self.pre:   # GPT-2: layer norm before each sub-layer
            a = _tap(taps, f"{name}.ln_1.out", self.ln_1(x))                      # (B, T, C)
            r1 = _tap(taps, f"{name}.resid_1", x + self.attn(a, taps, f"{name}.attn"))
            m = _tap(taps, f"{name}.ln_2.out", self.ln_2(r1))
            return _tap(taps, f"{name}.out", r1 + self.mlp(m, taps, f"{name}.mlp"))
        # post-LN (original transformer): layer norm after each residual
        r1 = _tap(taps, f"{name}.resid_1", x + self.attn(x, taps, f"{name}.attn"))  # (B, T, C)
        a = _tap(taps, f"{name}.ln_1.out", self.ln_1(r1))
        r2 = _tap(taps, f"{name}.resid_2", a + self.mlp(a, taps, f"{name}.mlp"))
        return _tap(taps, f"{name}.out", self.ln_2(r2))


class GPT(nn.Module):
    """Decoder-only transformer; parameter names are the canonical (HF GPT-2) names.

    A GPT built directly has module-level defaults (Conv1D N(0, 0.02), torch's elsewhere); `reference.Model(cfg, seed)`
    loads manual.registry.init_params(cfg, seed) instead, so both sides start equal.
    """

    def __init__(self, cfg: ModelConfig, recompute: str = "none"):
        super().__init__()
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        self.cfg = cfg
        self.recompute = recompute
        C = cfg.d_model
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, C),                         # (V, C)
            wpe=nn.Embedding(cfg.max_seq_len, C),                        # (S, C)
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)]),
            ln_f=LayerNorm(C, eps=cfg.ln_eps, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)          # weight (V, C): logits = x @ W^T
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight            # one Parameter, two uses
        # head j (j = 2..n_future) predicts the token j steps ahead: a C -> C layer feeding lm_head
        self.mtp = nn.ModuleDict({str(j): Conv1D(C, C, cfg.bias) for j in range(2, cfg.n_future + 1)})

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, taps: dict | None = None):
        """idx (B, T) int64 -> (logits of each head [(B, T, V), ...], loss or None).

        `targets` (B, T) int64 holds the next-token targets; head j's targets are them
        shifted left by j - 1 (manual.registry.future_targets). `taps`, if a dict, receives
        every named intermediate tensor (see the module docstring).
        """
        cfg = self.cfg
        B, T = idx.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"Cannot forward sequence of length {T}, max_seq_len is only {cfg.max_seq_len}")
        pos = torch.arange(T, dtype=torch.long)                                         # (T,)
        x = _tap(taps, "embed.out", self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.recompute == "none":
                x = block(x, taps, f"h.{i}")                                            # (B, T, C)
            elif torch.is_grad_enabled():   # keeps x; the block's forward runs again in backward
                x = _tap(taps, f"h.{i}.out", checkpoint(block, x, None, f"h.{i}", use_reentrant=False))
            else:
                x = _tap(taps, f"h.{i}.out", block(x, None, f"h.{i}"))                  # (B, T, C)
        x = _tap(taps, "ln_f.out", self.transformer.ln_f(x))                            # (B, T, C)
        heads = [_tap(taps, "logits", self.lm_head(x))]                                 # (B, T, V)
        for j in range(2, cfg.n_future + 1):
            hj = _tap(taps, f"mtp.{j}.out", self.mtp[str(j)](x))                         # (B, T, C)
            heads.append(_tap(taps, f"mtp.{j}.logits", self.lm_head(hj)))               # (B, T, V)
        if targets is None:
            return heads, None
        losses = []
        for j, logits in enumerate(heads, start=1):
            tj = targets if j == 1 else torch.from_numpy(future_targets(targets.numpy(), j, cfg.pad_id))
            if bool((tj != cfg.pad_id).any()):                 # a head with no target is left out of the mean
                losses.append(self.head_loss(logits, tj))
        if not losses:
            raise ValueError(f"every target is PAD (pad_id={cfg.pad_id}): the loss would average over no positions")
        return heads, torch.stack(losses).mean()

    def head_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of one head: mean over positions whose target != pad_id.   (B, T, V), (B, T) -> ()"""
        cfg = self.cfg
        V = logits.size(-1)
        z = (logits / cfg.temperature).view(-1, V)                                      # (B*T, V)
        t = targets.reshape(-1)                                                         # (B*T,)
        if cfg.loss == "cross_entropy":
            return F.cross_entropy(z, t, ignore_index=cfg.pad_id)
        # brier: sum over V of (softmax(z) - onehot(target))^2
        keep = t != cfg.pad_id                                                          # (B*T,)
        p = F.softmax(z[keep], dim=-1)                                                  # (N, V)
        onehot = F.one_hot(t[keep], V).to(p.dtype)                                      # (N, V)
        return ((p - onehot) ** 2).sum(dim=-1).mean()


# -- the checked one-to-one copy between the module and canonical NumPy arrays ------------

def canonical_parameters(module: GPT) -> dict[str, nn.Parameter]:
    """{canonical name: Parameter} in registry order; the tied lm_head appears once, as wte.

    Checks that the module's parameters are exactly the registry's names (a module bug
    otherwise), and that a tied lm_head is the wte Parameter itself, not a copy.
    """
    cfg = module.cfg
    named = dict(module.named_parameters())            # tied Parameter listed once, under its first name
    expected = [s.name for s in param_specs(cfg)]
    missing = [n for n in expected if n not in named]
    unexpected = [n for n in named if n not in expected]
    if missing or unexpected:
        raise AssertionError(f"module parameters differ from the registry: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings and module.lm_head.weight is not module.transformer.wte.weight:
        raise AssertionError("tie_embeddings is set but lm_head.weight is not the wte Parameter")
    return {n: named[n] for n in expected}


def load_params(module: GPT, params: dict[str, np.ndarray], where: str = "parameters") -> None:
    """Copy canonical NumPy arrays into the module's Parameters, bit for bit.

    Checks everything first and raises one CheckpointError listing every missing,
    unexpected and mismatched (shape, dtype) tensor; nothing is copied unless all fit.
    No transposes: both sides store [in, out] and [V, C] (see the module docstring).
    """
    not_arrays = {k: type(v).__name__ for k, v in params.items() if not isinstance(v, np.ndarray)}
    if not_arrays:
        raise TypeError(f"{where}: expected NumPy arrays, got {not_arrays}")
    check_params(module.cfg, params, where=where, allow_prefixes=())
    targets = canonical_parameters(module)
    with torch.no_grad():
        for name, p in targets.items():
            src = torch.from_numpy(np.array(params[name], copy=True))   # owns its memory (inputs may be read-only)
            if tuple(src.shape) != tuple(p.shape) or src.dtype != p.dtype:  # registry/module disagreement
                raise CheckpointError(f"{name}: array {tuple(src.shape)} {src.dtype} vs parameter "
                                      f"{tuple(p.shape)} {p.dtype}")
            p.copy_(src)


def export_params(module: GPT) -> dict[str, np.ndarray]:
    """{canonical name: ndarray} sharing memory with the Parameters (no copies), registry order."""
    out = {}
    for name, p in canonical_parameters(module).items():
        out[name] = p.detach().numpy()
    return out


def build(cfg: ModelConfig, recompute: str = "none") -> GPT:
    """A GPT of `cfg` in cfg.dtype with uninitialised Parameters (fill them with load_params).

    Built on the meta device, so no time goes into an initialisation that is overwritten.
    """
    with torch.device("meta"):
        module = GPT(cfg, recompute)
    module = module.to_empty(device="cpu").to(TORCH_DTYPES[cfg.dtype])
    mask = causal_mask(cfg.max_seq_len)
    for block in module.transformer.h:          # buffers are emptied by to_empty too: rebuild the mask
        block.attn.mask = mask
    if cfg.tie_embeddings:
        module.lm_head.weight = module.transformer.wte.weight
    return module
