"""layerdiff: the layer-by-layer gradient debugger. Which tensor went wrong first, in which layer,
and which side is to blame.

    python tools/layerdiff.py                                  # tiny preset, float64, one batch
    python tools/layerdiff.py --norm post --activation relu --dtype float32
    python tools/layerdiff.py --checkpoint run/checkpoint.safetensors --ids ids.npy --targets targets.npy
    python tools/layerdiff.py --inject ln_gamma_grad_assigned --diff-only      # a bug from the zoo
    python tools/layerdiff.py --steps 5                        # then 5 AdamW steps, step by step
    python tools/layerdiff.py --export-case case/             # checkpoint + batch for your own port
    python tools/layerdiff.py --case case/ --against my_port_dump.safetensors
    python tools/layerdiff.py --zoo --json zoo.json            # every fault of tools/faults.py
    python tools/layerdiff.py --list-faults

What it does. Both implementations (manual/ NumPy, reference/ PyTorch; or your dump against
the reference) get identical weights and the identical batch. One forward and one backward,
then every named tensor is compared with conformance.compare.compare (the suite's function and
tolerances: float64 1e-9 of each tensor's scale; float32 torch.testing's table), in this order:

    1. the taps (named activations) in forward order, then the loss;
    2. the tap gradients, grad.<tap>, in backward order (the taps read bottom-up);
    3. the parameter gradients, grad.<param>, in reverse registry order (the order backward
       produces them);
    4. with --steps N: an optimizer trajectory (AdamW, or SGD with --optimizer sgd, with the conformance suite's
       hyperparameters, decay groups and global-norm clipping), step by step: loss, grad.<p>,
       grad_norm, clipped_grad.<p>, param.<p>, optim.exp_avg(_sq).<p>, stopping after the first
       step that disagrees.

One row per tensor (name, shape, max abs error, max relative error, tolerance, OK/DIFF). The
FIRST divergent tensor in that order is named with the layer function that produced it:
for an activation, the layer whose forward wrote it; for a gradient, the layer whose
backward wrote it (the layer that CONSUMES the tap in the forward, or the tap's own layer for
a tap inside attention / the MLP; for a parameter, the layer that owns it).

Then, for that layer alone, who is wrong:
  * forward divergence: each side's output is compared with a float64 recomputation from
    the layer's inputs, written here in NumPy straight from docs/design.md's formulas (an oracle
    that shares no code with either side);
  * backward divergence: a float64 finite-difference check of both sides' backward:
    manual: manual/layers' forward/backward functions on the captured input; reference:
    torch autograd on the reference module's own submodule. Each gradient is checked along
    3 random directions per argument, (L(x + h v) - L(x - h v)) / 2h against <grad, v>,
    L = sum(dout * layer(x)), with the oracle's forward;
  * optimizer divergence: the step is redone in float64 from the reference's state before it.
The verdict is "manual", "reference", "neither (...)" or "both".

Exit status: 0 when every tensor agrees, 1 when something diverges, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from conformance.compare import Comparison, compare  # noqa: E402
from manual import registry  # noqa: E402
from manual.config import PRESETS, ModelConfig  # noqa: E402

from conformance.engine import OPTIMIZERS, make_optimizers  # noqa: E402  (the suite's trajectory settings)
from tools._args import CHECKPOINT_NAME, int_at_least, set_blas_threads  # noqa: E402

FD_DIRECTIONS = 3          # random directions per argument in the finite-difference check
FD_REL_TOL = 1e-6          # |<g, v> - fd| <= FD_REL_TOL * scale of the directional derivative

LAYER_FILES = {   # node kind -> (file in manual/layers, function prefix)
    "embedding": ("embedding.py", "embedding"), "layernorm": ("layernorm.py", "layernorm"),
    "attention": ("attention.py", "attention"), "mlp": ("mlp.py", "mlp"), "add": ("block.py", "block"),
    "unembed": ("linear.py", "unembed"), "linear": ("linear.py", "linear"), "loss": ("loss.py", "loss"),
}


# ================================================================================================
# inputs: one config, one set of weights, one batch

@dataclass
class Setup:
    cfg: ModelConfig
    params: dict                    # {canonical name: ndarray} in cfg.dtype
    ids: np.ndarray                 # (B, T) int64
    targets: np.ndarray             # (B, T) int64
    label: str = ""
    seed: int = 0                   # batch seed (trajectory batches are drawn from it, as the engine does)
    pad: bool = True
    own_batch: bool = False         # ids/targets given by the user: the trajectory repeats them

    def trajectory(self, steps: int):
        if self.own_batch:
            return [(self.ids, self.targets)] * steps
        from conformance.engine import make_batch
        B, T = self.ids.shape
        return [make_batch(self.cfg, B, T, self.seed + 1 + s, self.pad) for s in range(steps)]


def make_setup(cfg: ModelConfig, seed: int = 0, batch: int = 2, seq_len: int | None = 8, batch_seed: int = 0,
               pad: bool = True, params: dict | None = None, label: str = "") -> Setup:
    """Weights registry.init_params(cfg, seed) (or `params`) and the conformance engine's batch."""
    from conformance.engine import make_batch
    T = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)
    ids, targets = make_batch(cfg, batch, T, batch_seed, pad)
    params = registry.init_params(cfg, seed) if params is None else params
    return Setup(cfg, params, ids, targets, label or _cfg_label(cfg), batch_seed, pad)


def _cfg_label(cfg: ModelConfig, preset: str = "tiny") -> str:
    """'tiny float64 norm=post' : the preset, the dtype and every field that differs from the preset."""
    base = ModelConfig.preset(preset) if preset in PRESETS else ModelConfig()
    diff = [f"{k}={v}" for k, v in cfg.to_dict().items() if getattr(base, k) != v and k != "dtype"]
    return " ".join([preset, cfg.dtype] + diff)


# ================================================================================================
# the tensors of one forward + backward, in the dump format: <tap>, loss, grad.<tap>, grad.<param>

def tensors_of(model) -> dict[str, np.ndarray]:
    """Every named tensor of a model's last forward + backward, keyed as in a dump file."""
    dt = np.dtype(model.cfg.dtype)
    out = {name: np.array(v, copy=True) for name, v in model.taps.items()}
    out["loss"] = np.asarray(model.loss, dtype=dt)
    out.update({f"grad.{name}": np.array(v, copy=True) for name, v in model.tap_grads.items()})
    out.update({f"grad.{name}": np.array(v, copy=True) for name, v in model.grads.items()})
    return out


def run_model(cls, setup: Setup) -> dict[str, np.ndarray]:
    model = cls.from_params(setup.cfg, setup.params)
    model.zero_grad()
    model.forward(setup.ids, setup.targets)
    model.backward()
    return tensors_of(model)


