"""The one registry of named tensors: every parameter and every tap (named activation).

Parameter counts, allocation, initialisation, checkpoints, the weight-decay groups, memory
accounting, the conformance report and the gradient debugger all read these lists
instead of keeping lists of their own. Both implementations use exactly these names, in
exactly this order (forward execution order for taps).

Shape legend (the whole project uses it):
    B batch, T time (sequence length), C = d_model, H heads, D head size, F = d_ff,
    V vocab, S = max_seq_len (rows of the position table), L layers.

A shape formula is a tuple of strings over those symbols ("3*C" is allowed);
`resolve(spec, cfg, B, T)` turns it into numbers.

Canonical names follow the Hugging Face GPT-2 state dict. Matrices are stored
[in, out] so that y = x @ W + b (GPT-2's Conv1D layout), except the two [V, C] tables:
`transformer.wte.weight` and the untied `lm_head.weight` (HF's nn.Linear layout), used
as logits = x @ W^T. Extra heads for n_future > 1 are `mtp.{j}.weight` [C, C] and
`mtp.{j}.bias` [C] for j = 2..n_future (head j predicts the token j steps ahead).

Blog post names -> canonical names:
    token_embeddings_   -> transformer.wte.weight        [V, C]
    position_embeddings_-> transformer.wpe.weight        [S, C]
    Wq_ | Wk_ | Wv_      -> transformer.h.{i}.attn.c_attn.weight [C, 3C] (columns Q | K | V)
    Wo_                  -> transformer.h.{i}.attn.c_proj.weight [C, C]
    W1_, B1_             -> transformer.h.{i}.mlp.c_fc.weight [C, F], .bias [F]
    W2_, B2_             -> transformer.h.{i}.mlp.c_proj.weight [F, C], .bias [C]
    gamma_, beta_        -> transformer.h.{i}.ln_{1,2}.weight [C], .bias [C]; transformer.ln_f.*
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str                 # canonical name
    shape: tuple              # shape formula, e.g. ("B", "H", "T", "T") or ("C", "3*C")
    layer: str                # the module that owns / produces it, e.g. "transformer.h.0.attn" or "h.0.attn"
    fn: str                   # the layer function that produces it (manual/layers/<fn>.py), e.g. "attention"
    decay: bool = False       # parameters only: in the weight-decay group (matrices, not biases/norms/embeddings)
    init: str = ""            # parameters only: 'normal', 'normal_proj' (scaled by 1/sqrt(2L)), 'zeros', 'ones'


def symbols(cfg: ModelConfig, B: int = 1, T: int = 1) -> dict:
    return dict(B=B, T=T, C=cfg.d_model, H=cfg.n_heads, D=cfg.head_dim, F=cfg.d_ff,
                V=cfg.vocab_size, S=cfg.max_seq_len, L=cfg.n_layers)


def resolve(spec: TensorSpec, cfg: ModelConfig, B: int = 1, T: int = 1) -> tuple:
    """Numeric shape of `spec` for this config and batch."""
    env = symbols(cfg, B, T)
    return tuple(int(eval(dim, {"__builtins__": {}}, env)) for dim in spec.shape)  # formulas are ours, not user input


# -- parameters ------------------------------------------------------------------------

def param_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every parameter, in canonical (checkpoint) order. The tied lm_head is absent: it *is* wte."""
    specs = [
        TensorSpec("transformer.wte.weight", ("V", "C"), "transformer.wte", "embedding", init="normal"),
        TensorSpec("transformer.wpe.weight", ("S", "C"), "transformer.wpe", "embedding", init="normal"),
    ]

    def ln(prefix):
        out = [TensorSpec(f"{prefix}.weight", ("C",), prefix, "layernorm", init="ones")]
        if cfg.bias:
            out.append(TensorSpec(f"{prefix}.bias", ("C",), prefix, "layernorm", init="zeros"))
        return out

    def linear(prefix, shape_in, shape_out, fn, init="normal"):
        out = [TensorSpec(f"{prefix}.weight", (shape_in, shape_out), prefix, fn, decay=True, init=init)]
        if cfg.bias:
            out.append(TensorSpec(f"{prefix}.bias", (shape_out,), prefix, fn, init="zeros"))
        return out

    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}"
        specs += ln(f"{p}.ln_1")
        specs += linear(f"{p}.attn.c_attn", "C", "3*C", "attention")
        specs += linear(f"{p}.attn.c_proj", "C", "C", "attention", init="normal_proj")
        specs += ln(f"{p}.ln_2")
        specs += linear(f"{p}.mlp.c_fc", "C", "F", "mlp")
        specs += linear(f"{p}.mlp.c_proj", "F", "C", "mlp", init="normal_proj")
    specs += ln("transformer.ln_f")
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("V", "C"), "lm_head", "linear", decay=True, init="normal"))
    for j in range(2, cfg.n_future + 1):
        specs += linear(f"mtp.{j}", "C", "C", "linear")
    return specs


