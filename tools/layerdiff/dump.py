"""Dumps from other implementations, and the case they are computed on (--export-case, --against)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from manual.config import ModelConfig
from tools._args import CHECKPOINT_NAME

from .walk import Setup, expected_names, expected_shapes

DUMP_README = """\
A test case for your own implementation (C++, CUDA, JAX, ...), written by
    python -m tools.layerdiff --export-case {dir}

Files
    checkpoint.safetensors  the weights: canonical (Hugging Face GPT-2) names, dtype {dtype}, metadata
                            "config" holds the ModelConfig as JSON. Matrices are [in, out] (y = x @ W + b);
                            transformer.wte.weight (and an untied lm_head.weight) are [V, C], logits = x @ W^T.
    ids.npy, targets.npy    the batch, int64 (B, T) = {shape}; targets equal to pad_id = {pad} are ignored.
    names.txt               every tensor the dump may hold, in walk order, with its shape.

What to write: one forward of ids with these targets, one backward of the mean loss, then a
safetensors (or .npz) file holding, under these keys, in dtype {dtype}:
    <tap name>              each named activation, e.g. "h.0.ln_1.out" (B, T, C), "h.0.attn.probs" (B, H, T, T)
    grad.<tap name>         d loss / d tap, e.g. "grad.h.0.attn.out"
    grad.<param name>       d loss / d parameter, e.g. "grad.transformer.h.0.mlp.c_fc.weight" [in, out]
    loss                    the scalar loss (shape ()), optional; "logits" is a tap
Leave out what your implementation does not have (it is reported as absent, not as a failure);
an unknown key is an error (it is almost always a misspelt name). Then:
    python -m tools.layerdiff --case {dir} --against your_dump.safetensors
The tap list and formulas: manual/registry.py (tap_specs) and docs/design.md.
"""


def export_case(setup: Setup, folder) -> list[Path]:
    from manual.checkpoint import save_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / CHECKPOINT_NAME, setup.cfg, setup.params)
    np.save(folder / "ids.npy", setup.ids.astype(np.int64))
    np.save(folder / "targets.npy", setup.targets.astype(np.int64))
    B, T = setup.ids.shape
    shapes = expected_shapes(setup.cfg, B, T)
    (folder / "names.txt").write_text("".join(f"{n} {list(shapes[n])}\n" for n, _ in expected_names(setup.cfg)))
    (folder / "README.txt").write_text(DUMP_README.format(dir=folder, dtype=setup.cfg.dtype, shape=(B, T),
                                                          pad=setup.cfg.pad_id))
    return [folder / n for n in (CHECKPOINT_NAME, "ids.npy", "targets.npy", "names.txt", "README.txt")]


def load_dump(path, cfg: ModelConfig, B: int, T: int) -> dict[str, np.ndarray]:
    """Read a dump (.safetensors or .npz); unknown names raise ValueError listing them."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dump {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            tensors = {k: z[k] for k in z.files}
    else:
        from manual.checkpoint import load_tensors
        tensors, _meta = load_tensors(path)
    if "loss" in tensors and tensors["loss"].size == 1:
        tensors["loss"] = tensors["loss"].reshape(())        # a scalar saved as shape (1,) is the same scalar
    known = expected_shapes(cfg, B, T)
    unknown = sorted(set(tensors) - set(known))
    if unknown:
        raise ValueError(f"dump {path} holds {len(unknown)} name(s) that are not taps, tap gradients or parameter "
                         f"gradients of this config: {unknown[:10]}; expected names are listed by --export-case "
                         f"(names.txt), e.g. {list(known)[:3]}")
    if not tensors:
        raise ValueError(f"dump {path} holds no tensors")
    return tensors