def expected_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(name, check) of every tensor in walk order: taps, loss, tap grads backward, param grads backward."""
    taps = [s.name for s in registry.tap_specs(cfg)]
    out = [(n, "activation") for n in taps] + [("loss", "loss")]
    out += [(f"grad.{n}", "activation_grad") for n in reversed(taps)]
    out += [(f"grad.{s.name}", "param_grad") for s in reversed(registry.param_specs(cfg))]
    return out


def expected_shapes(cfg: ModelConfig, B: int, T: int) -> dict[str, tuple]:
    taps = registry.tap_shapes(cfg, B, T)
    shapes = dict(taps)
    shapes["loss"] = ()
    shapes.update({f"grad.{n}": s for n, s in taps.items()})
    shapes.update({f"grad.{n}": s for n, s in registry.param_shapes(cfg).items()})
    return shapes


def walk(a: dict, b: dict, cfg: ModelConfig, label: str = "") -> list[Comparison]:
    """Compare tensors `a` (under test) against `b` (reference) in walk order. Names absent from
    `a` are skipped (a dump may leave some out); absent from `b` is an error of the caller."""
    dt = np.dtype(cfg.dtype)
    rows = []
    for name, check in expected_names(cfg):
        if name not in a:
            continue
        rows.append(compare(a[name], b[name], tensor=name, check=check, config=label, expect_dtype=dt))
    return rows


def first_failure(rows: list[Comparison]) -> Comparison | None:
    return next((c for c in rows if not c.passed), None)


# ================================================================================================
# the model as a graph of layers (nodes), from the registry's taps

@dataclass
class Node:
    name: str            # "embed", "h.0.ln_1", "h.0.attn", "h.0.resid_1" (a residual add), "ln_f", "loss", ...
    kind: str            # embedding | layernorm | attention | mlp | add | unembed | linear | loss
    inputs: list         # differentiable inputs: tap names
    outputs: list        # taps it writes, main output last ("loss" for the loss)
    params: dict = field(default_factory=dict)   # role -> canonical parameter name


def nodes(cfg: ModelConfig) -> list[Node]:
    """The layers in forward order, each with the taps it reads and writes (see registry.tap_specs)."""
    W_out = "transformer.wte.weight" if cfg.tie_embeddings else "lm_head.weight"

    def P(prefix, *roles):
        out = {}
        for role, suffix in roles:
            if suffix.endswith("bias") and not cfg.bias:
                continue
            out[role] = f"{prefix}.{suffix}"
        return out

    def ln(name, prefix, x, out):
        return Node(name, "layernorm", [x], [out], P(prefix, ("w", "weight"), ("b", "bias")))

    out = [Node("embed", "embedding", [], ["embed.out"],
                {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight"})]
    x = "embed.out"
    for i in range(cfg.n_layers):
        h, p = f"h.{i}", f"transformer.h.{i}"
        attn_taps = [f"{h}.attn.{t}" for t in ("q", "k", "v")]
        if cfg.attention == "standard":
            attn_taps += [f"{h}.attn.att", f"{h}.attn.probs"]
        attn_taps += [f"{h}.attn.ctx", f"{h}.attn.out"]
        attn_params = P(f"{p}.attn", ("W_attn", "c_attn.weight"), ("b_attn", "c_attn.bias"),
                        ("W_proj", "c_proj.weight"), ("b_proj", "c_proj.bias"))
        mlp_params = P(f"{p}.mlp", ("W1", "c_fc.weight"), ("b1", "c_fc.bias"), ("W2", "c_proj.weight"),
                       ("b2", "c_proj.bias"))
        mlp_taps = [f"{h}.mlp.fc", f"{h}.mlp.act", f"{h}.mlp.out"]
        if cfg.norm == "pre":
            out += [ln(f"{h}.ln_1", f"{p}.ln_1", x, f"{h}.ln_1.out"),
                    Node(f"{h}.attn", "attention", [f"{h}.ln_1.out"], attn_taps, attn_params),
                    Node(f"{h}.resid_1", "add", [x, f"{h}.attn.out"], [f"{h}.resid_1"]),
                    ln(f"{h}.ln_2", f"{p}.ln_2", f"{h}.resid_1", f"{h}.ln_2.out"),
                    Node(f"{h}.mlp", "mlp", [f"{h}.ln_2.out"], mlp_taps, mlp_params),
                    Node(f"{h}.out", "add", [f"{h}.resid_1", f"{h}.mlp.out"], [f"{h}.out"])]
        else:
            out += [Node(f"{h}.attn", "attention", [x], attn_taps, attn_params),
                    Node(f"{h}.resid_1", "add", [x, f"{h}.attn.out"], [f"{h}.resid_1"]),
                    ln(f"{h}.ln_1", f"{p}.ln_1", f"{h}.resid_1", f"{h}.ln_1.out"),
                    Node(f"{h}.mlp", "mlp", [f"{h}.ln_1.out"], mlp_taps, mlp_params),
                    Node(f"{h}.resid_2", "add", [f"{h}.ln_1.out", f"{h}.mlp.out"], [f"{h}.resid_2"]),
                    ln(f"{h}.ln_2", f"{p}.ln_2", f"{h}.resid_2", f"{h}.out")]
        x = f"{h}.out"
    out.append(ln("ln_f", "transformer.ln_f", x, "ln_f.out"))
    out.append(Node("lm_head", "unembed", ["ln_f.out"], ["logits"], {"W": W_out}))
    heads = ["logits"]
    for j in range(2, cfg.n_future + 1):
        out.append(Node(f"mtp.{j}", "linear", ["ln_f.out"], [f"mtp.{j}.out"],
                        P(f"mtp.{j}", ("W", "weight"), ("b", "bias"))))
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
    parts = []
    for n in culprits(cfg, tensor):
        file, fn = LAYER_FILES[n.kind]
        func = f"{fn}_{'backward' if backward else 'forward'}"
        if n.kind == "mlp" and tensor.endswith(".mlp.act" if not backward else ".mlp.fc"):
            func = f"{cfg.activation}_{'backward' if backward else 'forward'}, called by mlp_{func.split('_')[-1]}"
            file = "activations.py"
        label = n.name if n.kind != "add" else f"{n.name} (residual add)"
        parts.append(f"{label} (manual/layers/{file}: {func})")
    return " + ".join(parts) if parts else "?"


# ================================================================================================
# the float64 oracle: each layer straight from docs/design.md's formulas, NumPy, shares no code

def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def oracle(node: Node, cfg: ModelConfig, x: dict, p: dict, ids=None, targets=None) -> dict:
    """Outputs {tap: float64 array} of `node` from inputs x {tap: array} and params p {role: array}."""
    k = node.kind
    if k == "embedding":
        return {"embed.out": p["wte"][ids] + p["wpe"][: ids.shape[1]]}
    if k == "add":
        return {node.outputs[0]: x[node.inputs[0]] + x[node.inputs[1]]}
    if k == "layernorm":
        v = x[node.inputs[0]]
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        y = (v - mu) / np.sqrt(var + cfg.ln_eps) * p["w"] + (p["b"] if "b" in p else 0.0)
        return {node.outputs[0]: y}
    if k == "attention":
        a = x[node.inputs[0]]
        B, T, C = a.shape
        H = cfg.n_heads
        D = C // H
        qkv = a @ p["W_attn"] + (p["b_attn"] if "b_attn" in p else 0.0)
        q, kk, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, H, D).transpose(0, 2, 1, 3) for i in range(3))
        att = (q @ kk.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(D))
        masked = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, att)
        e = np.exp(masked - masked.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        out = ctx @ p["W_proj"] + (p["b_proj"] if "b_proj" in p else 0.0)
        vals = dict(q=q, k=kk, v=v, att=att, probs=probs, ctx=ctx, out=out)
        return {t: vals[t.rsplit(".", 1)[1]] for t in node.outputs}
    if k == "mlp":
        fc = x[node.inputs[0]] @ p["W1"] + (p["b1"] if "b1" in p else 0.0)
        if cfg.activation == "relu":
            act = np.maximum(fc, 0.0)
        elif cfg.activation == "gelu":
            act = 0.5 * fc * (1.0 + _erf(fc / math.sqrt(2.0)))
        else:
            act = 0.5 * fc * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (fc + 0.044715 * fc ** 3)))
        out = act @ p["W2"] + (p["b2"] if "b2" in p else 0.0)
        return dict(zip(node.outputs, (fc, act, out)))
    if k == "unembed":
        return {node.outputs[0]: x[node.inputs[0]] @ p["W"].T}
    if k == "linear":
        return {node.outputs[0]: x[node.inputs[0]] @ p["W"] + (p["b"] if "b" in p else 0.0)}
    if k == "loss":
        losses = []
        for j, head in enumerate(node.inputs, start=1):
            tj = registry.future_targets(targets, j, cfg.pad_id)
            valid = tj != cfg.pad_id
            if not valid.any():
                continue
            z = x[head] / cfg.temperature
            zmax = z.max(-1, keepdims=True)
            logp = z - zmax - np.log(np.exp(z - zmax).sum(-1, keepdims=True))
            if cfg.loss == "cross_entropy":
                per = -np.take_along_axis(logp, tj[..., None], -1)[..., 0]
            else:
                prob = np.exp(logp)
                onehot = np.eye(cfg.vocab_size)[tj]
                per = ((prob - onehot) ** 2).sum(-1)
            losses.append(per[valid].mean())
        return {"loss": np.asarray(np.mean(losses))}
    raise ValueError(f"no oracle for layer kind {k!r}")


# ================================================================================================
# one layer, both sides, float64: manual/layers functions and the reference's torch submodule

def _roles(node: Node, params: dict) -> dict:
    return {role: params[name] for role, name in node.params.items()}


def manual_layer(node: Node, cfg: ModelConfig, x: dict, p: dict, dout, ids=None, targets=None):
    """Run manual/layers' forward and backward of one layer in float64.
    Returns (main output, {input tap or role: gradient})."""
    import manual.layers as L
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
            g[head] = L.loss_backward(float(dout) / n_active if nj else 0.0, cj)
        return np.asarray(np.mean(losses)), g
    raise ValueError(f"no manual layer for kind {k!r}")


def reference_layer(node: Node, module, cfg: ModelConfig, x: dict, dout, ids=None, targets=None):
    """torch autograd on the reference module's own submodule (float64).
    Returns (main output, {input tap or role: gradient})."""
    import torch
    from reference.model import canonical_parameters
    named = canonical_parameters(module)
    roles = list(node.params)
    ps = [named[node.params[r]] for r in roles]
    xs = {t: torch.tensor(v, dtype=torch.float64, requires_grad=True) for t, v in x.items()}
    k = node.kind
    tr = module.transformer
    if k in ("layernorm", "attention", "mlp"):
        if node.name == "ln_f":
            sub = tr.ln_f
        else:
            i, part = node.name.split(".")[1], node.name.split(".")[2]
            sub = getattr(tr.h[int(i)], part)
        y = sub(xs[node.inputs[0]])
    elif k == "embedding":
        idx = torch.from_numpy(ids)
        y = tr.wte(idx) + tr.wpe(torch.arange(ids.shape[1]))
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
    L = (y * torch.as_tensor(dout, dtype=torch.float64)).sum()
    wrt = [xs[t] for t in node.inputs if t in xs] + ps
    grads = torch.autograd.grad(L, wrt, allow_unused=True)
    names = [t for t in node.inputs if t in xs] + roles
    out = {n: (np.zeros(tuple(w.shape)) if gr is None else gr.detach().numpy().copy())
           for n, w, gr in zip(names, wrt, grads)}
    return y.detach().numpy().copy(), out


def _float64(d: dict) -> dict:
    return {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}


def blame_backward(node: Node, cfg: ModelConfig, params: dict, ref_taps: dict, ids, targets,
                   manual_available: bool = True) -> dict:
    """Float64 finite-difference check of one layer's backward on both sides. Returns a report dict."""
    import reference
    cfg64 = cfg.replace(dtype="float64")
    params64 = _float64(params)
    p = _roles(node, params64)
    x = {t: np.asarray(ref_taps[t], dtype=np.float64) for t in node.inputs}
    rng = np.random.default_rng(1234)
    main = node.outputs[-1]
    y0 = oracle(node, cfg64, x, p, ids, targets)[main]
    dout = np.asarray(1.0) if node.kind == "loss" else rng.standard_normal(np.shape(y0))
    grads = {}
    if manual_available:
        grads["manual"] = manual_layer(node, cfg64, x, p, dout, ids, targets)[1]
    module = reference.Model.from_params(cfg64, params64).module
    grads["reference"] = reference_layer(node, module, cfg64, x, dout, ids, targets)[1]

    def L(xx, pp):
        return float(np.sum(dout * oracle(node, cfg64, xx, pp, ids, targets)[main]))

    args = [("input", t) for t in node.inputs] + [("param", r) for r in node.params]
    result = {side: {} for side in grads}
    for kind_, arg in args:
        base = x[arg] if kind_ == "input" else p[arg]
        label = arg if kind_ == "input" else node.params[arg]
        worst = {side: 0.0 for side in grads}
        for _ in range(FD_DIRECTIONS):
            v = rng.standard_normal(base.shape)
            rms = float(np.sqrt(np.mean(base ** 2))) if base.size else 0.0
            h = 1e-5 * max(rms, 1e-2)
            xp, xm, pp_, pm = dict(x), dict(x), dict(p), dict(p)
            if kind_ == "input":
                xp[arg], xm[arg] = base + h * v, base - h * v
            else:
                pp_[arg], pm[arg] = base + h * v, base - h * v
            fd = (L(xp, pp_) - L(xm, pm)) / (2 * h)
            ana = {side: float(np.sum(g[arg] * v)) for side, g in grads.items()}
            scale = max([abs(fd)] + [float(np.sum(np.abs(g[arg] * v))) for g in grads.values()]) + 1e-300
            for side in grads:
                worst[side] = max(worst[side], abs(ana[side] - fd) / scale)
        for side in grads:
            result[side][label] = worst[side]
    verdict = {side: all(e <= FD_REL_TOL for e in errs.values()) for side, errs in result.items()}
    return {"layer": node.name, "kind": "finite differences (float64, "
            f"{FD_DIRECTIONS} random directions per argument, tol {FD_REL_TOL:g}); relative error of each "
            "gradient", "errors": result, "agrees": verdict, "tol": FD_REL_TOL}


