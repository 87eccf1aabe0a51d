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
"""
from __future__ import annotations

from typing import NamedTuple

from .attention import FLASH_BLOCK, AttentionCache, attention_backward, attention_forward
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .mlp import MLPCache, mlp_backward, mlp_forward


class BlockCache(NamedTuple):
    """The caches of the block's four layers, in forward order for 'pre' (for 'post' the
    attention runs first; the fields keep the layers' names)."""
    ln_1: LayerNormCache
    attn: AttentionCache
    ln_2: LayerNormCache
    mlp: MLPCache
    norm: str                  # 'pre' or 'post'


def block_forward(x, p, cfg, flash_block=FLASH_BLOCK):
    """x (B, T, C) -> out (B, T, C). Returns (out, taps, cache)."""
    flash = cfg.attention == "flash"
    taps = {}

    def attn(inp):
        t, c = attention_forward(inp, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"),
                                 p["attn.c_proj.weight"], p.get("attn.c_proj.bias"),
                                 cfg.n_heads, flash=flash, block=flash_block)
        taps.update({f"attn.{k}": v for k, v in t.items()})
        return t["out"], c

    def mlp(inp):
        (fc, act, out), c = mlp_forward(inp, p["mlp.c_fc.weight"], p.get("mlp.c_fc.bias"),
                                        p["mlp.c_proj.weight"], p.get("mlp.c_proj.bias"), cfg.activation)
        taps.update({"mlp.fc": fc, "mlp.act": act, "mlp.out": out})
        return out, c

    # The two orders are written out in full on purpose (a twin, not a repetition): each reads as its
    # equations in the module docstring, and block_backward reverses each one line by line.
    if cfg.norm == "pre":
        a, c_ln1 = layernorm_forward(x, p["ln_1.weight"], p.get("ln_1.bias"), cfg.ln_eps)  # (B, T, C)
        taps["ln_1.out"] = a
        attn_out, c_attn = attn(a)                             # (B, T, C)
        r1 = x + attn_out                                      # (B, T, C)
        taps["resid_1"] = r1
        m, c_ln2 = layernorm_forward(r1, p["ln_2.weight"], p.get("ln_2.bias"), cfg.ln_eps)  # (B, T, C)
        taps["ln_2.out"] = m
        mlp_out, c_mlp = mlp(m)                                # (B, T, C)
        out = r1 + mlp_out                                     # (B, T, C)
    else:
        attn_out, c_attn = attn(x)                             # (B, T, C)
        r1 = x + attn_out                                      # (B, T, C)
        taps["resid_1"] = r1
        a, c_ln1 = layernorm_forward(r1, p["ln_1.weight"], p.get("ln_1.bias"), cfg.ln_eps)  # (B, T, C)
        taps["ln_1.out"] = a
        mlp_out, c_mlp = mlp(a)                                # (B, T, C)
        r2 = a + mlp_out                                       # (B, T, C)
        taps["resid_2"] = r2
        out, c_ln2 = layernorm_forward(r2, p["ln_2.weight"], p.get("ln_2.bias"), cfg.ln_eps)  # (B, T, C)
    taps["out"] = out
    return out, taps, BlockCache(c_ln1, c_attn, c_ln2, c_mlp, cfg.norm)


def block_backward(dout, cache, g, record=None):
    """dout (B, T, C) -> dx (B, T, C); accumulates into the gradient buffers in `g`.

    If `record` is a dict, every tap's gradient is stored in it (keys as the taps).
    """
    c = cache
    rec_attn, rec_mlp = ({}, {}) if record is not None else (None, None)

    def attn_backward(d):
        return attention_backward(d, c.attn, g["attn.c_attn.weight"], g.get("attn.c_attn.bias"),
                                  g["attn.c_proj.weight"], g.get("attn.c_proj.bias"), record=rec_attn)

    def mlp_back(d):
        return mlp_backward(d, c.mlp, g["mlp.c_fc.weight"], g.get("mlp.c_fc.bias"),
                            g["mlp.c_proj.weight"], g.get("mlp.c_proj.bias"), record=rec_mlp)

    if c.norm == "pre":
        # out = r1 + mlp(m): dout flows to both r1 and mlp.out
        dm = mlp_back(dout)                                    # (B, T, C)
        # m = LN2(r1)
        dr1 = dout + layernorm_backward(dm, c.ln_2, g["ln_2.weight"], g.get("ln_2.bias"))  # (B, T, C)
        # r1 = x + attn(a): dr1 flows to both x and attn.out
        da = attn_backward(dr1)                                # (B, T, C)
        # a = LN1(x)
        dx = dr1 + layernorm_backward(da, c.ln_1, g["ln_1.weight"], g.get("ln_1.bias"))  # (B, T, C)
        if record is not None:
            record.update({"out": dout, "mlp.out": dout, "ln_2.out": dm, "resid_1": dr1, "ln_1.out": da})
    else:
        # out = LN2(r2)
        dr2 = layernorm_backward(dout, c.ln_2, g["ln_2.weight"], g.get("ln_2.bias"))  # (B, T, C)
        # r2 = a + mlp(a): a feeds both the residual and the MLP
        da = dr2 + mlp_back(dr2)                               # (B, T, C)
        # a = LN1(r1)
        dr1 = layernorm_backward(da, c.ln_1, g["ln_1.weight"], g.get("ln_1.bias"))  # (B, T, C)
        # r1 = x + attn(x): x feeds both the residual and the attention
        dx = dr1 + attn_backward(dr1)                          # (B, T, C)
        if record is not None:
            record.update({"out": dout, "resid_2": dr2, "mlp.out": dr2, "ln_1.out": da, "resid_1": dr1,
                           "attn.out": dr1})
    if record is not None:
        record.update({f"attn.{k}": v for k, v in rec_attn.items()})
        record.update({f"mlp.{k}": v for k, v in rec_mlp.items()})
    return dx
