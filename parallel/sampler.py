"""The deterministic sharded sampler: which rows of the global batch each rank trains on.

The global batch (B rows, the same on every rank: manual.data.Batches draws it from the data seed
and the epoch alone) is cut into W * K contiguous shards of b = B / (W * K) rows, W ranks and K
micro-steps:

    micro-step k, rank r  ->  rows [(k * W + r) * b, (k * W + r + 1) * b)

The shards are disjoint and their union is the whole global batch, so N ranks see exactly the
rows one process would. The assignment is a pure function of (B, W, K, rank, k): a restart (same
or different world size) never needs a sampler state. B must divide by W * K; anything else would
drop or repeat rows, so it is refused.
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
    if B % (world * accum):
        raise ValueError(f"the global batch of {B} rows does not split into {world} ranks x {accum} micro-steps "
                         f"(B must be a multiple of {world * accum}; e.g. --batch-size {world * accum * max(1, B // (world * accum))})")
    b = B // (world * accum)
    start = (micro * world + rank) * b
    if fault == "overlapping_shards":
        # the bug: every rank starts from the first shard of the micro-step, offset by half a shard
        # (a stride of b // 2 where b was meant): shards overlap and some rows are never seen
        start = micro * world * b + rank * max(1, b // 2)
    return slice(start, start + b)


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