def blame_forward(node: Node, cfg: ModelConfig, params: dict, ref_taps: dict, side_tensors: dict, ids, targets,
                  tensor: str) -> dict:
    """Each side's output of one layer against a float64 recomputation from the layer's inputs."""
    cfg64 = cfg.replace(dtype="float64")
    p = _roles(node, _float64(params))
    x = {t: np.asarray(ref_taps[t], dtype=np.float64) for t in node.inputs}
    want = oracle(node, cfg64, x, p, ids, targets)[tensor]
    errors, agrees = {}, {}
    for side, tensors in side_tensors.items():
        got = np.asarray(tensors[tensor])
        c = compare(got, want.astype(got.dtype), tensor=tensor, check="oracle", expect_dtype=got.dtype)
        errors[side] = {tensor: c.max_abs, "tol": c.tol}
        agrees[side] = c.passed
        errors[side]["badness"] = c.badness
    return {"layer": node.name, "kind": "float64 recomputation from the layer's inputs (NumPy, docs/design.md formulas)",
            "errors": errors, "agrees": agrees}


def verdict_of(agrees: dict, errors: dict | None = None) -> str:
    bad = [s for s, ok in agrees.items() if not ok]
    if not bad:
        return "neither (both agree with finite differences; the difference is precision)"
    if len(bad) == 1:
        return bad[0]
    if errors and all("badness" in errors[s] for s in bad):
        b = sorted(bad, key=lambda s: errors[s]["badness"], reverse=True)
        if errors[b[0]]["badness"] > 100 * max(errors[b[1]]["badness"], 1e-300):
            return b[0]
    return "both"


