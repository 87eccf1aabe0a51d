"""The model as a graph of layers (nodes), built from the registry: the taps of
registry.tap_specs and the block topology registry.BLOCK_TOPOLOGY (stated once, there).

A node reads taps (`inputs`) and writes taps (`outputs`, main output last). For each tensor of
the walk, `culprits` names the layer(s) that wrote it and `where` says it in words, with the file
and function of manual/layers to open.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from manual import registry
from manual.config import ModelConfig

LAYER_FILES = {   # node kind -> (file in manual/layers, function prefix)
    "embedding": ("embedding.py", "embedding"), "layernorm": ("layernorm.py", "layernorm"),
    "attention": ("attention.py", "attention"), "mlp": ("mlp.py", "mlp"), "add": ("block.py", "block"),
    "unembed": ("linear.py", "unembed"), "linear": ("linear.py", "linear"), "loss": ("loss.py", "loss"),
}

# node kind -> (role, parameter suffix): the roles are the argument names of conformance/oracle.py
# and of the layer runners (tools/layerdiff/layers.py); an absent bias is left out.
PARAM_ROLES = {
    "layernorm": (("w", "weight"), ("b", "bias")),
    "attention": (("W_attn", "c_attn.weight"), ("b_attn", "c_attn.bias"), ("W_proj", "c_proj.weight"),
                  ("b_proj", "c_proj.bias")),
    "mlp": (("W1", "c_fc.weight"), ("b1", "c_fc.bias"), ("W2", "c_proj.weight"), ("b2", "c_proj.bias")),
    "linear": (("W", "weight"), ("b", "bias")),
}


@dataclass
class Node:
    name: str            # "embed", "h.0.ln_1", "h.0.attn", "h.0.resid_1" (a residual add), "ln_f", "loss", ...
    kind: str            # embedding | layernorm | attention | mlp | add | unembed | linear | loss
    inputs: list         # differentiable inputs: tap names
    outputs: list        # taps it writes, main output last ("loss" for the loss)
    params: dict = field(default_factory=dict)   # role -> canonical parameter name


def _params(cfg: ModelConfig, kind: str, prefix: str) -> dict:
    have = registry.param_shapes(cfg)
    return {role: f"{prefix}.{suffix}" for role, suffix in PARAM_ROLES.get(kind, ())
            if f"{prefix}.{suffix}" in have}


def nodes(cfg: ModelConfig) -> list[Node]:
    """The layers in forward order, each with the taps it reads and writes."""
    taps = registry.tap_specs(cfg)
    W_out = "transformer.wte.weight" if cfg.tie_embeddings else "lm_head.weight"
    out = [Node("embed", "embedding", [], ["embed.out"],
                {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight"})]
    x = "embed.out"
    for i in range(cfg.n_layers):
        h = f"h.{i}"

        def tap(local):
            return x if local == "x" else f"{h}.{local}"

        for sub in registry.block_topology(cfg):
            if sub.kind in ("attention", "mlp"):        # every tap the sub-layer writes
                outputs = [s.name for s in taps if s.layer == f"{h}.{sub.name}"]
            else:
                outputs = [tap(sub.output)]
            out.append(Node(f"{h}.{sub.name}", sub.kind, [tap(t) for t in sub.inputs], outputs,
                            _params(cfg, sub.kind, f"transformer.{h}.{sub.name}")))
        x = f"{h}.out"
    out.append(Node("ln_f", "layernorm", [x], ["ln_f.out"], _params(cfg, "layernorm", "transformer.ln_f")))
    out.append(Node("lm_head", "unembed", ["ln_f.out"], ["logits"], {"W": W_out}))
    heads = ["logits"]
    for j in range(2, cfg.n_future + 1):
        out.append(Node(f"mtp.{j}", "linear", ["ln_f.out"], [f"mtp.{j}.out"], _params(cfg, "linear", f"mtp.{j}")))
        out.append(Node(f"lm_head(mtp.{j})", "unembed", [f"mtp.{j}.out"], [f"mtp.{j}.logits"], {"W": W_out}))
        heads.append(f"mtp.{j}.logits")
    out.append(Node("loss", "loss", heads, ["loss"]))
    return out


def culprits(cfg: ModelConfig, tensor: str) -> list[Node]:
    """The layer(s) that wrote `tensor`: forward: its producer; grad.<tap>: the backward of the
    layers that consume the tap (or of its own layer, for a tap inside attention / the MLP);
    grad.<param>: the layer(s) that use the parameter (the tied wte: the embedding and the
    output projection(s))."""
    ns = nodes(cfg)
    if not tensor.startswith("grad."):
        return [n for n in ns if tensor in n.outputs]
    name = tensor[len("grad."):]
    if name in registry.param_shapes(cfg):
        return [n for n in ns if name in n.params.values()]
    producer = next((n for n in ns if name in n.outputs), None)
    if producer is not None and name != producer.outputs[-1]:
        return [producer]                      # a tap inside attention / the MLP: its own backward
    consumers = [n for n in ns if name in n.inputs]
    real = [n for n in consumers if n.kind != "add"]
    return real or consumers


def where(cfg: ModelConfig, tensor: str) -> str:
    """'h.1.ln_2 (manual/layers/layernorm.py: layernorm_forward)' for the layer(s) that wrote tensor."""
    backward = tensor.startswith("grad.")
    direction = "backward" if backward else "forward"
    parts = []
    for n in culprits(cfg, tensor):
        file, fn = LAYER_FILES[n.kind]
        func = f"{fn}_{direction}"
        if n.kind == "mlp" and tensor.endswith(".mlp.fc" if backward else ".mlp.act"):
            func = f"{cfg.activation}_{direction}, called by mlp_{direction}"
            file = "activations.py"
        label = n.name if n.kind != "add" else f"{n.name} (residual add)"
        parts.append(f"{label} (manual/layers/{file}: {func})")
    return " + ".join(parts) if parts else "?"
