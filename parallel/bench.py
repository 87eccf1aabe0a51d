"""All-reduce time against bucket size, on gloo (what ManualDP's one flat all-reduce costs).

    torchrun --standalone --nproc-per-node 2 -m parallel.bench                  # 4 KB .. 498 MB, float32
    torchrun --standalone --nproc-per-node 2 -m parallel.bench --max-mb 64 --repeats 5

Each size: one warm-up, then --repeats timed all-reduces (SUM, in place) of one float32 buffer,
each after a barrier; rank 0 prints the median, the minimum and the bus bandwidth
2 (N - 1) / N * bytes / time (the bytes a ring all-reduce moves per rank). 498 MB is the float32
gradient of gpt2-small (124.4M parameters, the tied matrix once).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from . import dp

GPT2_SMALL_MB = 124_439_808 * 4 / 1e6       # float32 gradient bytes of gpt2-small, in MB (1e6 bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m parallel.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-mb", type=float, default=GPT2_SMALL_MB, help="largest bucket in MB (default gpt2-small's)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    ctx = dp.init(timeout_s=600)
    sizes, mb = [], 0.004
    while mb < args.max_mb:
        sizes.append(mb)
        mb *= 8
    sizes.append(args.max_mb)
    if ctx.rank == 0:
        print(f"all-reduce (gloo, SUM, float32) over {ctx.world} ranks, {torch.get_num_threads()} torch thread(s) each")
        print(f"{'MB':>10} {'median ms':>11} {'min ms':>9} {'bus GB/s':>9}")
    for mb in sizes:
        t = torch.ones(max(1, int(mb * 1e6 / 4)), dtype=torch.float32)
        dist.all_reduce(t)                                   # warm-up (connections, buffers)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        bus = 2 * (ctx.world - 1) / ctx.world * t.numel() * 4 / med / 1e9
        if ctx.rank == 0:
            print(f"{t.numel() * 4 / 1e6:>10.3f} {med * 1e3:>11.2f} {min(times) * 1e3:>9.2f} {bus:>9.2f}", flush=True)
        del t
    dp.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