# ================================================================================================
# the optimizer trajectory

def optimizer_walk(setup: Setup, sides, steps: int, kind: str = "adamw") -> tuple[list[Comparison], dict | None]:
    """`steps` optimizer steps on both sides, compared step by step (loss, grad.<p>, grad_norm,
    clipped_grad.<p>, param.<p>, optim.<state>.<p>); stops after the first step that disagrees.
    Returns (rows, blame or None)."""
    from reference import optim as ropt
    cfg, dt = setup.cfg, np.dtype(setup.cfg.dtype)
    hp, clip = OPTIMIZERS[kind]
    m = sides.manual.from_params(cfg, setup.params)
    r = sides.reference.from_params(cfg, setup.params)
    mo, ro = make_optimizers(sides, m, r, kind)
    forced = kind == "adamw" and dt == np.float32      # as the engine: float32 AdamW is teacher-forced
    names = [s.name for s in registry.param_specs(cfg)]
    rows: list[Comparison] = []

    def cmp(a, b, tensor, step, note=""):
        c = compare(a, b, tensor=f"{kind}.{tensor}", check="optimizer", config=setup.label, step=step,
                    expect_dtype=dt, note=note)
        rows.append(c)
        return c

    for step, (ids, targets) in enumerate(setup.trajectory(steps), start=1):
        start = len(rows)
        mo.zero_grad()
        r.zero_grad()
        before = {"params": {n: v.copy() for n, v in r.params.items()},
                  "state": ropt.optimizer_state(r, ro)}
        lm = m.forward(ids, targets)
        lr_ = r.forward(ids, targets)
        cmp(np.asarray(lm, dt), np.asarray(lr_, dt), "loss", step)
        m.backward()
        r.backward()
        rg = r.grads
        for n in names:
            cmp(m.grads[n], rg[n], f"grad.{n}", step)
        before["grads"] = rg
        if forced:
            for n, g in rg.items():
                m.grads[n][...] = g
        if clip is not None:
            nm = sides.manual_optim.clip_grad_norm_(m.grads, clip)
            nr = ropt.clip_grad_norm(r, clip)
            cmp(np.asarray(nm, dt), np.asarray(nr, dt), "grad_norm", step)
            rg = r.grads
            for n in names:
                cmp(m.grads[n], rg[n], f"clipped_grad.{n}", step)
        before["clipped"] = rg
        mo.step()
        ro.step()
        rp = r.params
        for n in names:
            cmp(m.params[n], rp[n], f"param.{n}", step, "teacher-forced (float32 AdamW)" if forced else "")
        mstate, _ = mo.state_dict()
        rstate = ropt.optimizer_state(r, ro)
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            for n in names:
                k = f"optim.{key}.{n}"
                if k in mstate or k in rstate:
                    cmp(mstate.get(k, np.full((0,), np.nan)), rstate.get(k, np.full((0,), np.nan)), k, step)
        bad = first_failure(rows[start:])
        if bad is not None:
            return rows, blame_optimizer(bad, setup, sides, kind, hp, clip, step, before, m, r, mstate, rstate,
                                         (ids, targets))
    return rows, None


def opt_where(tensor: str, kind: str, step: int) -> str:
    """Which code wrote an optimizer-trajectory tensor."""
    what = tensor[len(kind) + 1:]
    if what == "loss" or what.startswith("grad."):
        return (f"step {step}'s forward/backward (manual/model.py: Model.forward / Model.backward, after "
                f"the optimizer's zero_grad)")
    if what == "grad_norm" or what.startswith("clipped_grad."):
        return f"step {step}'s gradient clipping (manual/optim.py: clip_grad_norm_)"
    return f"step {step}'s update (manual/optim.py: {'AdamW' if kind == 'adamw' else 'SGD'}.step)"


def _textbook_step(kind, hp, p, g, state, step, wd):
    """One optimizer step in float64, torch's documented formulas. Returns (param, {state})."""
    p, g = p.astype(np.float64), g.astype(np.float64)
    if kind == "adamw":
        b1, b2 = hp["betas"]
        m0 = state.get("exp_avg", np.zeros_like(p)).astype(np.float64)
        v0 = state.get("exp_avg_sq", np.zeros_like(p)).astype(np.float64)
        p = p * (1 - hp["lr"] * wd)
        m = b1 * m0 + (1 - b1) * g
        v = b2 * v0 + (1 - b2) * g * g
        p = p - hp["lr"] / (1 - b1 ** step) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** step) + hp["eps"])
        return p, {"exp_avg": m, "exp_avg_sq": v}
    d = g + wd * p
    buf = d if "momentum_buffer" not in state else hp["momentum"] * state["momentum_buffer"] + d
    return p - hp["lr"] * buf, {"momentum_buffer": buf}


