"""manual: a decoder-only transformer in NumPy with every backward pass written by hand.

Imports nothing but NumPy (and safetensors for checkpoints); never torch.
"""
from .config import ModelConfig, PRESETS
from .registry import (TensorSpec, param_specs, tap_specs, param_count, param_count_closed_form,
                       init_params, decay_groups, resolve)
from .checkpoint import CheckpointError

try:  # the model is built on top of the pieces above
    from .model import Model
except ModuleNotFoundError as exc:  # pragma: no cover - only while model.py is being written
    if exc.name != f"{__name__}.model":
        raise

__all__ = ["ModelConfig", "PRESETS", "TensorSpec", "param_specs", "tap_specs", "param_count",
           "param_count_closed_form", "init_params", "decay_groups", "resolve", "CheckpointError"]
