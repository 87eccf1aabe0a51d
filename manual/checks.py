"""Input checks shared by both implementations (NumPy only), so that both raise the same errors.

The project's error policy, in one place:

    ValueError              a value is wrong (a shape, a range, a config field, a checkpoint's content)
    TypeError               a value has the wrong type (a cfg that is not a ModelConfig, params that are
                            not a mapping of NumPy arrays, removing a parameter from model.params)
    CallOrderError          a method called out of order (backward() before forward()); it is a
                            RuntimeError and, for code written before both sides agreed, a ValueError
    NonFiniteError          a NaN or an infinity where the finite policy forbids one (a ValueError):
                            loading non-finite weights (unless allow_nonfinite=True), non-finite logits
                            at sampling time, non-finite uniform draws

manual.Model and reference.Model call these functions, so the same bad input gets the same
exception type (and the same words) from both sides.

The finite policy: non-finite numbers are refused where they enter (a checkpoint, a sampling
step) and reported, naming the first non-finite tensor, where they arise (the trainer names the
step and the first non-finite tap or gradient; a model in debug mode names the first non-finite
tap of a forward). Nothing non-finite is ever written as a checkpoint.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class CallOrderError(RuntimeError, ValueError):
    """A method was called before the one it needs (backward() before a forward() with targets)."""


class NonFiniteError(ValueError):
    """A NaN or an infinity where the finite policy forbids it; the message names the tensor."""


def first_nonfinite(tensors: Mapping) -> tuple[str, int, tuple, float] | None:
    """The first entry (in the mapping's order) holding a NaN or an infinity:
    (name, how many non-finite values, index of the first, its value); None when all are finite."""
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype.kind not in "fc":
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            return name, int(bad.sum()), index, arr[index].item()
    return None


def describe_nonfinite(tensors: Mapping, what: str = "tensor") -> str | None:
    """'<what> NAME holds N non-finite value(s), the first at INDEX (VALUE)', or None when all are finite."""
    found = first_nonfinite(tensors)
    if found is None:
        return None
    name, count, index, value = found
    return f"{what} {name} holds {count} non-finite value(s), the first at {index} ({value})"


def check_finite(tensors: Mapping, where: str, what: str = "tensor", hint: str = "") -> None:
    """Raise NonFiniteError naming the first non-finite tensor of `tensors` (in order)."""
    found = describe_nonfinite(tensors, what)
    if found is not None:
        raise NonFiniteError(f"{where}: {found}{hint}")


_NO_PARAMS = object()


def check_model_args(cfg, params=_NO_PARAMS) -> None:
    """The arguments of Model(cfg) / Model.from_params(cfg, params), on both sides: TypeError when
    cfg is not a ModelConfig or params is not a mapping of names to NumPy arrays."""
    from .config import ModelConfig

    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if params is _NO_PARAMS:
        return
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of canonical names to NumPy arrays, got {type(params).__name__}")
    bad = {k: type(v).__name__ for k, v in params.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)}
    if bad:
        raise TypeError(f"params must map str names to NumPy arrays; got {bad}")


def check_call_order(has_forward: bool, has_loss: bool) -> None:
    """backward() needs a forward() with targets since the model was made (CallOrderError otherwise)."""
    if not has_forward:
        raise CallOrderError("backward() called before forward(): there are no activations to differentiate; "
                             "call model.forward(ids, targets) first")
    if not has_loss:
        raise CallOrderError("backward() needs a loss, but the last forward() was called with targets=None; "
                             "call model.forward(ids, targets) first")


def check_param_value(cfg, name: str, value, expected_shape: tuple | None) -> np.ndarray:
    """A new value for parameter `name` (model.params[name] = value): a NumPy array of the registered
    shape and the config dtype. ValueError / TypeError name the parameter and the numbers."""
    if expected_shape is None:
        raise ValueError(f"{name!r} is not a parameter of this model; parameters are the registry's "
                         f"(manual.registry.param_specs)")
    if not isinstance(value, np.ndarray):
        raise TypeError(f"model.params[{name!r}] must be a NumPy array, got {type(value).__name__}")
    if tuple(value.shape) != tuple(expected_shape):
        raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(expected_shape)}")
    if value.dtype != np.dtype(cfg.dtype):
        raise ValueError(f"{name}: dtype {value.dtype}, expected {np.dtype(cfg.dtype)} (config dtype {cfg.dtype!r})")
    return value


class LiveParams(dict):
    """{name: ndarray} views of a model's parameters where `params[name] = new_array` is honoured: the
    new values are checked (check_param_value) and copied into the model's own storage. Used by
    reference.Model.params, so that rebinding a parameter changes the model on both sides, as it
    does in manual.Model. Removing a parameter is refused (TypeError)."""

    def __init__(self, views: dict, cfg, shapes: dict):
        super().__init__(views)
        self._cfg, self._shapes = cfg, shapes

    def __setitem__(self, name, value) -> None:
        check_param_value(self._cfg, name, value, self._shapes.get(name))
        self[name][...] = value

    def update(self, *args, **kwargs) -> None:
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def _refuse(self, *args, **kwargs):
        raise TypeError("a model's parameters cannot be removed; assign a new array of the same shape instead")

    __delitem__ = pop = popitem = clear = setdefault = _refuse
