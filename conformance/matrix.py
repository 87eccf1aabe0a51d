"""The conformance matrix: a preset (tiny by default) and its variants, each in float64 and float32.

One line per variant. `cases(preset, dtypes, quick, only)` expands it; the pytest suite and
`python -m conformance` both read it from here.

Besides the model options, the matrix reaches every internal path of the manual implementation
(issue 16; `python -m conformance --coverage` measures it, docs/mutation.md):
    flash_block_*  flash attention over several key blocks, T not a multiple of the block, a block of 1
    long_T         T spans three default flash blocks (FLASH_BLOCK) and the FFN activation holds more
                   than one erf/GELU chunk (manual/layers/special.py CHUNK)
    stress*        weights scaled so attention scores and logits reach about +-100: every max-subtraction
                   (softmax, loss, flash's running max) matters, exp would overflow without it
    optim_*        every optimizer option away from its default (conformance/trajectory.OPTIMIZERS)
    pad_*          PAD patterns (engine.make_batch): scattered, a whole row, another pad id
    n_future_idle  prediction heads without any target: left out of the loss, no cache, backward skipped
    gelu_saturated GELU far in its tails
    gelu_wide      GELU's inputs in every interval of erf
    workspace      the manual side built with Model(..., workspace=True): every layer's workspace path
    ln_overflow    float32 rows whose variance overflows: layer norm's exact rescale
"""
from __future__ import annotations

from manual.config import ModelConfig

from manual.layers.special import CHUNK as ERF_CHUNK
from manual.layers.attention import FLASH_BLOCK

from .engine import Case

# stress: the query/key projection x60 and the final layer norm's gain x650 put attention scores
# and logits at ~+-360 (measured on tiny, seed 0): past half of exp's float64 range (709), so a
# softmax that adds its max instead of subtracting it overflows. float64 only: in float32 at
# scale 100 the elementwise float32 tolerance (atol 1e-5) is below the rounding of a dot product
# of that scale (measured: logits off by 4e-3 at scale 100, ln_f.out by 2e-2), so the float32
# side cannot be judged by the suite's float32 rule there (docs/mutation.md). Two optimizer steps:
# the sharp model's trajectory is chaotic after about four (1e-16 grows past 1e-9 in both runs).
# SGD only: AdamW divides every gradient element by its own rms, and the key bias's gradient is exactly
# zero in exact math (softmax ignores a shift of all scores), so at this scale AdamW turns its float64
# rounding noise into lr-sized steps (measured: stress_flash, c_attn.bias after 2 steps).
STRESS = dict(weight_scale={"attn.c_attn.weight": 60.0, "ln_f.weight": 650.0}, opt_steps=2, optimizers=("sgd",))
FLOAT64_ONLY = ("stress", "stress_flash", "gelu_saturated")   # gelu_saturated: float32 as stress, at 1e5
FLOAT32_ONLY = ("ln_overflow",)   # the overflow it reaches is float32's (float64's range holds 1e42)
# Not run on an implementation under test (--impl / --impl-cmd) unless named with --variant: rows whose
# float32 variance overflows are a guarantee of this project's two sides (torch's own nn.LayerNorm returns
# 0 or NaN there, so reference/ normalises them itself), not a requirement of a port.
OWN_SIDES_ONLY = ("ln_overflow",)
# long_T: T over two default flash blocks, not a multiple of one; B*T*d_ff (tiny: d_ff 256) over one erf chunk
LONG_T = 2 * FLASH_BLOCK + FLASH_BLOCK // 2 + 3
assert LONG_T * 256 > ERF_CHUNK, "long_T must hold more than one erf chunk"
GELU_WIDE_BATCH = 7
assert GELU_WIDE_BATCH * 20 * 256 > ERF_CHUNK, "gelu_wide must hold more than one erf chunk (tiny: T 20, d_ff 256)"

