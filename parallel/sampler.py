"""The deterministic sharded sampler: which rows of the global batch each rank trains on.

The global batch (B rows, the same on every rank: manual.data.Batches draws it from the data seed
and the epoch alone) is cut into W * K contiguous shards, W ranks and K micro-steps; shard
i = k * W + r (micro-step k, rank r) holds

    rows [i * B // (W K), (i + 1) * B // (W K))

so shards differ in size by at most one row when W K does not divide B (the last, smaller batch
of an epoch), and are empty when B < W K. That is harmless: the loss is normalised by the global
count of non-PAD targets (parallel/dp.py), so a shard's weight is its share of the targets, and an
empty shard adds nothing. The shards are disjoint and their union is the whole global batch, so N
ranks see exactly the rows one process would. The assignment is a pure function of
(B, W, K, rank, k): a restart (same or different world size) needs no sampler state.
"""
from __future__ import annotations

import numpy as np

SHARD_FAULTS = ("overlapping_shards",)


def shard_rows(B: int, world: int, accum: int, rank: int, micro: int, fault: str | None = None) -> slice:
    """The rows of the global batch that `rank` trains on at micro-step `micro` (0-based)."""
    if world < 1 or accum < 1:
        raise ValueError(f"world size {world} and grad-accum {accum} must both be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    if not 0 <= micro < accum:
        raise ValueError(f"micro-step {micro} is outside [0, {accum})")
    n, i = world * accum, micro * world + rank
    start, stop = i * B // n, (i + 1) * B // n
    if fault == "overlapping_shards":
        # the bug: ranks step by half a shard where a whole one was meant: shards overlap, rows go unseen
        b = stop - start
        first = micro * world * B // n
        start = first + rank * max(1, b // 2)
        stop = start + b
    return slice(start, stop)


def shards(xb: np.ndarray, yb: np.ndarray, world: int, accum: int, rank: int,
           fault: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's K micro-batches [(x, y), ...] of the global batch (xb, yb), each (B / (W K), T)."""
    if xb.shape != yb.shape:
        raise ValueError(f"inputs {xb.shape} and targets {yb.shape} differ in shape")
    out = []
    for k in range(accum):
        rows = shard_rows(len(xb), world, accum, rank, k, fault)
        out.append((xb[rows], yb[rows]))
    return out
