"""manual: a decoder-only transformer in NumPy with every backward pass written by hand.

Imports nothing but NumPy (and safetensors for checkpoints); never torch.
"""
from .config import ModelConfig, PRESETS
from .registry import (TensorSpec, param_specs, tap_specs, param_count, param_count_closed_form,
                       init_params, decay_groups, resolve)
from .checkpoint import CheckpointError

from .model import Model

__all__ = ["ModelConfig", "PRESETS", "Model", "TensorSpec", "param_specs", "tap_specs", "param_count",
           "param_count_closed_form", "init_params", "decay_groups", "resolve", "CheckpointError"]
