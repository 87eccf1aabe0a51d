"""Token + position embedding.

    x[b, t] = wte[ids[b, t]] + wpe[t]          ids (B, T) int; wte (V, C); wpe (S, C); x (B, T, C)

Backward: a token id that occurs at several positions received its row at each of them, so
its gradient is the SUM over those positions:
    dwte[v] += sum_{(b, t): ids[b, t] == v} dx[b, t]       (`dwte[ids] += dx` would keep only one
                                                             of the repeated rows; the rows of dx are
                                                             grouped by id and each group summed)
    dwpe[t] += sum_b dx[b, t]                               for t < T; rows >= T get nothing

Cache: EmbeddingCache(ids) (B*T int64 = 8*B*T bytes). ids are not differentiable: backward
returns nothing and only accumulates into dwte, dwpe.

`ws`: an optional Workspace (manual/layers/workspace.py): x, the rows of dx sorted by id and the
group sums are then its named arrays instead of fresh ones.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .workspace import empty, scratch


class EmbeddingCache(NamedTuple):
    ids: np.ndarray            # (B, T) int64 token ids: the rows of wte that dx is added into


def embedding_forward(ids, wte, wpe, ws=None):
    """ids (B, T) int64, already validated to lie in [0, V) -> x (B, T, C)."""
    B, T = ids.shape
    x = empty(ws, "x", (B, T, wte.shape[1]), wte.dtype)        # (B, T, C)
    np.take(wte, ids, axis=0, out=x, mode="clip")              # x = wte[ids] ("clip": ids are valid, no buffer)
    x += wpe[:T]                                               # (T, C) broadcast over B
    return x, EmbeddingCache(ids)


def embedding_backward(dx, cache, dwte, dwpe, ws=None):
    """Accumulates dwte (V, C) and dwpe (S, C); returns None (ids have no gradient)."""
    ids = cache.ids
    T, C = ids.shape[1], dx.shape[-1]
    # Repeated ids are summed, not overwritten. Same sums as np.add.at(dwte, ids, dx), faster: sort the
    # positions by id (stable: each group keeps position order), sum each group's rows with one
    # reduceat, then add one row per distinct id. Plain form of the next four lines:
    #     dwte[uniq] += np.add.reduceat(dx.reshape(-1, C)[order], first, axis=0)
    flat = ids.reshape(-1)                                     # (B*T,)
    order = np.argsort(flat, kind="stable")                    # (B*T,)
    ids_sorted = flat[order]
    first = np.flatnonzero(np.diff(ids_sorted, prepend=-1))    # (U,) start of each group of equal ids
    uniq = ids_sorted[first]                                   # (U,) distinct ids
    rows = np.take(dx.reshape(-1, C), order, axis=0, out=empty(ws, "rows", (flat.size, C), dx.dtype), mode="clip")
    sums = np.add.reduceat(rows, first, axis=0, out=empty(ws, "sums", (flat.size, C), dx.dtype)[:first.size])
    sums += np.take(dwte, uniq, axis=0, out=empty(ws, "picked", (flat.size, C), dx.dtype)[:first.size], mode="clip")
    dwte[uniq] = sums                                          # (U, C), ids distinct: dwte[uniq] += group sums
    dwpe[:T] += np.sum(dx, axis=0, out=scratch(ws, (T, C), dx.dtype))   # (T, C)
