"""Workspace: the named arrays a training step writes into, reused by every later step (issue 14).

    model = Model(cfg, workspace=True)       model.workspace is a Workspace; see manual/model.py

Why: a forward + backward of the medium preset otherwise creates about 200 arrays over 64 KiB
(260 MiB) per step, and every fresh array that large is mapped from the OS and page-faulted in
again. With a workspace each layer writes its outputs, its gradients and its scratch into arrays
named after the layer and the field ("h.0.attn.probs", "h.0.mlp.c_fc.dx"; scratch by shape and dtype),
created the first time a step asks for them and reused afterwards; a steady-state step allocates
(almost) nothing. tests/test_alloc.py counts it.

What it is NOT: a cache that grows between calls. The set of names is fixed by the config and the
batch shape (B, T): after the first step nothing is added (tests/test_alloc.py checks it), a name
asked for with another shape or dtype is an error, and a model that sees a new (B, T) replaces its
workspace with a new one. The price: with a workspace, the arrays a step returns (model.taps,
model.tap_grads, model.logits) are overwritten by the next step; copy what you keep.

Layers take `ws=None` (no workspace: NumPy allocates, the plain path) or a Workspace scoped to the
layer, and get their arrays through `out(ws, ...)` (for `out=` arguments: None allocates as usual)
or `empty(ws, ...)` (an array in any case). Scratch arrays, consumed within one call, are shared by
all layers through `scratch(ws, ...)`, keyed by shape and dtype.
"""
from __future__ import annotations

import numpy as np


class Workspace:
    """Named arrays reused across steps, all of one batch shape; `scope` gives a layer its own names."""

    def __init__(self, batch_shape: tuple[int, int], *, _shared: tuple | None = None, _prefix: str = ""):
        self.batch_shape = tuple(batch_shape)     # (B, T) of every step that uses this workspace
        # shared by every scope: the named arrays, the scratch arrays {(shape, dtype, slot): array}, the scopes
        self.arrays, self.scratch, self._scopes = ({}, {}, {}) if _shared is None else _shared
        self.prefix = _prefix

    def scope(self, name: str) -> "Workspace":
        """The same arrays, with names under `name.` (one scope per layer: 'h.0', then 'attn', ...)."""
        prefix = f"{self.prefix}{name}."
        sub = self._scopes.get(prefix)         # made once per name (speed: no new object per call)
        if sub is None:
            sub = self._scopes[prefix] = Workspace(self.batch_shape, _shared=(self.arrays, self.scratch, self._scopes),
                                                   _prefix=prefix)
        return sub

    def get(self, name: str, shape, dtype) -> np.ndarray:
        """The array `name` of this scope: created on first use, the same array afterwards."""
        key = self.prefix + name
        arr = self.arrays.get(key)
        if arr is None:
            arr = self.arrays[key] = np.empty(shape, dtype=dtype)
        elif arr.shape != tuple(shape) or arr.dtype != dtype:
            raise ValueError(f"workspace array {key!r} is {arr.shape} {arr.dtype}, asked for {tuple(shape)} "
                             f"{np.dtype(dtype)}: one name must keep one shape (batch shape {self.batch_shape})")
        return arr

    def get_scratch(self, shape, dtype, slot: int = 0) -> np.ndarray:
        """The scratch array of this shape, dtype and slot, one for the whole model (see `scratch`)."""
        key = (tuple(shape), dtype, slot)
        arr = self.scratch.get(key)
        if arr is None:
            arr = self.scratch[key] = np.empty(shape, dtype=dtype)
        return arr

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + sum(a.nbytes for a in self.scratch.values())

    def __repr__(self) -> str:
        return (f"Workspace(batch_shape={self.batch_shape}, {len(self.arrays)} named and {len(self.scratch)} scratch "
                f"arrays, {self.nbytes():,} bytes)")


def out(ws: Workspace | None, name: str, shape, dtype):
    """For an `out=` argument: the workspace array, or None (NumPy allocates) without a workspace."""
    return None if ws is None else ws.get(name, shape, dtype)


def empty(ws: Workspace | None, name: str, shape, dtype) -> np.ndarray:
    """An uninitialised array: the workspace's, or a new one without a workspace."""
    return np.empty(shape, dtype=dtype) if ws is None else ws.get(name, shape, dtype)


def ws_kw(ws: Workspace | None, name: str) -> dict:
    """Keyword arguments for a call into another layer: {"ws": its scope}, or none at all without a
    workspace, so that a layer replaced by one written for the plain signature (tools/faults.py)
    keeps working."""
    return {} if ws is None else {"ws": ws.scope(name)}


def scratch(ws: Workspace | None, shape, dtype, slot: int = 0):
    """For an `out=` argument whose result is consumed before the layer returns: one array per
    (shape, dtype, slot) for the whole model (at the workspace's root), or None without a workspace."""
    return None if ws is None else ws.get_scratch(shape, dtype, slot)
