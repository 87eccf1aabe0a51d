"""Checkpoint I/O: safetensors files only (no pickle, never torch.load).

Layout of a file:
    tensors   canonical parameter names (manual/registry.py), the tied matrix stored once;
              a training checkpoint adds optimizer state under `optim.<state>.<param name>`
              (for example `optim.exp_avg.transformer.wte.weight`).
    metadata  strings: "format" = FORMAT, "format_version" = FORMAT_VERSION,
              "config" = ModelConfig as JSON; a training checkpoint adds "step", "rng",
              "tokenizer", "optimizer" (JSON) and whatever else the trainer needs.

Writes are atomic: a temporary file in the destination folder, fsync, os.replace, so a
failed write leaves the previous checkpoint intact. Loading checks config, names, shapes
and dtypes before anything is used and raises one CheckpointError listing every missing,
unexpected and mismatched tensor.

Both implementations read and write through these functions (reference/ with NumPy
copies of its tensors), so the file format has exactly one definition.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .registry import param_shapes, param_specs

FORMAT = "transformer-conformance"
FORMAT_VERSION = "1"
OPTIM_PREFIX = "optim."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message lists every problem."""


def save_tensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to a safetensors file atomically (temp file in the same folder, fsync, os.replace)."""
    from safetensors.numpy import save

    path = Path(path)
    bad = {k: type(v).__name__ for k, v in tensors.items() if not isinstance(v, np.ndarray)}
    if bad:
        raise TypeError(f"save_tensors needs NumPy arrays; got {bad}")
    bad_meta = {k: type(v).__name__ for k, v in (metadata or {}).items()
                if not isinstance(k, str) or not isinstance(v, str)}
    if bad_meta:
        raise TypeError(f"safetensors metadata must map str to str; got non-str values for {bad_meta}")
    payload = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata or {})
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write checkpoint {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_tensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    data = path.read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({len(data)} bytes): {exc}") from None
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        metadata = dict(f.metadata() or {})
    return tensors, metadata


def model_metadata(cfg: ModelConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_json()}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def check_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], where: str = "checkpoint",
                 allow_prefixes: tuple[str, ...] = (OPTIM_PREFIX,)) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mismatched tensor."""
    expected = param_shapes(cfg)
    dtype = np.dtype(cfg.dtype)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected and not n.startswith(allow_prefixes)]
    mismatched = []
    for name, shape in expected.items():
        if name in tensors:
            arr = tensors[name]
            if tuple(arr.shape) != shape:
                mismatched.append(f"{name}: shape {tuple(arr.shape)}, expected {shape}")
            elif arr.dtype != dtype:
                mismatched.append(f"{name}: dtype {arr.dtype}, expected {dtype} (config dtype {cfg.dtype!r})")
    if missing or unexpected or mismatched:
        lines = [f"{where} does not match the config "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched):"]
        lines += [f"  missing:    {n} {expected[n]}" for n in missing]
        lines += [f"  unexpected: {n} {tuple(tensors[n].shape)}" for n in unexpected]
        lines += [f"  mismatched: {m}" for m in mismatched]
        if cfg.tie_embeddings and "lm_head.weight" in unexpected:
            lines.append("  (the config ties embeddings, so lm_head.weight is transformer.wte.weight and is not stored)")
        raise CheckpointError("\n".join(lines))


def save_model(path, cfg: ModelConfig, params: dict[str, np.ndarray],
               extra_tensors: dict[str, np.ndarray] | None = None,
               extra_metadata: dict[str, str] | None = None) -> None:
    """Write parameters (+ optional optimizer tensors and metadata) as one atomic safetensors file."""
    check_params(cfg, params, where="parameters to save", allow_prefixes=())
    tensors = {name: params[name] for name in (s.name for s in param_specs(cfg))}
    for name, arr in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"extra tensor {name!r} collides with a parameter name")
        tensors[name] = arr
    save_tensors(path, tensors, model_metadata(cfg, extra_metadata))


def read_config(metadata: dict[str, str], path="checkpoint") -> ModelConfig:
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has format {metadata.get('format')!r}, expected {FORMAT!r} "
            f"(metadata keys: {sorted(metadata)})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {metadata.get('format_version')!r}; this code reads {FORMAT_VERSION!r}")
    if "config" not in metadata:
        raise CheckpointError(f"{path} has no 'config' in its metadata")
    try:
        return ModelConfig.from_json(metadata["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path} holds an invalid config: {exc}") from None


def load_model(path, cfg: ModelConfig | None = None):
    """Read a model checkpoint strictly.

    Returns (cfg, params, extras, metadata): params keyed by canonical name in registry order,
    extras the `optim.*` tensors (empty for a plain model checkpoint). If `cfg` is given, the
    checkpoint's config must equal it.
    """
    tensors, metadata = load_tensors(path)
    file_cfg = read_config(metadata, path)
    if cfg is not None and cfg != file_cfg:
        diffs = [f"{k}: file {v!r} vs expected {getattr(cfg, k)!r}"
                 for k, v in file_cfg.to_dict().items() if getattr(cfg, k) != v]
        raise CheckpointError(f"{path} holds a different config: " + "; ".join(diffs))
    check_params(file_cfg, tensors, where=str(path))
    params = {s.name: tensors[s.name] for s in param_specs(file_cfg)}
    extras = {k: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)}
    return file_cfg, params, extras, metadata
