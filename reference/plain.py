"""plain: the reference GPT as a PyTorch user would write it, with none of our instrumentation.

The speed baseline of tools/bench.py ("plain PyTorch eager"). Same math as reference/model.py,
written the way nanoGPT writes it: nn.Linear layers ([out, in] weights), F.layer_norm,
F.scaled_dot_product_attention (causal), F.gelu, F.cross_entropy, torch.optim.AdamW with its
defaults, torch.nn.utils.clip_grad_norm_. No taps, no retain_grad, no hooks, no NumPy copies.
tests/test_bench.py loads the same weights here and into reference.Model and checks, in
float64, that logits, loss and every parameter gradient agree (conformance.compare), so the
baseline is known to compute the same function.

Covered: the configs of the presets and their variations in norm ('pre' | 'post'), activation,
bias, tie_embeddings, attention ('standard' and 'flash' compute the same function: both run SDPA
here), temperature and pad_id. Not covered (a ValueError says so): n_future > 1, loss 'brier'.

    model = PlainGPT.from_params(cfg, params)    # canonical {name: ndarray}, checked
    opt = make_optimizer(model, lr=3e-4, weight_decay=0.1)
    loss = model(ids, targets)                   # ids, targets: (B, T) int64 tensors
    loss.backward(); clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from manual.checkpoint import check_params
from manual.config import ModelConfig
from manual.registry import decay_groups

from .model import TORCH_DTYPES

# Canonical weights are stored [in, out] (y = x @ W); nn.Linear keeps [out, in]. These canonical
# name endings are copied transposed, and only these (wte and the untied lm_head are [V, C] on both
# sides).
_LINEAR_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _transposed(name: str) -> bool:
    return name.endswith(_LINEAR_SUFFIXES)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, b = cfg.d_model, cfg.bias
        self.pre, self.n_head, self.eps = cfg.norm == "pre", cfg.n_heads, cfg.ln_eps
        self.gelu = {"gelu": "none", "gelu_tanh": "tanh"}.get(cfg.activation)   # None: relu
        self.ln_1 = nn.LayerNorm(C, eps=cfg.ln_eps, bias=b)
        self.c_attn = nn.Linear(C, 3 * C, bias=b)
        self.c_proj = nn.Linear(C, C, bias=b)
        self.ln_2 = nn.LayerNorm(C, eps=cfg.ln_eps, bias=b)
        self.c_fc = nn.Linear(C, cfg.d_ff, bias=b)
        self.mlp_proj = nn.Linear(cfg.d_ff, C, bias=b)

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                                      # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                   # (B, H, T, D), scale 1/sqrt(D)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))             # (B, T, C)

    def mlp(self, x):
        h = self.c_fc(x)                                                              # (B, T, F)
        h = F.relu(h) if self.gelu is None else F.gelu(h, approximate=self.gelu)
        return self.mlp_proj(h)                                                       # (B, T, C)

    def forward(self, x):
        if self.pre:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


class PlainGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_future != 1 or cfg.loss != "cross_entropy":
            raise ValueError(f"the plain baseline covers n_future = 1 and loss 'cross_entropy' only; got "
                             f"n_future={cfg.n_future}, loss={cfg.loss!r}")
        self.cfg = cfg
        C = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, C)                                    # (V, C)
        self.wpe = nn.Embedding(cfg.max_seq_len, C)                                   # (S, C)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(C, eps=cfg.ln_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)                       # (V, C)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) int64 -> loss (with targets) or logits (B, T, V)."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T))                                # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))                                           # (B, T, V)
        if targets is None:
            return logits
        if self.cfg.temperature != 1.0:
            logits = logits / self.cfg.temperature
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=self.cfg.pad_id)

    # -- canonical names <-> this module's parameters -------------------------------------------

    def canonical(self) -> dict[str, nn.Parameter]:
        """{canonical name: Parameter}; a transposed one is listed by `_transposed(name)`."""
        out = {"transformer.wte.weight": self.wte.weight, "transformer.wpe.weight": self.wpe.weight}
        for i, blk in enumerate(self.h):
            pre = f"transformer.h.{i}."
            for canon, mod in (("ln_1", blk.ln_1), ("attn.c_attn", blk.c_attn), ("attn.c_proj", blk.c_proj),
                               ("ln_2", blk.ln_2), ("mlp.c_fc", blk.c_fc), ("mlp.c_proj", blk.mlp_proj)):
                out[pre + canon + ".weight"] = mod.weight
                if mod.bias is not None:
                    out[pre + canon + ".bias"] = mod.bias
        out["transformer.ln_f.weight"] = self.ln_f.weight
        if self.ln_f.bias is not None:
            out["transformer.ln_f.bias"] = self.ln_f.bias
        if not self.cfg.tie_embeddings:
            out["lm_head.weight"] = self.lm_head.weight
        return out

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: dict[str, np.ndarray]) -> "PlainGPT":
        """A PlainGPT in cfg.dtype holding copies of canonical `params` (every name, shape, dtype checked)."""
        check_params(cfg, params, where="params given to PlainGPT.from_params", allow_prefixes=())
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu").to(TORCH_DTYPES[cfg.dtype])
        if cfg.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        with torch.no_grad():
            for name, p in model.canonical().items():
                src = torch.from_numpy(np.array(params[name], copy=True))
                p.copy_(src.T if _transposed(name) else src)
        return model

    def canonical_grads(self) -> dict[str, np.ndarray]:
        """{canonical name: ndarray} copies of the gradients in the canonical layout (zeros where None)."""
        out = {}
        for name, p in self.canonical().items():
            g = (torch.zeros_like(p) if p.grad is None else p.grad).detach()
            out[name] = (g.T if _transposed(name) else g).contiguous().numpy().copy()
        return out


def make_optimizer(model: PlainGPT, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch.optim.AdamW with torch's defaults (no foreach / fused flags set) over the decay groups of
    manual.registry.decay_groups (the same groups as manual and reference)."""
    params = model.canonical()
    groups = [{"params": [params[n] for n in g["names"]], "weight_decay": g["weight_decay"]}
              for g in decay_groups(model.cfg, weight_decay) if g["names"]]
    return torch.optim.AdamW(groups, lr=lr)
