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
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class EmbeddingCache(NamedTuple):
    ids: np.ndarray            # (B, T) int64 token ids: the rows of wte that dx is added into


def embedding_forward(ids, wte, wpe):
    """ids (B, T) int64, already validated to lie in [0, V) -> x (B, T, C)."""
    T = ids.shape[1]
    x = wte[ids]                                               # (B, T, C) gather (a new array)
    x += wpe[:T]                                               # (T, C) broadcast over B
    return x, EmbeddingCache(ids)


def embedding_backward(dx, cache, dwte, dwpe):
    """Accumulates dwte (V, C) and dwpe (S, C); returns None (ids have no gradient)."""
    ids = cache.ids
    T, C = ids.shape[1], dx.shape[-1]
    # Repeated ids are summed, not overwritten. Same sums as np.add.at(dwte, ids, dx), faster: sort the
    # positions by id (stable: each group keeps position order), sum each group's rows with one
    # reduceat, then add one row per distinct id.
    flat = ids.reshape(-1)                                     # (B*T,)
    order = np.argsort(flat, kind="stable")                    # (B*T,)
    ids_sorted = flat[order]
    first = np.flatnonzero(np.diff(ids_sorted, prepend=-1))    # (U,) start of each group of equal ids
    dwte[ids_sorted[first]] += np.add.reduceat(dx.reshape(-1, C)[order], first, axis=0)  # (U, C), ids distinct
    dwpe[:T] += dx.sum(axis=0)                                 # (T, C)
