"""Dumps from other implementations, and the case they are computed on (--export-case, --against).
The case directory, its README.txt and the dump's conventions are conformance/external.py's (one
definition for the conformance matrix's --impl-cmd and for this debugger)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance import external
from manual.config import ModelConfig

from .walk import Setup

DUMP_README = external.CASE_README


def export_case(setup: Setup, folder) -> list[Path]:
    return external.write_case(folder, setup.cfg, setup.params, setup.ids, setup.targets, label=setup.label)


def load_dump(path, cfg: ModelConfig, B: int, T: int) -> dict[str, np.ndarray]:
    """Read a dump (.safetensors or .npz). A file that cannot be read, unknown names, wrong shapes and
    dtypes that cannot be compared raise ValueError listing them; the dump's notes (a float32 dump of a
    float64 case, no tap gradients) are printed."""
    try:
        dump = external.read_dump(path, cfg, B, T, strict=False, require=False)
    except external.DumpError as exc:
        raise ValueError(str(exc)) from None
    if dump.problems:
        raise ValueError(f"dump {path}: " + "; ".join(dump.problems))
    for note in dump.notes:
        print(note)
    return dump.tensors
