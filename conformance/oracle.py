"""The float64 oracle: every layer of the model written a third time, straight from the formulas,
in plain NumPy. It shares no code with manual/ or reference/, so it can judge which of the two
is wrong when they disagree (the debugger's forward blame), and it is itself tested against the
reference layer by layer (tests/test_layerdiff.py).

Each function takes float64 arrays and returns float64 arrays. Parameters come as a dict of
roles ("w", "b", "W_attn", ...); a bias role is absent when the config has no biases.
`layer(kind, ...)` dispatches on the layer kinds of the debugger's graph.
"""
from __future__ import annotations

import math

import numpy as np

from manual import registry
from manual.config import ModelConfig


def _bias(p: dict, role: str):
    return p[role] if role in p else 0.0


def erf(x):
    """math.erf elementwise (exact to float64 rounding; slow, which an oracle may be)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def embedding(ids, p):
    """ids (B, T) -> wte[ids] + wpe[:T]   (B, T, C)"""
    return p["wte"][ids] + p["wpe"][: ids.shape[1]]


def layernorm(x, p, eps):
    """(x - mean) / sqrt(biased var + eps) * w + b over the last axis."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["w"] + _bias(p, "b")


def attention(x, p, n_heads) -> dict:
    """Causal multi-head self-attention; x (B, T, C). Returns q, k, v (B, H, T, D), att (the scaled
    scores before the mask), probs (B, H, T, T), ctx (B, T, C) and out (B, T, C)."""
    B, T, C = x.shape
    D = C // n_heads
    qkv = x @ p["W_attn"] + _bias(p, "b_attn")                                       # (B, T, 3C)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, n_heads, D).transpose(0, 2, 1, 3) for i in range(3))
    att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(D))                       # (B, H, T, T)
    masked = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, att)
    e = np.exp(masked - masked.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)                                             # (B, H, T, T)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, C)                         # (B, T, C)
    out = ctx @ p["W_proj"] + _bias(p, "b_proj")                                     # (B, T, C)
    return dict(q=q, k=k, v=v, att=att, probs=probs, ctx=ctx, out=out)


def activation(fc, kind: str):
    if kind == "relu":
        return np.maximum(fc, 0.0)
    if kind == "gelu":
        return 0.5 * fc * (1.0 + erf(fc / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * fc * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (fc + 0.044715 * fc ** 3)))
    raise ValueError(f"no oracle for activation {kind!r}; expected relu, gelu or gelu_tanh")


def mlp(x, p, act: str) -> dict:
    """fc = x W1 + b1 (B, T, F); act = activation(fc); out = act W2 + b2 (B, T, C)."""
    fc = x @ p["W1"] + _bias(p, "b1")
    a = activation(fc, act)
    return dict(fc=fc, act=a, out=a @ p["W2"] + _bias(p, "b2"))


def loss(heads: list, targets, cfg: ModelConfig):
    """Mean over the prediction heads that have a non-PAD target of each head's mean loss over
    its non-PAD positions. heads[j - 1] (B, T, V) predicts the token j steps ahead."""
    losses = []
    for j, z in enumerate(heads, start=1):
        tj = registry.future_targets(targets, j, cfg.pad_id)
        valid = tj != cfg.pad_id
        if not valid.any():
            continue
        z = z / cfg.temperature
        zmax = z.max(-1, keepdims=True)
        logp = z - zmax - np.log(np.exp(z - zmax).sum(-1, keepdims=True))
        if cfg.loss == "cross_entropy":
            per = -np.take_along_axis(logp, tj[..., None], -1)[..., 0]
        else:                                   # brier: sum_v (p_v - onehot_v)^2
            per = ((np.exp(logp) - np.eye(cfg.vocab_size)[tj]) ** 2).sum(-1)
        losses.append(per[valid].mean())
    return np.asarray(np.mean(losses))


def layer(kind: str, cfg: ModelConfig, inputs: list, p: dict, ids=None, targets=None) -> dict:
    """One layer of the debugger's graph: {output role: float64 array}. The main output is "out"
    ("loss" for the loss); attention and the MLP also return their inner taps by role."""
    if kind == "embedding":
        return {"out": embedding(ids, p)}
    if kind == "add":
        return {"out": inputs[0] + inputs[1]}
    if kind == "layernorm":
        return {"out": layernorm(inputs[0], p, cfg.ln_eps)}
    if kind == "attention":
        return attention(inputs[0], p, cfg.n_heads)
    if kind == "mlp":
        return mlp(inputs[0], p, cfg.activation)
    if kind == "unembed":
        return {"out": inputs[0] @ p["W"].T}                   # logits = x W^T, W [V, C]
    if kind == "linear":
        return {"out": inputs[0] @ p["W"] + _bias(p, "b")}
    if kind == "loss":
        return {"loss": loss(inputs, targets, cfg)}
    raise ValueError(f"no oracle for layer kind {kind!r}")
