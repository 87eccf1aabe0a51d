"""Benchmark: manual (NumPy) against reference (PyTorch eager) in one run, as median ratios.

    python tools/bench.py --preset tiny --dtype float32 --repeats 30
    python tools/bench.py --preset medium --batch-size 8 --seq-len 128 --json bench.json

For each implementation it times, on the same weights and batch, a forward (with loss), a
backward, and a full training step (zero_grad, forward, backward, clip, AdamW step). Runs
alternate between the two implementations so that machine noise hits both alike; the
report gives medians and the ratio manual / reference (below 1: manual is faster).
Threads: both sides use the same number of BLAS / intra-op threads (--threads, default 1,
the fairest comparison on a shared machine).
Clock: --clock wall (default) times elapsed time; --clock cpu times the CPU time of this process
(time.process_time: user + system, so page faults count), which other jobs competing for the
cores do not inflate; use it on a busy machine, with --threads 1.
Profile: --profile PHASE runs cProfile over the manual side of that phase (--repeats times) and
prints the functions that took the most time, instead of the comparison.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools._args import int_at_least, set_blas_threads  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="default: the preset's batch size")
    p.add_argument("--seq-len", type=int_at_least(1), default=None, help="default: the preset's max_seq_len")
    p.add_argument("--repeats", type=int_at_least(1), default=20)
    p.add_argument("--warmup", type=int_at_least(0), default=3)
    p.add_argument("--threads", type=int_at_least(1), default=1)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: this process's CPU time (robust on a busy machine)")
    p.add_argument("--profile", choices=["forward", "forward+backward", "train_step"],
                   help="cProfile the manual side of this phase and print the top functions")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    set_blas_threads(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    import manual
    import manual.optim
    import reference
    from reference import optim as ropt
    from conformance.engine import make_batch
    from manual.config import PRESETS, ModelConfig

    cfg = ModelConfig.preset(args.preset, dtype=args.dtype)
    B = args.batch_size if args.batch_size is not None else PRESETS[args.preset].train.get("batch_size", 4)
    T = args.seq_len if args.seq_len is not None else cfg.max_seq_len
    if T > cfg.max_seq_len:
        p.error(f"--seq-len {T} is outside [1, {cfg.max_seq_len}] for preset {args.preset}")
    ids, targets = make_batch(cfg, B, T, seed=0)
    m = manual.Model(cfg, seed=0)
    r = reference.Model(cfg, seed=0)
    mo = manual.optim.AdamW(m.params, m.grads, lr=1e-4, groups=manual.decay_groups(cfg, 0.01))
    ro = ropt.make_optimizer(r, kind="adamw", lr=1e-4, weight_decay=0.01)

    def phases(model, opt, clip):
        def fwd():
            model.forward(ids, targets)

        def bwd():  # forward outside the timer would need state juggling; time fwd+bwd together
            model.forward(ids, targets)
            model.backward()

        def step():
            opt.zero_grad()
            model.forward(ids, targets)
            model.backward()
            clip()
            opt.step()
        return {"forward": fwd, "forward+backward": bwd, "train_step": step}

    sides = {
        "manual": phases(m, mo, lambda: manual.optim.clip_grad_norm_(m.grads, 1.0)),
        "reference": phases(r, ro, lambda: ropt.clip_grad_norm(r, 1.0)),
    }
    if args.profile:
        import cProfile
        import pstats
        run = sides["manual"][args.profile]
        for _ in range(args.warmup):
            run()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.repeats):
            run()
        prof.disable()
        print(f"manual, {args.profile}, preset {args.preset}, dtype {args.dtype}, B={B} T={T}, "
              f"{args.repeats} runs (cProfile; times include its overhead)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return 0

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times = {side: {ph: [] for ph in sides[side]} for side in sides}
    for ph in ("forward", "forward+backward", "train_step"):
        for side in sides:
            for _ in range(args.warmup):
                sides[side][ph]()
        for _ in range(args.repeats):
            for side in sides:  # alternate so noise hits both alike
                t0 = clock()
                sides[side][ph]()
                times[side][ph].append(clock() - t0)

    result = {"preset": args.preset, "dtype": args.dtype, "batch_size": B, "seq_len": T,
              "threads": args.threads, "repeats": args.repeats, "clock": args.clock, "phases": {}}
    print(f"preset {args.preset}  dtype {args.dtype}  B={B} T={T}  threads={args.threads}  "
          f"repeats={args.repeats} (medians, {args.clock} clock)")
    print(f"{'phase':<18} {'manual ms':>10} {'reference ms':>13} {'ratio m/r':>10}")
    for ph in ("forward", "forward+backward", "train_step"):
        mm = statistics.median(times["manual"][ph]) * 1e3
        rr = statistics.median(times["reference"][ph]) * 1e3
        result["phases"][ph] = {"manual_ms": mm, "reference_ms": rr, "ratio": mm / rr}
        print(f"{ph:<18} {mm:10.3f} {rr:13.3f} {mm / rr:10.2f}")
    tokens = B * T
    step_ms = result["phases"]["train_step"]
    print(f"tokens/s in training: manual {tokens / step_ms['manual_ms'] * 1e3:,.0f}, "
          f"reference {tokens / step_ms['reference_ms'] * 1e3:,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
