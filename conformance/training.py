"""Training equivalence: both implementations trained for many steps from one checkpoint.

`training_equivalence(cfg, steps, seed)` writes one checkpoint (registry.init_params(cfg, seed),
manual.checkpoint.save_model), loads it into manual.Model and reference.Model, and trains each
with the same loop (manual/trainer.py), the same batches in the same order (manual.data.Batches
over a deterministic synthetic text, char level), the same learning-rate schedule and clipping;
manual.optim drives the manual side, torch.optim (reference/training.py) the reference side.
It returns, as Comparisons with check="training":

    loss       the training loss of every step, as one curve (steps,): worst_index is the step - 1
    <param>    every parameter after the last step

In float64 the two must stay within 1e-9 of each tensor's scale (conformance/compare.py's
rule) — issue 7 asks for 1e-8 relative after 200 steps, and the measured gap is far below both.
A float32 run is not expected to pass: training amplifies the last-bit differences of float32
arithmetic (different summation orders, torch's MKL sqrt) step after step.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from manual.checkpoint import load_model, save_model
from manual.config import ModelConfig
from manual.data import Batches, make_windows, synthetic_corpus
from manual.registry import decay_groups, init_params
from manual.tokenizer import CharTokenizer
from manual.trainer import Trainer

from .compare import Comparison, compare


def training_data(cfg: ModelConfig, seed: int = 0, n_chars: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) windows (W, T = max_seq_len) of a deterministic synthetic text at char level.

    The synthetic grammar has about 30 characters; with the 4 special tokens the ids fit any
    vocab_size >= that (the tiny preset's 100)."""
    text = synthetic_corpus(n_chars, seed=seed)
    tok = CharTokenizer.fit(text)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the synthetic corpus needs {tok.vocab_size} token ids, but vocab_size is "
                         f"{cfg.vocab_size}; use vocab_size >= {tok.vocab_size}")
    if cfg.pad_id != tok.PAD:
        raise ValueError(f"pad_id must be the tokenizer's PAD ({tok.PAD}), got {cfg.pad_id}")
    return make_windows(tok.encode(text), cfg.max_seq_len, pad_id=tok.PAD)


def _train(impl: str, cfg: ModelConfig, params: dict, x: np.ndarray, y: np.ndarray, steps: int, seed: int,
           batch_size: int, optimizer: str, lr: float, weight_decay: float, schedule: str, warmup: int,
           clip_norm: float | None, clip_value: float | None):
    """Train one implementation; returns (losses (steps,), {name: final parameter copy})."""
    if impl == "manual":
        import manual
        from manual.optim import SGD, AdamW
        model = manual.Model.from_params(cfg, params)
        groups = decay_groups(cfg, weight_decay)
        if optimizer == "adamw":
            opt = AdamW(model.params, model.grads, lr=lr, weight_decay=weight_decay, groups=groups)
        else:
            opt = SGD(model.params, model.grads, lr=lr, momentum=0.9, weight_decay=weight_decay, groups=groups)
        clips = (None, None)
    else:
        import reference
        from reference.training import TorchOptimizer, clip_functions
        model = reference.Model.from_params(cfg, params)
        opt = TorchOptimizer(model, optimizer, lr=lr, weight_decay=weight_decay,
                             momentum=0.9 if optimizer == "sgd" else 0.0)
        clips = clip_functions(model)
    trainer = Trainer(model, opt, Batches(x, y, batch_size=batch_size, seed=seed), total_steps=steps, lr=lr,
                      schedule=schedule, warmup=warmup, min_lr=0.1 * lr, clip_norm=clip_norm,
                      clip_value=clip_value, clip_grad_norm=clips[0], clip_grad_value=clips[1])
    result = trainer.run()
    if result.stopped != "finished":
        raise RuntimeError(f"{impl} training did not finish: {result.message}")
    return np.asarray(result.state.train_loss, dtype=np.float64), {k: v.copy() for k, v in model.params.items()}


def training_equivalence(cfg: ModelConfig, steps: int = 200, seed: int = 0, *, batch_size: int = 4,
                         optimizer: str = "adamw", lr: float = 3e-3, weight_decay: float = 0.01,
                         schedule: str = "cosine", warmup: int = 10, clip_norm: float | None = 1.0,
                         clip_value: float | None = None, n_chars: int = 20_000, label: str | None = None,
                         widen: tuple[float, str] | None = None) -> list[Comparison]:
    """Train manual and reference for `steps` steps from one checkpoint; compare losses and weights.

    Returns [loss curve, every parameter in registry order], each a Comparison with
    check="training" (manual is `a`, the implementation under test; reference is `b`).
    `widen=(factor, reason)` widens every tolerance, with the reason carried into the report.
    """
    label = label or f"train.{cfg.dtype}.{optimizer}.{steps}"
    x, y = training_data(cfg, seed, n_chars)
    with tempfile.TemporaryDirectory() as tmp:          # "from the same checkpoint": one file, read twice
        path = Path(tmp) / "init.safetensors"
        save_model(path, cfg, init_params(cfg, seed))
        _cfg, params, _extras, _meta = load_model(path, cfg)
    kw = dict(steps=steps, seed=seed, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
              schedule=schedule, warmup=warmup, clip_norm=clip_norm, clip_value=clip_value)
    m_loss, m_params = _train("manual", cfg, params, x, y, **kw)
    r_loss, r_params = _train("reference", cfg, params, x, y, **kw)
    out = [compare(m_loss, r_loss, tensor="loss", check="training", config=label, widen=widen)]
    out[0].extra["steps"] = steps
    for name in r_params:
        out.append(compare(m_params[name], r_params[name], tensor=name, check="training", config=label,
                           step=steps, widen=widen))
    return out