def blame_optimizer(bad, setup, sides, kind, hp, clip, step, before, m, r, mstate, rstate, batch) -> dict:
    """Who is wrong at the first disagreeing comparison of the trajectory."""
    cfg = setup.cfg
    what = bad.tensor[len(kind) + 1:]
    out = {"layer": f"{kind} step {step}", "tensor": bad.tensor}
    if what.startswith("grad.") or what == "loss":
        # one forward/backward of a FRESH manual model at these weights
        fresh = sides.manual.from_params(cfg, before["params"])
        fresh.zero_grad()
        fresh.forward(*batch)
        fresh.backward()
        ok = all(compare(fresh.grads[n], before["grads"][n], tensor=n, check="g").passed for n in fresh.grads)
        out["kind"] = "a fresh manual model's forward/backward at the same weights and batch"
        out["agrees"] = {"manual (fresh model)": ok, "manual (after earlier steps)": False}
        out["verdict"] = "manual"
        out["detail"] = ("a fresh model computes the right gradient, so something carried over from earlier "
                         "steps leaks into it: is zero_grad zeroing every gradient buffer?") if ok else \
            "the gradient of this batch is wrong: run the forward/backward walk on it"
        return out
    if what == "grad_norm" or what.startswith("clipped_grad."):
        g = before["grads"]
        total = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g.values()))
        coef = min(clip / (total + 1e-6), 1.0)
        out["kind"] = "global-norm clipping redone in float64 from the reference's unclipped gradients"
        if what == "grad_norm":
            want = {"grad_norm": total}
            got = {"manual": bad.a_value, "reference": bad.b_value}
            agrees = {s: abs(v - total) <= 1e-6 * total for s, v in got.items()}
        else:
            name = what[len("clipped_grad."):]
            want = g[name].astype(np.float64) * coef
            agrees = {"manual": compare(m.grads[name].astype(np.float64), want, tensor=name, check="c").passed,
                      "reference": compare(before["clipped"][name].astype(np.float64), want, tensor=name,
                                           check="c").passed}
        out["agrees"] = agrees
        out["verdict"] = verdict_of(agrees).replace("finite differences", "the float64 recomputation")
        return out
    # param.<p> or optim.<state>.<p>: redo the step in float64 from the reference's state before it
    name = what.split(".", 1)[1] if what.startswith("param.") else what.split(".", 2)[2]
    wd = next(gr["weight_decay"] for gr in registry.decay_groups(cfg, hp["weight_decay"]) if name in gr["names"])
    st = {k.split(".")[1]: v for k, v in before["state"].items() if k.split(".", 2)[2] == name}
    p_new, s_new = _textbook_step(kind, hp, before["params"][name], before["clipped"][name], st, step, wd)
    if what.startswith("param."):
        want, got_m, got_r = p_new, m.params[name], r.params[name]
    else:
        key = what.split(".")[1]
        want, got_m, got_r = s_new[key], mstate.get(what), rstate.get(what)
    tol_rule = 1e-9 if cfg.dtype == "float64" else 1e-5
    agrees = {}
    for side, got in (("manual", got_m), ("reference", got_r)):
        if got is None:
            agrees[side] = False
            continue
        err = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
        agrees[side] = err <= tol_rule * max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
    out["kind"] = f"the {kind} step redone in float64 from the reference's parameters, clipped gradients and state"
    out["agrees"] = agrees
    out["verdict"] = verdict_of(agrees).replace("finite differences", "the float64 recomputation")
    return out


# ================================================================================================
# one debugging session

@dataclass
class Report:
    setup: Setup
    rows: list                         # forward / backward comparisons
    opt_rows: list = field(default_factory=list)
    first: Comparison | None = None
    first_where: str = ""
    blame: dict | None = None
    seconds: float = 0.0
    absent: list = field(default_factory=list)   # names a dump did not hold
    other: str = "manual"              # the side under test

    @property
    def ok(self) -> bool:
        return self.first is None

    def as_json(self) -> dict:
        s = self.setup
        return {"config": s.cfg.to_dict(), "batch": list(s.ids.shape), "under_test": self.other,
                "agree": self.ok,
                "first_divergent": None if self.first is None else
                {"tensor": self.first.tensor, "step": self.first.step, "check": self.first.check,
                 "layer": self.first_where, "max_abs": _num(self.first.max_abs), "tol": self.first.tol,
                 "worst_index": list(self.first.worst_index), "a_value": _num(self.first.a_value),
                 "b_value": _num(self.first.b_value), "note": self.first.note},
                "blame": self.blame, "absent": self.absent,
                "rows": [c.as_json() for c in self.rows], "optimizer_rows": [c.as_json() for c in self.opt_rows],
                "seconds": round(self.seconds, 3)}


def _num(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def debug(setup: Setup, sides=None, steps: int = 0, optimizer: str = "adamw", blame: bool = True,
          against: dict | None = None) -> Report:
    """Walk every tensor of manual (or of a dump, `against`) against the reference; name the first
    divergent one and blame a side."""
    import reference
    from conformance.engine import Sides
    t0 = time.perf_counter()
    sides = sides or Sides.default()
    cfg = setup.cfg
    ref = run_model(sides.reference or reference.Model, setup)
    if against is None:
        under, other = run_model(sides.manual, setup), "manual"
    else:
        under, other = against, "dump"
    rows = walk(under, ref, cfg, setup.label)
    absent = [n for n, _ in expected_names(cfg) if n not in under]
    rep = Report(setup, rows, absent=absent, other=other)
    rep.first = first_failure(rows)
    if rep.first is None and steps > 0 and against is None:
        rep.opt_rows, opt_blame = optimizer_walk(setup, sides, steps, optimizer)
        rep.first = first_failure(rep.opt_rows)
        if rep.first is not None:
            rep.first_where = opt_where(rep.first.tensor, optimizer, rep.first.step)
            rep.blame = opt_blame
    elif rep.first is not None:
        rep.first_where = where(cfg, rep.first.tensor)
        if blame:
            rep.blame = blame_layer(setup, rep.first.tensor, ref, under, other)
    rep.seconds = time.perf_counter() - t0
    return rep


def blame_layer(setup: Setup, tensor: str, ref: dict, under: dict, other: str) -> dict:
    cfg = setup.cfg
    out = {"checks": []}
    agrees_all = {}
    for node in culprits(cfg, tensor):
        if node.kind == "add":
            out["checks"].append({"layer": node.name, "kind": "residual add (its backward copies the gradient)",
                                  "agrees": {}, "errors": {}})
            continue
        try:
            if not tensor.startswith("grad."):
                res = blame_forward(node, cfg, setup.params, ref, {other: under, "reference": ref}, setup.ids,
                                    setup.targets, tensor)
            else:
                res = blame_backward(node, cfg, setup.params, ref, setup.ids, setup.targets,
                                     manual_available=other == "manual")
                if other != "manual":
                    res["note"] = ("the dump's layer cannot be run here: the reference's backward is checked; "
                                   "if it agrees with finite differences, the dump is wrong")
                    res["agrees"][other] = not res["agrees"]["reference"]
        except Exception as exc:   # the check is a diagnosis aid: report, never crash the walk
            res = {"layer": node.name, "kind": "check failed", "error": f"{type(exc).__name__}: {exc}",
                   "agrees": {}, "errors": {}}
        out["checks"].append(res)
        for side, ok in res.get("agrees", {}).items():
            agrees_all[side] = agrees_all.get(side, True) and ok
    errs = {}
    for res in out["checks"]:
        for side, e in res.get("errors", {}).items():
            if isinstance(e, dict) and "badness" in e:
                errs[side] = e
    v = verdict_of(agrees_all, errs) if agrees_all else "unknown (no check applies)"
    if not tensor.startswith("grad.") and v.startswith("neither"):
        v = "neither (both agree with the float64 recomputation; the difference is precision)"
    out["verdict"] = v
    return out


# ================================================================================================
# printing

def _fmt(v):
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v!r:>9}"
    return f"{v:9.2e}"


