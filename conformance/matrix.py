"""The conformance matrix: a preset (tiny by default) and its variants, each in float64 and float32.

One line per variant. `cases(preset, dtypes, quick, only)` expands it; the pytest suite and
`python -m conformance` both read it from here.
"""
from __future__ import annotations

from manual.config import ModelConfig

from .engine import Case

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
}

TRAIN_STEPS = 200

QUICK = ("base", "post_ln", "n_future_3", "untied")


def cases(preset: str = "tiny", dtypes=("float64", "float32"), quick: bool = False,
          only: list[str] | None = None) -> list[Case]:
    names = list(QUICK) if quick else list(VARIANTS)
    if only:
        unknown = sorted(set(only) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
        names = list(only)
    out = []
    for dtype in dtypes:
        for name in names:
            cfg_over, case_over = VARIANTS[name]
            cfg = ModelConfig.preset(preset, dtype=dtype, **cfg_over)
            case_over = dict(case_over)
            if case_over.get("seq_len") is not None:
                case_over["seq_len"] = min(case_over["seq_len"], cfg.max_seq_len)
            case = Case(label=f"{preset}.{name}", cfg=cfg, **case_over)
            if name == "base" and dtype == "float64" and preset == "tiny":
                case.train_steps = TRAIN_STEPS    # issue 7: 200 steps of training, within 1e-8 (here 1e-9)
            out.append(case)
    return out
