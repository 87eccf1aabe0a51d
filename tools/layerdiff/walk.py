"""The walk: one config, one set of weights, one batch (a `Setup`); the tensors of one forward +
backward on each side; their comparison in walk order (taps forward, loss, tap gradients
backward, parameter gradients in reverse registry order: see the package docstring); and the
optimizer walk over conformance/trajectory.py. Every comparison is conformance.compare.compare.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conformance import external, trajectory
from conformance.compare import Comparison
from conformance.engine import make_batch
from manual import registry
from manual.config import PRESETS, ModelConfig


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
        """The batches of an optimizer trajectory: the engine's (trajectory_batches), or the user's own, repeated."""
        if self.own_batch:
            return [(self.ids, self.targets)] * steps
        B, T = self.ids.shape
        return [make_batch(self.cfg, B, T, self.seed + 1 + s, self.pad) for s in range(steps)]


def make_setup(cfg: ModelConfig, seed: int = 0, batch: int = 2, seq_len: int | None = 8, batch_seed: int = 0,
               pad: bool = True, params: dict | None = None, label: str = "") -> Setup:
    """Weights registry.init_params(cfg, seed) (or `params`) and the conformance engine's batch."""
    T = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)
    ids, targets = make_batch(cfg, batch, T, batch_seed, pad)
    params = registry.init_params(cfg, seed) if params is None else params
    return Setup(cfg, params, ids, targets, label or cfg_label(cfg), batch_seed, pad)


def cfg_label(cfg: ModelConfig, preset: str = "tiny") -> str:
    """'tiny float64 norm=post' : the preset, the dtype and every field that differs from the preset."""
    base = ModelConfig.preset(preset) if preset in PRESETS else ModelConfig()
    diff = [f"{k}={v}" for k, v in cfg.to_dict().items() if getattr(base, k) != v and k != "dtype"]
    return " ".join([preset, cfg.dtype] + diff)


# -- the tensors of one forward + backward, in the dump format: <tap>, loss, grad.<tap>, grad.<param>

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


expected_names = external.dump_names      # (name, check) of every tensor in walk order
expected_shapes = external.dump_shapes    # name -> shape for a batch (B, T)


def walk(a: dict, b: dict, cfg: ModelConfig, label: str = "") -> list[Comparison]:
    """Compare tensors `a` (under test) against `b` (reference) in walk order. Names absent from
    `a` are skipped (a dump may leave some out). The dump conventions apply (conformance/conventions.py):
    masked attention entries are not compared; a float32 dump of a float64 case is compared at float32's
    tolerance, with a note."""
    return external.compare_tensors(a, b, cfg, label, strict=False)


def first_failure(rows: list[Comparison]) -> Comparison | None:
    return next((c for c in rows if not c.passed), None)


def optimizer_walk(setup: Setup, sides, steps: int, kind: str = "adamw"
                   ) -> tuple[list[Comparison], trajectory.Step | None]:
    """`steps` optimizer steps on both sides (conformance/trajectory.py, with snapshots for the judge),
    compared step by step; stops after the first step that disagrees.
    Returns (every comparison made, the failing step or None)."""
    m = sides.manual.from_params(setup.cfg, setup.params)
    r = sides.reference.from_params(setup.cfg, setup.params)
    rows: list[Comparison] = []
    for step in trajectory.run(sides.manual_optim, m, r, kind, setup.trajectory(steps), label=setup.label,
                               snapshots=True):
        rows += step.rows
        if step.first_failure is not None:
            return rows, step
    return rows, None