def print_report(rep: Report, diff_only: bool = False, out=None) -> None:
    out = out or sys.stdout
    s = rep.setup
    B, T = s.ids.shape
    side = "manual" if rep.other == "manual" else "dump"
    print(f"layerdiff: {side} vs reference | {s.label} | batch {B}x{T} | "
          f"{len(rep.rows)} tensors" + (f" + {len(rep.opt_rows)} optimizer comparisons" if rep.opt_rows else ""),
          file=out)
    header = f"{'stage':<9} {'tensor':<44} {'shape':<16} {'max_abs':>9} {'max_rel':>10} {'tol':>9}  verdict"
    print(header, file=out)
    print("-" * len(header), file=out)
    stage = {"activation": "forward", "loss": "forward", "activation_grad": "backward", "param_grad": "backward",
             "optimizer": "optimizer"}
    skipped = 0
    for c in rep.rows + rep.opt_rows:
        if diff_only and c.passed:
            skipped += 1
            continue
        if skipped:
            print(f"{'':<9} ... {skipped} tensor(s) agree", file=out)
            skipped = 0
        name = c.tensor + (f" [step {c.step}]" if c.step is not None else "")
        print(f"{stage.get(c.check, c.check):<9} {name:<44} {str(tuple(c.shape)):<16} {_fmt(c.max_abs)} "
              f"{_fmt(c.max_rel):>10} {_fmt(c.tol)}  {'OK' if c.passed else 'DIFF'}", file=out)
    if skipped:
        print(f"{'':<9} ... {skipped} tensor(s) agree", file=out)
    print("-" * len(header), file=out)
    if rep.absent and rep.other != "manual":
        print(f"absent from the dump (not compared): {len(rep.absent)}: {', '.join(rep.absent[:8])}"
              + (" ..." if len(rep.absent) > 8 else ""), file=out)
    n_diff = sum(not c.passed for c in rep.rows + rep.opt_rows)
    if rep.ok:
        print(f"all {len(rep.rows) + len(rep.opt_rows)} tensors agree ({rep.seconds:.1f} s)", file=out)
        return
    f = rep.first
    print(f"{n_diff} tensor(s) differ. First divergent tensor: {f.tensor}"
          + (f" at step {f.step}" if f.step is not None else ""), file=out)
    print(f"  written by: {rep.first_where}" + ("  [here: the same layer of the dumped implementation]"
                                                if rep.other != "manual" else ""), file=out)
    print(f"  worst element {tuple(f.worst_index)}: {side} {f.a_value!r} vs reference {f.b_value!r} "
          f"(|diff| {f.max_abs:.3g}, tol {f.tol:.3g})" + (f"  [{f.note}]" if f.note else ""), file=out)
    b = rep.blame
    if b:
        for res in b.get("checks", [b]):
            print(f"  check of {res.get('layer')}: {res.get('kind')}", file=out)
            if "error" in res:
                print(f"    could not run: {res['error']}", file=out)
            for sd, errs in res.get("errors", {}).items():
                if isinstance(errs, dict):
                    tol = errs.get("tol", res.get("tol"))
                    shown = ", ".join(f"{k} {v:.2e}" + (" (WRONG)" if tol is not None and v > tol else "")
                                      for k, v in errs.items() if k not in ("tol", "badness") and isinstance(v, float))
                    extra = f"  [tol {errs['tol']:.2e}]" if "tol" in errs else ""
                    ok = res.get("agrees", {}).get(sd)
                    print(f"    {sd:<10} {'agrees' if ok else 'DISAGREES'}: {shown}{extra}", file=out)
            if "note" in res:
                print(f"    note: {res['note']}", file=out)
            if "agrees" in res and not res.get("errors"):
                for sd, ok in res["agrees"].items():
                    print(f"    {sd:<10} {'agrees' if ok else 'DISAGREES'}", file=out)
        print(f"  wrong side: {b.get('verdict')}", file=out)
        if b.get("detail"):
            print(f"  ({b['detail']})", file=out)
    print(f"({rep.seconds:.1f} s)", file=out)


# ================================================================================================
# the heatmap

def _cell(name: str):
    """(row, column) of the heatmap for a tensor name."""
    base = name[len("grad."):] if name.startswith("grad.") else name
    if base.startswith("transformer.h."):
        _, _, i, rest = base.split(".", 3)
        return f"h.{i}", rest
    if base.startswith("h."):
        _, i, rest = base.split(".", 2)
        return f"h.{i}", rest
    if base.startswith("transformer."):
        layer, rest = base[len("transformer."):].split(".", 1)
        return ("embed", f"{layer}.{rest}") if layer in ("wte", "wpe") else (layer, rest)
    if base.startswith("mtp."):
        _, j, rest = base.split(".", 2)
        return f"mtp.{j}", rest
    if base == "embed.out":
        return "embed", "out"
    if base == "ln_f.out":
        return "ln_f", "out"
    if base in ("logits", "loss"):
        return "head", base
    if base == "lm_head.weight":
        return "head", "lm_head.weight"
    return base, base


def _row_order(row: str):
    if row == "embed":
        return (0, 0)
    if row.startswith("h."):
        return (1, int(row.split(".")[1]))
    if row.startswith("mtp."):
        return (3, int(row.split(".")[1]))
    return {"ln_f": (2, 0), "head": (4, 0)}.get(row, (5, 0))


