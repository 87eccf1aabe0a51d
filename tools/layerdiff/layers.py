"""One layer of the graph, run alone in float64 on three sides: the oracle
(conformance/oracle.py), manual/layers' forward/backward functions, and torch autograd on the
reference module's own submodule. The blame (blame.py) compares them."""
from __future__ import annotations

import numpy as np

from conformance import oracle
from manual import registry
from manual.config import ModelConfig

from .graph import Node


def roles(node: Node, params: dict) -> dict:
    """{role: array} of the node's parameters, from {canonical name: array}."""
    return {role: params[name] for role, name in node.params.items()}


def oracle_outputs(node: Node, cfg: ModelConfig, x: dict, p: dict, ids=None, targets=None) -> dict:
    """{tap: float64 array} of every tap `node` writes, from inputs x {tap: array} and params p {role: array}."""
    vals = oracle.layer(node.kind, cfg, [x[t] for t in node.inputs], p, ids, targets)
    if node.kind in ("attention", "mlp"):         # every inner tap, by its last name part (h.0.attn.q -> q)
        return {t: vals[t.rsplit(".", 1)[1]] for t in node.outputs}
    return {node.outputs[0]: vals["loss" if node.kind == "loss" else "out"]}


def manual_layer(node: Node, cfg: ModelConfig, x: dict, p: dict, dout, ids=None, targets=None):
    """Run manual/layers' forward and backward of one layer in float64.
    Returns (main output, {input tap or role: gradient})."""
    import manual.layers as L    # looked up at call time: a fault of the zoo patches these names
    k, g = node.kind, {role: np.zeros_like(v) for role, v in p.items()}
    c = {t: np.array(v, copy=True) for t, v in x.items()}
    if k == "embedding":
        y, cache = L.embedding_forward(ids, p["wte"].copy(), p["wpe"].copy())
        L.embedding_backward(dout, cache, g["wte"], g["wpe"])
        return y, g
    if k == "add":
        a, b = node.inputs
        return c[a] + c[b], {a: dout.copy(), b: dout.copy()}
    if k == "layernorm":
        y, cache = L.layernorm_forward(c[node.inputs[0]], p["w"], p.get("b"), cfg.ln_eps)
        g[node.inputs[0]] = L.layernorm_backward(dout, cache, g["w"], g.get("b"))
        return y, g
    if k == "attention":
        taps, cache = L.attention_forward(c[node.inputs[0]], p["W_attn"], p.get("b_attn"), p["W_proj"],
                                          p.get("b_proj"), cfg.n_heads, flash=cfg.attention == "flash")
        g[node.inputs[0]] = L.attention_backward(dout, cache, g["W_attn"], g.get("b_attn"), g["W_proj"],
                                                 g.get("b_proj"))
        return taps["out"], g
    if k == "mlp":
        (_fc, _act, out), cache = L.mlp_forward(c[node.inputs[0]], p["W1"], p.get("b1"), p["W2"], p.get("b2"),
                                                cfg.activation)
        g[node.inputs[0]] = L.mlp_backward(dout, cache, g["W1"], g.get("b1"), g["W2"], g.get("b2"))
        return out, g
    if k == "unembed":
        y, cache = L.unembed_forward(c[node.inputs[0]], p["W"])
        g[node.inputs[0]] = L.unembed_backward(dout, cache, g["W"])
        return y, g
    if k == "linear":
        y, cache = L.linear_forward(c[node.inputs[0]], p["W"], p.get("b"))
        g[node.inputs[0]] = L.linear_backward(dout, cache, g["W"], g.get("b"))
        return y, g
    if k == "loss":
        caches, losses = [], []
        for j, head in enumerate(node.inputs, start=1):
            (lj, nj), cj = L.loss_forward(c[head], registry.future_targets(targets, j, cfg.pad_id), cfg.pad_id,
                                          cfg.temperature, cfg.loss)
            caches.append((head, nj, cj))
            if nj:
                losses.append(float(lj))
        n_active = len(losses)
        for head, nj, cj in caches:
            # a head without targets is not in the loss: zero gradient (loss_backward refuses n = 0)
            g[head] = L.loss_backward(float(dout) / n_active, cj) if nj else np.zeros_like(c[head])
        return np.asarray(np.mean(losses)), g
    raise ValueError(f"no manual layer for kind {k!r}")


def reference_layer(node: Node, module, cfg: ModelConfig, x: dict, dout, ids=None, targets=None):
    """torch autograd on the reference module's own submodule (float64).
    Returns (main output, {input tap or role: gradient})."""
    import torch
    from reference.model import canonical_parameters
    named = canonical_parameters(module)
    role_names = list(node.params)
    ps = [named[node.params[r]] for r in role_names]
    xs = {t: torch.tensor(v, dtype=torch.float64, requires_grad=True) for t, v in x.items()}
    k = node.kind
    tr = module.transformer
    if k in ("layernorm", "attention", "mlp"):
        if node.name == "ln_f":
            sub = tr.ln_f
        else:
            _h, i, part = node.name.split(".")
            sub = getattr(tr.h[int(i)], part)
        y = sub(xs[node.inputs[0]])
    elif k == "embedding":
        y = tr.wte(torch.from_numpy(ids)) + tr.wpe(torch.arange(ids.shape[1]))
    elif k == "add":
        y = xs[node.inputs[0]] + xs[node.inputs[1]]
    elif k == "unembed":
        y = module.lm_head(xs[node.inputs[0]])
    elif k == "linear":
        y = module.mtp[node.name.split(".")[1]](xs[node.inputs[0]])
    elif k == "loss":
        losses = []
        for j, head in enumerate(node.inputs, start=1):
            tj = registry.future_targets(targets, j, cfg.pad_id)
            if (tj != cfg.pad_id).any():
                losses.append(module.head_loss(xs[head], torch.from_numpy(tj)))
        y = torch.stack(losses).mean()
    else:
        raise ValueError(f"no reference layer for kind {k!r}")
    total = (y * torch.as_tensor(dout, dtype=torch.float64)).sum()
    wrt = [xs[t] for t in node.inputs if t in xs] + ps
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    names = [t for t in node.inputs if t in xs] + role_names
    out = {n: (np.zeros(tuple(w.shape)) if gr is None else gr.detach().numpy().copy())
           for n, w, gr in zip(names, wrt, grads)}
    return y.detach().numpy().copy(), out