def param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    return {s.name: resolve(s, cfg) for s in param_specs(cfg)}


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, summed over the registry (tied matrix counted once)."""
    return sum(int(np.prod(shape)) for shape in param_shapes(cfg).values())


def param_count_closed_form(cfg: ModelConfig) -> int:
    """The same count written as one formula, independent of the registry (a cross-check).

    V*C + S*C                                   embeddings
    + L * (LN + (C*3C + b*3C) + (C*C + b*C) + LN + (C*F + b*F) + (F*C + b*C))
    + LN (final)  + (untied) V*C  + (n_future - 1) * (C*C + b*C)
    with LN = C + b*C and b = 1 if bias else 0.
    """
    V, S, C, F, L = cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.d_ff, cfg.n_layers
    b = 1 if cfg.bias else 0
    ln = C + b * C
    block = ln + (C * 3 * C + b * 3 * C) + (C * C + b * C) + ln + (C * F + b * F) + (F * C + b * C)
    total = V * C + S * C + L * block + ln
    if not cfg.tie_embeddings:
        total += V * C
    total += (cfg.n_future - 1) * (C * C + b * C)
    return total


def decay_groups(cfg: ModelConfig, weight_decay: float) -> list[dict]:
    """Two parameter groups by name: matrices decay; biases, layer norms and embeddings do not.

    Returns [{"names": [...], "weight_decay": weight_decay}, {"names": [...], "weight_decay": 0.0}].
    Both optimizers (manual and torch) are built from these groups.
    """
    specs = param_specs(cfg)
    return [
        {"names": [s.name for s in specs if s.decay], "weight_decay": float(weight_decay)},
        {"names": [s.name for s in specs if not s.decay], "weight_decay": 0.0},
    ]


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 initialisation, drawn from one NumPy generator in registry order.

    Weights ~ N(0, 0.02); residual output projections (c_proj) ~ N(0, 0.02 / sqrt(2L));
    biases 0; layer-norm weights 1. Both implementations start from these arrays, so
    Model(cfg, seed) is the same model on both sides.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(cfg.dtype)
    out = {}
    for spec in param_specs(cfg):
        shape = resolve(spec, cfg)
        if spec.init == "normal":
            arr = rng.normal(0.0, 0.02, size=shape)
        elif spec.init == "normal_proj":
            arr = rng.normal(0.0, 0.02 / np.sqrt(2 * cfg.n_layers), size=shape)
        elif spec.init == "zeros":
            arr = np.zeros(shape)
        elif spec.init == "ones":
            arr = np.ones(shape)
        else:  # pragma: no cover - registry bug
            raise AssertionError(f"no init rule for {spec.name}: {spec.init!r}")
        out[spec.name] = np.ascontiguousarray(arr, dtype=dtype)
    return out


# -- taps (named activations) -------------------------------------------------------------

@dataclass(frozen=True)
class SubLayer:
    """One step of a transformer block, in forward order (names local to block h.{i})."""
    name: str          # the sub-layer: "ln_1", "attn", "resid_1", "ln_2", "mlp", "resid_2", "out"
    kind: str          # layernorm | attention | mlp | add (a residual add)
    inputs: tuple      # block-local taps it reads; "x" is the block's input
    output: str        # block-local tap of its main output ("out" is the block's output, h.{i}.out)


# The block topology, stated once. tap_specs (and so the tap order), the debugger's layer graph
# (tools/layerdiff/graph.py) and the block's forward read it from here.
BLOCK_TOPOLOGY: dict[str, tuple[SubLayer, ...]] = {
    "pre": (        # GPT-2: out = r1 + mlp(LN2(r1)), r1 = x + attn(LN1(x))
        SubLayer("ln_1", "layernorm", ("x",), "ln_1.out"),
        SubLayer("attn", "attention", ("ln_1.out",), "attn.out"),
        SubLayer("resid_1", "add", ("x", "attn.out"), "resid_1"),
        SubLayer("ln_2", "layernorm", ("resid_1",), "ln_2.out"),
        SubLayer("mlp", "mlp", ("ln_2.out",), "mlp.out"),
        SubLayer("out", "add", ("resid_1", "mlp.out"), "out"),
    ),
    "post": (       # original transformer: out = LN2(a + mlp(a)), a = LN1(x + attn(x))
        SubLayer("attn", "attention", ("x",), "attn.out"),
        SubLayer("resid_1", "add", ("x", "attn.out"), "resid_1"),
        SubLayer("ln_1", "layernorm", ("resid_1",), "ln_1.out"),
        SubLayer("mlp", "mlp", ("ln_1.out",), "mlp.out"),
        SubLayer("resid_2", "add", ("ln_1.out", "mlp.out"), "resid_2"),
        SubLayer("ln_2", "layernorm", ("resid_2",), "out"),
    ),
}


def block_topology(cfg: ModelConfig) -> tuple[SubLayer, ...]:
    """The sub-layers of one block for cfg.norm, in forward order."""
    if cfg.norm not in BLOCK_TOPOLOGY:
        raise ValueError(f"norm {cfg.norm!r} has no block topology; expected one of {sorted(BLOCK_TOPOLOGY)}")
    return BLOCK_TOPOLOGY[cfg.norm]


def tap_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every named activation, in forward execution order (the block's from BLOCK_TOPOLOGY).

    The gradient of the loss with respect to each tap (`tap_grads`) uses the same names;
    walking this list backwards is the backward execution order.

    Pre-LN block i (GPT-2):             Post-LN block i (original transformer):
      h.i.ln_1.out   = LN1(x)             h.i.attn.* (on x)
      h.i.attn.*     (on ln_1.out)        h.i.resid_1 = x + attn.out
      h.i.resid_1    = x + attn.out       h.i.ln_1.out = LN1(resid_1)
      h.i.ln_2.out   = LN2(resid_1)       h.i.mlp.*    (on ln_1.out)
      h.i.mlp.*      (on ln_2.out)        h.i.resid_2  = ln_1.out + mlp.out
      h.i.out        = resid_1 + mlp.out  h.i.out      = LN2(resid_2)
    attn.* = q, k, v (B,H,T,D); att (B,H,T,T), the scaled scores q k^T / sqrt(D) before the
    causal mask, and probs (B,H,T,T), the masked softmax (both 'standard' attention only:
    flash attention never materialises them); ctx (B,T,C), heads merged before c_proj;
    out (B,T,C) after c_proj.
    mlp.* = fc (B,T,F) before the activation, act (B,T,F), out (B,T,C).
    """
    specs = [TensorSpec("embed.out", ("B", "T", "C"), "transformer.wte", "embedding")]
    btc = ("B", "T", "C")

    def attn(i):
        p = f"h.{i}.attn"
        out = [TensorSpec(f"{p}.{n}", ("B", "H", "T", "D"), p, "attention") for n in ("q", "k", "v")]
        if cfg.attention == "standard":
            out += [TensorSpec(f"{p}.att", ("B", "H", "T", "T"), p, "attention"),
                    TensorSpec(f"{p}.probs", ("B", "H", "T", "T"), p, "attention")]
        out += [TensorSpec(f"{p}.ctx", btc, p, "attention"),
                TensorSpec(f"{p}.out", btc, p, "attention")]
        return out

    def mlp(i):
        p = f"h.{i}.mlp"
        return [TensorSpec(f"{p}.fc", ("B", "T", "F"), p, "mlp"),
                TensorSpec(f"{p}.act", ("B", "T", "F"), p, "mlp"),
                TensorSpec(f"{p}.out", btc, p, "mlp")]

    for i in range(cfg.n_layers):
        h = f"h.{i}"
        for sub in block_topology(cfg):
            if sub.kind == "attention":
                specs += attn(i)
            elif sub.kind == "mlp":
                specs += mlp(i)
            else:   # a layer norm's tap belongs to the norm, a residual add's to the block
                layer = f"{h}.{sub.name}" if sub.kind == "layernorm" else h
                specs.append(TensorSpec(f"{h}.{sub.output}", btc, layer, "layernorm" if sub.kind == "layernorm"
                                        else "block"))
    specs.append(TensorSpec("ln_f.out", btc, "transformer.ln_f", "layernorm"))
    specs.append(TensorSpec("logits", ("B", "T", "V"), "lm_head", "linear"))
    for j in range(2, cfg.n_future + 1):
        specs.append(TensorSpec(f"mtp.{j}.out", btc, f"mtp.{j}", "linear"))
        specs.append(TensorSpec(f"mtp.{j}.logits", ("B", "T", "V"), "lm_head", "linear"))
    return specs


def tap_shapes(cfg: ModelConfig, B: int, T: int) -> dict[str, tuple]:
    return {s.name: resolve(s, cfg, B, T) for s in tap_specs(cfg)}


def future_targets(targets: np.ndarray, j: int, pad_id: int) -> np.ndarray:
    """Targets of prediction head j (1 = next token): position t predicts targets[t + j - 1].

    `targets` (B, T) holds the next-token targets. Head j's targets are those shifted left by
    j - 1; the last j - 1 positions have no target inside the window and are filled with
    pad_id, so the loss ignores them.   (B, T) -> (B, T)
    """
    if j == 1:
        return targets
    out = np.full_like(targets, pad_id)
    if j - 1 < targets.shape[1]:
        out[:, : targets.shape[1] - (j - 1)] = targets[:, j - 1:]
    return out