def plot(rep: Report, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("forward: activations (log10 error / tolerance)", [c for c in rep.rows if not
                                                                   c.tensor.startswith("grad.")]),
              ("backward: gradients (log10 error / tolerance)", [c for c in rep.rows if c.tensor.startswith("grad.")])]
    fig, axes = plt.subplots(1, 2, figsize=(18, 0.45 * (rep.setup.cfg.n_layers + 6) + 3))
    for ax, (title, rows) in zip(axes, panels):
        rnames, cnames = [], []
        for c in rows:
            r, k = _cell(c.tensor)
            if r not in rnames:
                rnames.append(r)
            if k not in cnames:
                cnames.append(k)
        rnames.sort(key=_row_order)                        # layers top to bottom in forward order
        grid = np.full((len(rnames), len(cnames)), np.nan)
        for c in rows:
            r, k = _cell(c.tensor)
            v = math.log10(max(c.badness, 1e-300))      # log10(error / tolerance), +-6 at most
            grid[rnames.index(r), cnames.index(k)] = max(-6.0, min(6.0, v if math.isfinite(v) else 6.0))
        im = ax.imshow(grid, cmap="RdYlGn_r", vmin=-6, vmax=6, aspect="auto")
        ax.set_xticks(range(len(cnames)))
        ax.set_xticklabels(cnames, rotation=70, ha="right", fontsize=7)
        ax.set_yticks(range(len(rnames)))
        ax.set_yticklabels(rnames, fontsize=8)
        ax.set_title(title, fontsize=10)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v) and v > 0:
                ax.text(j, i, "x", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.03, label="log10(max_abs / tol); > 0 is DIFF")
    first = rep.first.tensor if rep.first is not None else "none"
    fig.suptitle(f"layerdiff {rep.setup.label}: first divergent tensor: {first}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ================================================================================================
# dumps from other implementations, and the case they are computed on

DUMP_README = """\
A test case for your own implementation (C++, CUDA, JAX, ...), written by
    python tools/layerdiff.py --export-case {dir}

Files
    checkpoint.safetensors  the weights: canonical (Hugging Face GPT-2) names, dtype {dtype}, metadata
                            "config" holds the ModelConfig as JSON. Matrices are [in, out] (y = x @ W + b);
                            transformer.wte.weight (and an untied lm_head.weight) are [V, C], logits = x @ W^T.
    ids.npy, targets.npy    the batch, int64 (B, T) = {shape}; targets equal to pad_id = {pad} are ignored.
    names.txt               every tensor the dump may hold, in walk order, with its shape.

What to write: one forward of ids with these targets, one backward of the mean loss, then a
safetensors (or .npz) file holding, under these keys, in dtype {dtype}:
    <tap name>              each named activation, e.g. "h.0.ln_1.out" (B, T, C), "h.0.attn.probs" (B, H, T, T)
    grad.<tap name>         d loss / d tap, e.g. "grad.h.0.attn.out"
    grad.<param name>       d loss / d parameter, e.g. "grad.transformer.h.0.mlp.c_fc.weight" [in, out]
    loss                    the scalar loss (shape ()), optional; "logits" is a tap
Leave out what your implementation does not have (it is reported as absent, not as a failure);
an unknown key is an error (it is almost always a misspelt name). Then:
    python tools/layerdiff.py --case {dir} --against your_dump.safetensors
The tap list and formulas: manual/registry.py (tap_specs) and docs/design.md.
"""


def export_case(setup: Setup, folder) -> list[Path]:
    from manual.checkpoint import save_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / CHECKPOINT_NAME, setup.cfg, setup.params)
    np.save(folder / "ids.npy", setup.ids.astype(np.int64))
    np.save(folder / "targets.npy", setup.targets.astype(np.int64))
    B, T = setup.ids.shape
    shapes = expected_shapes(setup.cfg, B, T)
    (folder / "names.txt").write_text("".join(f"{n} {list(shapes[n])}\n" for n, _ in expected_names(setup.cfg)))
    (folder / "README.txt").write_text(DUMP_README.format(dir=folder, dtype=setup.cfg.dtype, shape=(B, T),
                                                          pad=setup.cfg.pad_id))
    return [folder / n for n in (CHECKPOINT_NAME, "ids.npy", "targets.npy", "names.txt", "README.txt")]