# label -> (ModelConfig overrides on the preset, Case overrides)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "base":        ({}, dict(batch=4, seq_len=12)),
    "post_ln":     (dict(norm="post"), dict(batch=4, seq_len=12)),
    "relu":        (dict(activation="relu"), dict(batch=4, seq_len=12)),
    "gelu_tanh":   (dict(activation="gelu_tanh"), dict(batch=4, seq_len=12)),
    "no_bias":     (dict(bias=False), dict(batch=4, seq_len=12)),
    "untied":      (dict(tie_embeddings=False), dict(batch=4, seq_len=12)),
    "n_future_3":  (dict(n_future=3), dict(batch=4, seq_len=12)),
    "no_pad":      ({}, dict(batch=4, seq_len=12, pad=False)),
    "batch_1":     ({}, dict(batch=1, seq_len=12)),
    "T_1":         ({}, dict(batch=4, seq_len=1)),
    "T_max":       ({}, dict(batch=4, seq_len=None)),
    "head_size_1": (dict(n_heads=64), dict(batch=2, seq_len=12)),
    "post_untied_nobias_relu": (dict(norm="post", tie_embeddings=False, bias=False, activation="relu"),
                                dict(batch=4, seq_len=12)),
    "brier":       (dict(loss="brier"), dict(batch=4, seq_len=12)),
    "temperature": (dict(temperature=0.7), dict(batch=4, seq_len=12)),
    "flash":       (dict(attention="flash"), dict(batch=4, seq_len=12)),
    # -- internal paths (issue 16) --
    "flash_block_5": (dict(attention="flash"), dict(batch=2, seq_len=12, flash_block=5)),
    "flash_block_1": (dict(attention="flash"), dict(batch=2, seq_len=7, flash_block=1, opt_steps=3)),
    "long_T":      (dict(attention="flash", max_seq_len=LONG_T), dict(batch=1, seq_len=LONG_T, opt_steps=2,
                                                                       gen_tokens=3)),
    "stress":      ({}, dict(batch=4, seq_len=12, **STRESS)),
    "stress_flash": (dict(attention="flash"), dict(batch=4, seq_len=12, flash_block=5, **STRESS)),
    "optim_adamw": ({}, dict(batch=2, seq_len=8, opt_steps=8, optimizers=("adamw_opts", "adamw_groups", "adamw_frozen"))),
    "optim_sgd":   ({}, dict(batch=2, seq_len=8, opt_steps=8,
                         optimizers=("sgd_nesterov", "sgd_dampening", "sgd_plain"))),
    # the FFN's pre-activations at ~1e5: GELU saturates (erf = +-1 from its tail), both stay finite
    "gelu_saturated": ({}, dict(batch=2, seq_len=12, opt_steps=2, weight_scale={"mlp.c_fc.weight": 1e5})),
    # the FFN's pre-activations spread over every interval of erf (|x| / sqrt 2 in [0, 0.84), [0.84, 1.25),
    # [1.25, 2.86), [2.86, 6), [6, inf): special.py), entries in each (at scale 1 they all
    # fall in the first): a wrong coefficient or interval bound anywhere in erf changes GELU's output
    # (measured at x20, per GELU call: ~4,500 / 13,000 / 7,200 / ~280 entries in the four tail intervals)
    # B T d_ff = 7 x 20 x 256 > one erf chunk: the tails of the second chunk are found and placed too.
    # x20, not more: the pre-activations reach ~14, and float32's elementwise rule (atol 1e-5) must stay
    # above the rounding of their dot products (measured worst 6.7e-6; at x40, scale 31: 1.24e-5, which
    # failed the rule when BLAS ran on 2 threads)
    "gelu_wide":   ({}, dict(batch=GELU_WIDE_BATCH, seq_len=None, opt_steps=4, weight_scale={"mlp.c_fc.weight": 20.0})),
    "pad_scatter": ({}, dict(batch=3, seq_len=10, pad="scatter")),
    "pad_row":     (dict(pad_id=7), dict(batch=3, seq_len=10, pad="row")),
    # only the first position of each row has a target, so prediction heads 2 and 3 have none at all:
    # they are left out of the loss, keep no cache (no softmax, no projection input) and their backward
    # is skipped (zero tap gradients, zero mtp.2 / mtp.3 gradients, against autograd's None -> zeros);
    # the memory check holds the manual side to manual.memory's per-head closed form (heads_with_targets)
    "n_future_idle": (dict(n_future=3), dict(batch=4, seq_len=12, pad="first")),
    # every layer writing into the workspace pool (manual/layers/workspace.py; bit-identical to the plain path)
    "workspace":   ({}, dict(batch=4, seq_len=12, manual_kwargs=dict(workspace=True))),
    # float32 only: token embeddings x 1e21, so every layer norm's row sum of squares overflows float32
    # (manual/layers/layernorm.py _rescaled_rows; float64 does not overflow there). Untied, so the logits
    # stay at their usual scale (tied, the head would read the x 1e21 embeddings: logits ~1e21).
    "ln_overflow": (dict(tie_embeddings=False), dict(batch=4, seq_len=12, weight_scale={"wte.weight": 1e21})),
}

TRAIN_STEPS = 200

QUICK = ("base", "post_ln", "n_future_3", "untied")

# Run on request (--variant NAME), not by default, each with the reason. None at present
# (n_future_idle moved into VARIANTS once the manual side kept nothing for a head without targets).
EXTRA: dict[str, tuple[dict, dict]] = {}


def cases(preset: str = "tiny", dtypes=("float64", "float32"), quick: bool = False,
          only: list[str] | None = None, outside: bool = False) -> list[Case]:
    """The matrix's cases. `outside`: for an implementation under test (leaves out OWN_SIDES_ONLY unless
    `only` names them)."""
    names = list(QUICK) if quick else [n for n in VARIANTS if not (outside and n in OWN_SIDES_ONLY)]
    if only:
        unknown = sorted(set(only) - set(VARIANTS) - set(EXTRA))
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}, on request: {sorted(EXTRA)}")
        names = list(only)
    out = []
    for dtype in dtypes:
        for name in names:
            if (name in FLOAT64_ONLY and dtype != "float64") or (name in FLOAT32_ONLY and dtype != "float32"):
                continue
            cfg_over, case_over = VARIANTS[name] if name in VARIANTS else EXTRA[name]
            cfg = ModelConfig.preset(preset, dtype=dtype, **cfg_over)
            case_over = dict(case_over)
            if case_over.get("seq_len") is not None:
                case_over["seq_len"] = min(case_over["seq_len"], cfg.max_seq_len)
            case = Case(label=f"{preset}.{name}", cfg=cfg, **case_over)
            if name == "base" and dtype == "float64" and preset == "tiny":
                case.train_steps = TRAIN_STEPS    # issue 7: 200 steps of training, within 1e-8 (here 1e-9)
            out.append(case)
    return out
