"""argparse value types shared by the command-line tools: each error names the value."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def set_blas_threads(n: int) -> None:
    """Thread count for NumPy's BLAS and torch's OpenMP pool. Takes effect only in a process that has
    not imported NumPy / torch yet (the libraries read these variables once, at load), and in the
    child processes started after it."""
    for var in BLAS_THREAD_VARS:
        os.environ[var] = str(n)


def int_at_least(low: int, what: str = ""):
    """An argparse type: an int >= low; `what` is appended to the error (e.g. a hint)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{what}, got {value}")
        return value
    parse.__name__ = f"int>={low}"
    return parse


def float_at_least(low: float = 0.0, strict: bool = False):
    """An argparse type: a finite float >= low (> low when strict); NaN and infinities are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low:g}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


CHECKPOINT_NAME = "checkpoint.safetensors"   # the file tools/train.py writes into its --out folder


def checkpoint_in(path) -> Path:
    """A checkpoint file as given, or CHECKPOINT_NAME inside a folder (existence is checked by the loader)."""
    p = Path(path)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def read_header_metadata(path, limit: int = 2**24) -> dict:
    """The __metadata__ of a safetensors file, read with the standard library only (no NumPy), for
    what must be known before NumPy is imported (the thread count of a run being resumed). The full,
    checked read is manual.checkpoint.load_tensors; this one raises OSError / ValueError at the first
    problem and reads at most `limit` bytes of header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= limit:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}