def load_dump(path, cfg: ModelConfig, B: int, T: int) -> dict[str, np.ndarray]:
    """Read a dump (.safetensors or .npz); unknown names raise ValueError listing them."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dump {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            tensors = {k: z[k] for k in z.files}
    else:
        from manual.checkpoint import load_tensors
        tensors, _meta = load_tensors(path)
    if "loss" in tensors and tensors["loss"].size == 1:
        tensors["loss"] = tensors["loss"].reshape(())        # a scalar saved as shape (1,) is the same scalar
    known = expected_shapes(cfg, B, T)
    unknown = sorted(set(tensors) - set(known))
    if unknown:
        raise ValueError(f"dump {path} holds {len(unknown)} name(s) that are not taps, tap gradients or parameter "
                         f"gradients of this config: {unknown[:10]}; expected names are listed by --export-case "
                         f"(names.txt), e.g. {list(known)[:3]}")
    if not tensors:
        raise ValueError(f"dump {path} holds no tensors")
    return tensors


# ================================================================================================
# the zoo

def run_fault(name: str) -> dict:
    """Inject one fault: is it caught by the conformance suite, what does the debugger name first."""
    from conformance.engine import run_case
    from tools import faults
    t0 = time.perf_counter()
    fault = faults.get(name)
    with faults.inject(name) as sides:
        results = run_case(fault.case(), fault.checks, sides)
        caught = any(not c.passed for c in results)
        setup = make_setup(fault.model_config(), batch=fault.batch, seq_len=fault.seq_len, pad=fault.pad,
                           label=f"fault {name}")
        rep = debug(setup, sides, steps=fault.opt_steps)
    first = rep.first.tensor if rep.first is not None else None
    return {"name": name, "caught": caught, "first_divergent": first, "expected": fault.expected,
            "localized": first == fault.expected, "step": rep.first.step if rep.first is not None else None,
            "layer": rep.first_where, "blame": (rep.blame or {}).get("verdict"),
            "failing_suite_checks": sorted({c.check for c in results if not c.passed}),
            "seconds": round(time.perf_counter() - t0, 2)}


def _worker_init():
    import torch
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning)


def run_zoo(names=None, workers: int = 2) -> dict:
    from tools import faults
    names = list(names) if names else [f.name for f in faults.FAULTS]
    for n in names:
        faults.get(n)
    t0 = time.perf_counter()
    if workers > 1 and len(names) > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        set_blas_threads(1)   # before the spawned workers import NumPy (an initializer would run too late)
        with ctx.Pool(min(workers, len(names)), initializer=_worker_init) as pool:
            results = pool.map(run_fault, names, chunksize=1)
    else:
        results = [run_fault(n) for n in names]
    wall = time.perf_counter() - t0
    n = len(results)
    return {"faults": results, "caught": sum(r["caught"] for r in results), "localized":
            sum(r["localized"] for r in results), "total": n, "wall_seconds": round(wall, 2), "workers": workers}


def print_zoo(z: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"{'fault':<34} {'caught':<7} {'localized':<10} {'first divergent tensor':<52} blame", file=out)
    for r in z["faults"]:
        first = (r["first_divergent"] or "-") + (f" [step {r['step']}]" if r.get("step") else "")
        print(f"{r['name']:<34} {'yes' if r['caught'] else 'NO':<7} {'yes' if r['localized'] else 'NO':<10} "
              f"{first:<52} {r['blame']}", file=out)
        if not r["localized"]:
            print(f"{'':<34} expected: {r['expected']}", file=out)
    print(f"caught {z['caught']}/{z['total']}, localized {z['localized']}/{z['total']} "
          f"({z['wall_seconds']:.1f} s with {z['workers']} worker(s))", file=out)


# ================================================================================================
# command line

CFG_FLAGS = ("dtype", "norm", "activation", "attention", "loss", "n_layers", "d_model", "n_heads", "d_ff",
             "max_seq_len", "vocab_size", "n_future", "temperature", "ln_eps", "pad_id")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/layerdiff.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the README section \"Debugging a gradient bug\" for a walk-through.")
    g = p.add_argument_group("model and weights")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    g.add_argument("--config", metavar="JSON", help="ModelConfig overrides: a JSON object or a path to one")
    g.add_argument("--dtype", choices=["float32", "float64"], help="default float64 (with --checkpoint: its own)")
    g.add_argument("--norm", choices=["pre", "post"])
    g.add_argument("--activation", choices=["relu", "gelu", "gelu_tanh"])
    g.add_argument("--attention", choices=["standard", "flash"])
    g.add_argument("--loss", choices=["cross_entropy", "brier"])
    for flag, typ in (("n_layers", int), ("d_model", int), ("n_heads", int), ("d_ff", int), ("max_seq_len", int),
                      ("vocab_size", int), ("n_future", int), ("temperature", float), ("ln_eps", float),
                      ("pad_id", int)):
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ)
    g.add_argument("--no-bias", action="store_true", help="bias=False")
    g.add_argument("--untied", action="store_true", help="tie_embeddings=False")
    g.add_argument("--seed", type=int, default=0, help="weights: registry.init_params(cfg, seed)")
    g.add_argument("--checkpoint", metavar="PATH", help="weights and config from a checkpoint")
    g.add_argument("--case", metavar="DIR", help="a folder written by --export-case (checkpoint + batch)")
    b = p.add_argument_group("batch")
    b.add_argument("--batch", type=int_at_least(1), default=2)
    b.add_argument("--seq-len", type=int_at_least(1), default=8)
    b.add_argument("--batch-seed", type=int, default=0)
    b.add_argument("--no-pad", action="store_true", help="no PAD among the generated targets")
    b.add_argument("--ids", metavar="FILE.npy", help="your own token ids (B, T) or (T,)")
    b.add_argument("--targets", metavar="FILE.npy", help="their targets (default: ids shifted left, PAD last)")
    w = p.add_argument_group("what to run")
    w.add_argument("--steps", type=int_at_least(0), help="also walk N optimizer steps (default 0; a fault's own with --inject)")
    w.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    w.add_argument("--inject", metavar="NAME", help="inject a fault of the bug zoo into the manual side")
    w.add_argument("--list-faults", action="store_true")
    w.add_argument("--zoo", nargs="*", metavar="NAME", help="run every fault (or the ones named)")
    w.add_argument("--workers", type=int_at_least(1), default=2, help="processes for --zoo (default 2)")
    w.add_argument("--against", metavar="FILE", help="compare a dump (.safetensors/.npz) against the reference")
    w.add_argument("--export-case", metavar="DIR", help="write checkpoint + batch + format README, then exit")
    w.add_argument("--no-blame", action="store_true", help="skip the finite-difference / recomputation check")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH")
    o.add_argument("--plot", metavar="PNG", help="heatmap of log10(error / tolerance) per layer and tensor")
    o.add_argument("--diff-only", action="store_true", help="print only the rows that differ")
    return p


def _config_overrides(args, p) -> dict:
    over = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        try:
            over = json.loads(text)
        except json.JSONDecodeError as exc:
            p.error(f"--config is neither a JSON object nor a file holding one: {exc}")
        if not isinstance(over, dict):
            p.error(f"--config must be a JSON object, got {type(over).__name__}")
    for f in CFG_FLAGS:
        v = getattr(args, f)
        if v is not None:
            over[f] = v
    if args.no_bias:
        over["bias"] = False
    if args.untied:
        over["tie_embeddings"] = False
    return over


def setup_from_args(args, p) -> Setup:
    from manual.checkpoint import load_model
    over = _config_overrides(args, p)
    ckpt = args.checkpoint
    if args.case:
        d = Path(args.case)
        if not (d / CHECKPOINT_NAME).is_file():
            p.error(f"--case {d}: no checkpoint.safetensors there (write one with --export-case)")
        ckpt = ckpt or str(d / CHECKPOINT_NAME)
        args.ids = args.ids or str(d / "ids.npy")
        args.targets = args.targets or str(d / "targets.npy")
    if ckpt:
        cfg, params, _extras, _meta = load_model(ckpt)
        if over:
            dtype = over.pop("dtype", None)
            if over:
                p.error(f"--checkpoint fixes the model; only --dtype may change it (got {sorted(over)})")
            if dtype:
                cfg = cfg.replace(dtype=dtype)
                params = {k: v.astype(dtype) for k, v in params.items()}
        label = f"{cfg.dtype} {Path(ckpt).name}"
    else:
        over.setdefault("dtype", "float64")
        cfg = ModelConfig.preset(args.preset, **over)
        params = registry.init_params(cfg, args.seed)
        label = _cfg_label(cfg, args.preset)
    if args.ids:
        ids = np.load(args.ids, allow_pickle=False)
        if ids.ndim == 1:
            ids = ids[None]
        if args.targets:
            targets = np.load(args.targets, allow_pickle=False)
            if targets.ndim == 1:
                targets = targets[None]
        else:
            targets = np.full_like(ids, cfg.pad_id)
            targets[:, :-1] = ids[:, 1:]
        from manual.model import check_token_array
        ids = check_token_array(ids, cfg, "ids")
        targets = check_token_array(targets, cfg, "targets")
        if targets.shape != ids.shape:
            p.error(f"--targets shape {targets.shape} differs from --ids shape {ids.shape}")
        if not (targets != cfg.pad_id).any():
            p.error(f"every target is PAD (pad_id={cfg.pad_id})")
        return Setup(cfg, params, ids, targets, label, own_batch=True)
    return make_setup(cfg, batch=args.batch, seq_len=args.seq_len, batch_seed=args.batch_seed,
                      pad=not args.no_pad, params=params, label=label)


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from tools import faults
    if args.list_faults:
        print(faults.describe())
        return 0
    if args.zoo is not None:
        try:
            z = run_zoo(args.zoo or None, args.workers)
        except KeyError as exc:
            p.error(str(exc.args[0]))
        print_zoo(z)
        if args.json:
            Path(args.json).write_text(json.dumps(z, indent=1))
            print(f"wrote {args.json}")
        return 0 if z["caught"] == z["total"] and z["localized"] == z["total"] else 1
    fault = None
    if args.inject:
        if args.inject not in faults.BY_NAME:
            p.error(f"unknown fault {args.inject!r}; --list-faults shows the {len(faults.FAULTS)} faults")
        if args.against:
            p.error("--inject changes the manual side; --against compares a dump, which has none")
        fault = faults.get(args.inject)
        # the fault's own case, unless the command line says otherwise
        if not (args.checkpoint or args.case):
            for k, v in fault.config.items():
                if getattr(args, k, None) is None:
                    setattr(args, k, v)
        if args.steps is None:
            args.steps = fault.opt_steps
    steps = args.steps or 0
    if steps and args.against:
        p.error("--steps runs the manual optimizer; a dump (--against) holds one forward/backward only")
    try:
        setup = setup_from_args(args, p)
    except (ValueError, TypeError, OSError) as exc:
        p.error(str(exc))
    if args.export_case:
        written = export_case(setup, args.export_case)
        print(f"wrote {', '.join(str(w) for w in written)}")
        print(f"the format of the dump to produce: {Path(args.export_case) / 'README.txt'}")
        return 0
    against = None
    if args.against:
        B, T = setup.ids.shape
        try:
            against = load_dump(args.against, setup.cfg, B, T)
        except ValueError as exc:
            p.error(str(exc))
    import warnings
    with warnings.catch_warnings():          # overflow in a broken side is a finding, reported in the table
        warnings.simplefilter("ignore", RuntimeWarning)
        if fault is not None:
            with faults.inject(fault.name) as sides:
                setup.label += f" | fault {fault.name}"
                rep = debug(setup, sides, steps=steps, optimizer=args.optimizer, blame=not args.no_blame)
        else:
            rep = debug(setup, None, steps=steps, optimizer=args.optimizer, blame=not args.no_blame,
                        against=against)
    print_report(rep, diff_only=args.diff_only)
    if args.json:
        Path(args.json).write_text(json.dumps(rep.as_json(), indent=1, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        plot(rep, args.plot)
        print(f"wrote {args.plot}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
