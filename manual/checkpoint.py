"""Checkpoint I/O: safetensors files only (no pickle, never torch.load).

Layout of a file:
    tensors   canonical parameter names (manual/registry.py), the tied matrix stored once;
              a training checkpoint adds optimizer state under `optim.<state>.<param name>`
              (for example `optim.exp_avg.transformer.wte.weight`).
    metadata  strings: "format" = FORMAT, "format_version" = FORMAT_VERSION,
              "config" = ModelConfig as JSON; a training checkpoint adds "step", "rng",
              "tokenizer", "optimizer" (JSON) and whatever else the trainer needs.

Writes are atomic: a temporary file in the destination folder, fsync, os.replace, so a
failed write leaves the previous checkpoint intact. The temporary file is removed when the
write fails, and temporary files left by a killed save (`.NAME.*.tmp`, older than a minute)
are removed by the next save to the same path. The file gets the mode a plain open() would
give (0666 less the umask), not mkstemp's 0600, so another user or a container can read it.

Loading checks, before anything is used and before anything big is allocated: the metadata
(format, version, a config carrying every field), the sizes the config implies against the
tensors present (a tiny file cannot ask for n_layers = 10**9), then names, shapes and dtypes
(one CheckpointError listing every missing, unexpected and mismatched tensor), then the
finite policy: non-finite weights are refused unless load_model(..., allow_nonfinite=True).
Every problem is a CheckpointError (a ValueError) with one message; bfloat16 tensors (which
NumPy cannot hold) are named, with the way to widen them.

Both implementations read and write through these functions (reference/ with NumPy
copies of its tensors), so the file format has exactly one definition.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .checks import describe_nonfinite
from .config import ModelConfig
from .registry import param_count_closed_form, param_shapes, param_specs

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
    write_atomic(path, payload)


STALE_TEMP_SECONDS = 60     # a temp file this old is left over from a killed save, not one in progress


def write_atomic(path, payload) -> None:
    """Write `payload` (bytes, or an iterable of byte chunks, so a large file need not be joined first)
    to `path` atomically: a temp file `.NAME.<random>.tmp` in the same folder, fsync, os.replace, fsync
    of the folder. The file gets the umask's normal mode (0666 & ~umask). On any failure the temp file
    is removed; temp files of earlier killed writes to `path` are removed first."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    _remove_stale_temps(folder, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in ((payload,) if isinstance(payload, (bytes, bytearray, memoryview)) else payload):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
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


def _umask() -> int:
    mask = os.umask(0)      # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _remove_stale_temps(folder: Path, name: str) -> None:
    now = time.time()
    for tmp in folder.glob(f".{name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass        # another process's file, or gone already: not ours to insist on


def load_tensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    metadata = _header_metadata(data, path)
    try:
        tensors = load(data)
    except KeyError as exc:         # a dtype NumPy has no type for: safetensors.numpy raises KeyError('BF16')
        raise CheckpointError(
            f"{path} holds tensors of dtype {exc.args[0] if exc.args else '?'}, which NumPy cannot represent; "
            f"widen them to float32 first (for example in PyTorch: {{k: v.float() for k, v in "
            f"safetensors.torch.load_file(path).items()}}, then save_file)") from None
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({len(data)} bytes): {exc}") from None
    return tensors, metadata


def _header_metadata(data: bytes, path) -> dict[str, str]:
    """The __metadata__ of a safetensors file, read from its header (8-byte length + JSON) without
    touching the tensors, with one CheckpointError for a header that is truncated or not JSON."""
    from .config import load_json_object

    if len(data) < 8:
        raise CheckpointError(f"{path} is not a readable safetensors file: {len(data)} bytes, shorter than "
                              f"the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CheckpointError(f"{path} is not a readable safetensors file: its header says {n:,} bytes, but "
                              f"only {len(data) - 8:,} follow (a truncated file?)")
    try:
        header = load_json_object(data[8:8 + n].decode("utf-8"), "the safetensors header")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path} has a __metadata__ that is not a map of strings to strings")
    return dict(meta)


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
        return ModelConfig.from_json(metadata["config"], strict=True)
    except ValueError as exc:
        raise CheckpointError(f"{path} holds an invalid config: {exc}") from None


def implied_tensor_count(cfg: ModelConfig) -> int:
    """How many parameter tensors the config implies, without enumerating its n_layers blocks."""
    one, two = (len(param_specs(cfg.replace(n_layers=n))) for n in (1, 2))
    return one + (cfg.n_layers - 1) * (two - one)


def check_implied_size(cfg: ModelConfig, tensors: dict[str, np.ndarray], where: str = "checkpoint") -> None:
    """The sizes the config implies against the tensors present, before the registry enumerates anything.
    A header claiming n_layers = 10**9 fails here in microseconds. (Small differences are left to
    check_params, which lists every missing tensor by name; past twice the tensors present such a
    list would be useless and its enumeration expensive.)"""
    present = {name: arr for name, arr in tensors.items() if not name.startswith(OPTIM_PREFIX)}
    n_implied, n_present = implied_tensor_count(cfg), len(present)
    values_implied = param_count_closed_form(cfg)
    values_present = sum(int(arr.size) for arr in present.values())
    if n_implied > 2 * n_present + 16 or values_implied > 2 * values_present + 2**20:
        raise CheckpointError(
            f"{where} does not match its config: the config implies {n_implied:,} parameter tensors holding "
            f"{values_implied:,} values (n_layers {cfg.n_layers}, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
            f"vocab_size {cfg.vocab_size}, max_seq_len {cfg.max_seq_len}); the file holds {n_present:,} "
            f"tensors with {values_present:,} values")


def load_model(path, cfg: ModelConfig | None = None, allow_nonfinite: bool = False):
    """Read a model checkpoint strictly.

    Returns (cfg, params, extras, metadata): params keyed by canonical name in registry order,
    extras the `optim.*` tensors (empty for a plain model checkpoint). If `cfg` is given, the
    checkpoint's config must equal it. Non-finite parameters or optimizer state are refused
    (CheckpointError naming the first) unless allow_nonfinite=True.
    """
    tensors, metadata = load_tensors(path)
    file_cfg = read_config(metadata, path)
    if cfg is not None and cfg != file_cfg:
        diffs = [f"{k}: file {v!r} vs expected {getattr(cfg, k)!r}"
                 for k, v in file_cfg.to_dict().items() if getattr(cfg, k) != v]
        raise CheckpointError(f"{path} holds a different config: " + "; ".join(diffs))
    check_implied_size(file_cfg, tensors, where=str(path))
    check_params(file_cfg, tensors, where=str(path))
    params = {s.name: tensors[s.name] for s in param_specs(file_cfg)}
    extras = {k: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)}
    if not allow_nonfinite:
        found = describe_nonfinite({**params, **extras})
        if found is not None:
            raise CheckpointError(f"{path}: {found}; refusing to load non-finite weights (pass "
                                  f"allow_nonfinite=True to load them anyway, e.g. to inspect a diverged run)")
    return file_cfg, params, extras, metadata
