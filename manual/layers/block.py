"""One transformer block: attention and feed-forward sub-layers with residuals and layer norms.

    pre-LN (GPT-2):                          post-LN (original transformer):
      a   = LN1(x)                             (attention on x)
      r1  = x + attn(a)                        r1 = x + attn(x)
      m   = LN2(r1)                            a  = LN1(r1)
      out = r1 + mlp(m)                        r2 = a + mlp(a)
                                               out = LN2(r2)
x, out (B, T, C). A residual add has no cache; its backward copies the gradient to both
branches, and where two branches meet (x feeds both LN1 and the residual) the gradients add.

`p` and `g` are the block's parameters and gradient buffers keyed by their canonical names
without the "transformer.h.{i}." prefix ("ln_1.weight", "attn.c_attn.weight", ...); biases are
absent when cfg.bias is False. Taps are returned keyed without the "h.{i}." prefix.
`ws`: an optional Workspace (manual/layers/workspace.py) scoped to the block; each layer gets its own
scope, the residual sums and their gradients are the block's named arrays.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .attention import FLASH_BLOCK, AttentionCache, attention_backward, attention_forward
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .mlp import MLPCache, mlp_backward, mlp_forward
from .workspace import out as ws_out
from .workspace import ws_kw


class BlockCache(NamedTuple):
    """The caches of the block's four layers, in forward order for 'pre' (for 'post' the
    attention runs first; the fields keep the layers' names)."""
    ln_1: LayerNormCache
    attn: AttentionCache
    ln_2: LayerNormCache
    mlp: MLPCache
    norm: str                  # 'pre' or 'post'


def block_forward(x, p, cfg, flash_block=FLASH_BLOCK, ws=None):
    """x (B, T, C) -> out (B, T, C). Returns (out, taps, cache)."""
    flash = cfg.attention == "flash"
    taps = {}

    def attn(inp):
        t, c = attention_forward(inp, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"),
                                 p["attn.c_proj.weight"], p.get("attn.c_proj.bias"),
                                 cfg.n_heads, flash=flash, block=flash_block, **ws_kw(ws, "attn"))
        taps.update({f"attn.{k}": v for k, v in t.items()})
        return t["out"], c

    def mlp(inp):
        (fc, act, out), c = mlp_forward(inp, p["mlp.c_fc.weight"], p.get("mlp.c_fc.bias"),
                                        p["mlp.c_proj.weight"], p.get("mlp.c_proj.bias"), cfg.activation,
                                        **ws_kw(ws, "mlp"))
        taps.update({"mlp.fc": fc, "mlp.act": act, "mlp.out": out})
        return out, c

    def ln(name, inp):
        return layernorm_forward(inp, p[f"{name}.weight"], p.get(f"{name}.bias"), cfg.ln_eps, **ws_kw(ws, name))

    def add(name, a, b):
        return np.add(a, b, out=ws_out(ws, name, a.shape, a.dtype))   # a residual sum

    # The two orders are written out in full on purpose (a twin, not a repetition): each reads as its
    # equations in the module docstring, and block_backward reverses each one line by line.
    if cfg.norm == "pre":
        a, c_ln1 = ln("ln_1", x)                               # (B, T, C)
        taps["ln_1.out"] = a
        attn_out, c_attn = attn(a)                             # (B, T, C)
        r1 = add("resid_1", x, attn_out)                       # (B, T, C) x + attn(a)
        taps["resid_1"] = r1
        m, c_ln2 = ln("ln_2", r1)                              # (B, T, C)
        taps["ln_2.out"] = m
        mlp_out, c_mlp = mlp(m)                                # (B, T, C)
        out = add("out", r1, mlp_out)                          # (B, T, C) r1 + mlp(m)
    else:
        attn_out, c_attn = attn(x)                             # (B, T, C)
        r1 = add("resid_1", x, attn_out)                       # (B, T, C) x + attn(x)
        taps["resid_1"] = r1
        a, c_ln1 = ln("ln_1", r1)                              # (B, T, C)
        taps["ln_1.out"] = a
        mlp_out, c_mlp = mlp(a)                                # (B, T, C)
        r2 = add("resid_2", a, mlp_out)                        # (B, T, C) a + mlp(a)
        taps["resid_2"] = r2
        out, c_ln2 = ln("ln_2", r2)                            # (B, T, C)
    taps["out"] = out
    return out, taps, BlockCache(c_ln1, c_attn, c_ln2, c_mlp, cfg.norm)


def block_backward(dout, cache, g, record=None, ws=None):
    """dout (B, T, C) -> dx (B, T, C); accumulates into the gradient buffers in `g`.

    If `record` is a dict, every tap's gradient is stored in it (keys as the taps).
    Where two gradients meet (`dout + dln`), the sum is made in place in the array the layer's
    backward just returned (same sum, one array fewer).
    """
    c = cache
    rec_attn, rec_mlp = ({}, {}) if record is not None else (None, None)

    def attn_backward(d):
        return attention_backward(d, c.attn, g["attn.c_attn.weight"], g.get("attn.c_attn.bias"),
                                  g["attn.c_proj.weight"], g.get("attn.c_proj.bias"), record=rec_attn,
                                  **ws_kw(ws, "attn"))

    def mlp_back(d):
        return mlp_backward(d, c.mlp, g["mlp.c_fc.weight"], g.get("mlp.c_fc.bias"),
                            g["mlp.c_proj.weight"], g.get("mlp.c_proj.bias"), record=rec_mlp, **ws_kw(ws, "mlp"))

    def ln_backward(name, d, c_ln):
        return layernorm_backward(d, c_ln, g[f"{name}.weight"], g.get(f"{name}.bias"), **ws_kw(ws, name))

    if c.norm == "pre":
        # out = r1 + mlp(m): dout flows to both r1 and mlp.out
        dm = mlp_back(dout)                                    # (B, T, C)
        # m = LN2(r1)
        dr1 = ln_backward("ln_2", dm, c.ln_2)                  # (B, T, C)
        dr1 += dout                                            # dout + dLN2
        # r1 = x + attn(a): dr1 flows to both x and attn.out
        da = attn_backward(dr1)                                # (B, T, C)
        # a = LN1(x)
        dx = ln_backward("ln_1", da, c.ln_1)                   # (B, T, C)
        dx += dr1                                              # dr1 + dLN1
        if record is not None:
            record.update({"out": dout, "mlp.out": dout, "ln_2.out": dm, "resid_1": dr1, "ln_1.out": da})
    else:
        # out = LN2(r2)
        dr2 = ln_backward("ln_2", dout, c.ln_2)                # (B, T, C)
        # r2 = a + mlp(a): a feeds both the residual and the MLP
        da = mlp_back(dr2)                                     # (B, T, C)
        da += dr2                                              # dr2 + dmlp
        # a = LN1(r1)
        dr1 = ln_backward("ln_1", da, c.ln_1)                  # (B, T, C)
        # r1 = x + attn(x): x feeds both the residual and the attention
        dx = attn_backward(dr1)                                # (B, T, C)
        dx += dr1                                              # dr1 + dattn
        if record is not None:
            record.update({"out": dout, "resid_2": dr2, "mlp.out": dr2, "ln_1.out": da, "resid_1": dr1,
                           "attn.out": dr1})
    if record is not None:
        record.update({f"attn.{k}": v for k, v in rec_attn.items()})
        record.update({f"mlp.{k}": v for k, v in rec_mlp.items()})
    return dx
