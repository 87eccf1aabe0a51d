"""Benchmark one training step, phase by phase: manual (NumPy) against PyTorch, in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/bench.py --preset medium --threads 1 \\
        --json /tmp/bench.json --plot /tmp/bench.png
    python tools/bench.py --preset tiny --sides manual,plain          # a subset of the sides
    python tools/bench.py --preset medium --profile step              # cProfile of the manual step

Sides (all on the same weights, batch and AdamW hyperparameters, decay groups, clip 1.0):
    manual      manual.Model(workspace=True) + manual.optim.AdamW + clip_grad_norm_ (NumPy, hand-written backward)
    reference   reference.Model: our PyTorch oracle, with its taps, retain_grad and NumPy copies
    plain       reference/plain.py: the same GPT as a PyTorch user writes it (nn.Linear, F.layer_norm,
                F.scaled_dot_product_attention, torch.optim.AdamW with torch's defaults), no
                instrumentation. tests/test_bench.py checks it computes the reference's function.
    compiled    torch.compile(plain model); reported where it works on this machine, never a target
                (skipped, with the reason, where it does not).

Phases of one step: forward (with loss), backward, optimizer (clip + AdamW step) and step (the
whole of zero_grad + forward + backward + optimizer). Steps run interleaved, one per side in
turn, so that machine noise hits every side alike; each phase gets the median, min and max over
--repeats (>= 20) steps. The JSON holds the ratios manual/plain and manual/reference per phase.

Throughput: tokens/s = B*T / median step. FLOPs per token = 6N + 12*L*T*C (nanoGPT's convention,
from its estimate_mfu: 6N for the forward + backward of the weight matmuls, 12*L*T*C for the
attention scores and the weighted sum, causal masking not subtracted), with N = the parameters
except the position table wpe (the tied wte counts once, as the output projection). Achieved
GFLOP/s = FLOPs per step / median step time. Utilisation = achieved / the best matmul rate bench
measures itself before the steps (square matmuls, the run's dtype and thread count, NumPy's and
torch's: both are reported; the better one is the denominator).
Peak memory: bytes held before a steady-state step (parameters, gradients, optimizer state), plus
the peak of what the step allocates: tracemalloc for NumPy, torch storages created by operators
(conformance.memory.TorchTensorTracker) for torch. Not measured for compiled (its kernels
allocate outside the dispatcher).

Threads: every side and the matmul peak use --threads (default 1) BLAS / intra-op threads. The
BLAS library, its kernel (architecture) and thread count (threadpoolctl) are printed and saved.
Benchmark without the environment's OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE overrides, as a user's
machine runs (the `env -u` above): with them OpenBLAS may run a slower kernel.
Clock: --clock wall (default) or cpu (this process's CPU time, summed over its threads: robust on a
busy machine at --threads 1; the matmul peak is timed with the same clock).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tools._args import int_at_least, set_blas_threads
from tools._cli import cli, output_file, write_output

PHASES = ("forward", "backward", "optimizer", "step")
SIDES = ("manual", "reference", "plain", "compiled")
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0
PROFILE_ALIASES = {"train_step": (0, 4), "forward+backward": (1, 3)}   # earlier names: (first, last) phase
FLOP_CONVENTION = ("6N + 12*L*T*C per token (nanoGPT's estimate_mfu): N = parameters except the position "
                   "table wpe (tied wte counted once), L layers, T sequence length, C d_model")


def flops_per_token(cfg, T: int) -> int:
    """6N + 12*L*T*C (see FLOP_CONVENTION)."""
    from manual.registry import param_count
    n = param_count(cfg) - cfg.max_seq_len * cfg.d_model           # without wpe
    return 6 * n + 12 * cfg.n_layers * T * cfg.d_model


# -- the sides: each is four callables, one per phase of a training step -----------------------

class Side:
    """zero_grad / forward / backward / optimizer of one implementation, and its resident state."""

    def __init__(self, name, zero_grad, forward, backward, optimizer, state=None):
        self.name, self.zero_grad, self.forward, self.backward, self.optimizer = \
            name, zero_grad, forward, backward, optimizer
        self.state = state      # callable -> (resident bytes, [torch tensors to exclude]) or None: not measured

    def step(self):
        self.zero_grad()
        self.forward()
        self.backward()
        self.optimizer()


def make_sides(cfg, ids, targets, names) -> tuple[dict, dict]:
    """{name: Side} for the requested sides, and {name: reason} for those that could not run."""
    import numpy as np
    import torch

    import manual
    import manual.optim
    import reference
    from conformance import memory as cmem
    from manual.registry import decay_groups, init_params
    from reference import optim as ropt
    from reference.plain import PlainGPT, make_optimizer

    params = init_params(cfg, seed=0)
    sides, skipped = {}, {}
    if "manual" in names:
        # workspace=True: every layer reuses preallocated arrays across steps (manual/layers/workspace.py);
        # bit-identical to the plain path, and what a user training with manual/ would switch on
        m = manual.Model.from_params(cfg, params, workspace=True)
        mo = manual.optim.AdamW(m.params, m.grads, lr=LR, groups=decay_groups(cfg, WEIGHT_DECAY))

        def m_opt():
            manual.optim.clip_grad_norm_(m.grads, CLIP)
            mo.step()
        sides["manual"] = Side("manual", mo.zero_grad, lambda: m.forward(ids, targets), m.backward, m_opt,
                               state=lambda: (sum(cmem.manual_bytes(m, mo).values())
                                              + (m.workspace.nbytes() if m.workspace is not None else 0), []))
    if "reference" in names:
        r = reference.Model.from_params(cfg, params)
        ro = ropt.make_optimizer(r, kind="adamw", lr=LR, weight_decay=WEIGHT_DECAY)

        def r_opt():
            ropt.clip_grad_norm(r, CLIP)
            ro.step()
        sides["reference"] = Side("reference", r.zero_grad, lambda: r.forward(ids, targets), r.backward, r_opt,
                                  state=lambda: _torch_state(r.module, ro))
    tids, ttargets = torch.from_numpy(np.asarray(ids)), torch.from_numpy(np.asarray(targets))
    for name in ("plain", "compiled"):
        if name not in names:
            continue
        model = PlainGPT.from_params(cfg, params)
        opt = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)
        run = model
        if name == "compiled":
            try:
                run = torch.compile(model)
                run(tids, ttargets).backward()            # compile now, so a failure is reported here
                opt.zero_grad()
            except Exception as exc:                       # any failure of the compiler stack: report, go on
                skipped[name] = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
        sides[name] = _torch_side(name, model, run, opt, tids, ttargets, measure_memory=name == "plain")
    return sides, skipped


def _torch_side(name, model, run, opt, ids, targets, measure_memory: bool) -> Side:
    import torch

    box = {}

    def forward():
        box["loss"] = run(ids, targets)

    def backward():
        box.pop("loss").backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return Side(name, opt.zero_grad, forward, backward, optimizer,
                state=(lambda: _torch_state(model, opt)) if measure_memory else None)


def _torch_state(module, opt):
    """(bytes of parameters + existing gradients + optimizer state, those tensors)."""
    import torch
    tensors = {t.untyped_storage().data_ptr(): t for p in module.parameters()
               for t in (p, p.grad) if t is not None}
    tensors.update({v.untyped_storage().data_ptr(): v for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0})
    return sum(t.untyped_storage().nbytes() for t in tensors.values()), list(tensors.values())


def peak_memory(side: Side) -> int | None:
    """Resident state before a steady-state step + the peak of what the step allocates (see docstring)."""
    import gc
    import tracemalloc

    if side.state is None:
        return None
    gc.collect()
    resident, existing = side.state()
    if side.name == "manual":
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            side.step()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return resident + peak - base
    from conformance.memory import TorchTensorTracker
    with TorchTensorTracker(exclude=existing) as tracker:
        side.step()
    return resident + tracker.peak


# -- the machine: matmul peak, BLAS -------------------------------------------------------------

def matmul_peak(dtype: str, clock=time.perf_counter, n: int = 1024, runs: int = 10) -> dict:
    """Best GFLOP/s of an (n, n) @ (n, n) matmul in NumPy and in torch, this dtype and thread count,
    timed with the steps' clock."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    out = np.empty((n, n), dtype=dtype)
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out.copy())

    def best(fn):
        fn()
        times = []
        for _ in range(runs):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return 2 * n ** 3 / min(times) / 1e9
    res = {"numpy": best(lambda: np.matmul(a, b, out=out)), "torch": best(lambda: torch.mm(ta, tb, out=tout))}
    res["best"] = max(res["numpy"], res["torch"])
    res["matmul"] = f"({n}, {n}) @ ({n}, {n}) {dtype}, best of {runs}"
    return res


def blas_info() -> list[dict]:
    """threadpoolctl's view of the loaded BLAS / OpenMP libraries (library, version, kernel, threads)."""
    from threadpoolctl import threadpool_info
    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "threading_layer", "num_threads")
    return [{k: lib.get(k) for k in keys if k in lib} for lib in threadpool_info()]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "env": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}


# -- timing ------------------------------------------------------------------------------------------

def time_steps(sides: dict, repeats: int, warmup: int, clock) -> dict:
    """{side: {phase: [seconds, ...]}}: `repeats` steps per side, interleaved (side after side)."""
    for side in sides.values():
        for _ in range(warmup):
            side.step()
    times = {name: {ph: [] for ph in PHASES} for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            t = [clock()]
            for call in (side.zero_grad, side.forward, side.backward, side.optimizer):
                call()
                t.append(clock())
            rec = times[name]
            rec["forward"].append(t[2] - t[1])
            rec["backward"].append(t[3] - t[2])
            rec["optimizer"].append(t[4] - t[3])
            rec["step"].append(t[4] - t[0])
    return times


def summarise(times: dict, tokens: int, flops_step: float, peak: float) -> dict:
    out = {}
    for name, rec in times.items():
        phases = {ph: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3,
                       "times_ms": [x * 1e3 for x in v]} for ph, v in rec.items()}
        step_s = phases["step"]["median_ms"] / 1e3
        gflops = flops_step / step_s / 1e9
        out[name] = {"phases": phases, "tokens_per_s": tokens / step_s, "gflops": gflops,
                     "utilisation": gflops / peak}
    return out


def ratios(sides: dict) -> dict:
    out = {}
    for other in ("plain", "reference", "compiled"):
        if "manual" in sides and other in sides:
            out[f"manual/{other}"] = {ph: sides["manual"]["phases"][ph]["median_ms"] /
                                      sides[other]["phases"][ph]["median_ms"] for ph in PHASES}
    return out


def print_report(res: dict) -> None:
    pk = res["peak_gflops"]
    print(f"preset {res['preset']}  dtype {res['dtype']}  B={res['batch_size']} T={res['seq_len']}  "
          f"threads={res['threads']}  {res['repeats']} interleaved steps per side ({res['clock']} clock)")
    print(f"machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; "
          f"OPENBLAS_CORETYPE={res['machine']['env']['OPENBLAS_CORETYPE']}")
    for lib in res["blas"]:
        print(f"  {lib.get('internal_api')} {lib.get('version')} kernel {lib.get('architecture', '-')} "
              f"threads {lib.get('num_threads')} ({lib.get('prefix')})")
    print(f"matmul peak {pk['matmul']}: NumPy {pk['numpy']:.1f} GFLOP/s, torch {pk['torch']:.1f} GFLOP/s")
    print(f"FLOPs: {FLOP_CONVENTION}; {res['flops_per_token']:,} per token")
    print(f"\n{'side':<10} " + " ".join(f"{ph + ' ms (min-max)':>24}" for ph in PHASES)
          + f" {'tokens/s':>9} {'GFLOP/s':>8} {'util':>5} {'peak MiB':>9}")
    for name, s in res["sides"].items():
        cells = " ".join(f"{p['median_ms']:9.2f} ({p['min_ms']:.1f}-{p['max_ms']:.1f})".rjust(24)
                         for p in s["phases"].values())
        mem = s["peak_memory_bytes"]
        print(f"{name:<10} {cells} {s['tokens_per_s']:9,.0f} {s['gflops']:8.2f} {s['utilisation']:5.2f} "
              f"{'-' if mem is None else f'{mem / 2**20:.1f}':>9}")
    for name, reason in res["skipped"].items():
        print(f"{name:<10} skipped: {reason}")
    print()
    for key, r in res["ratios"].items():
        print(f"ratio {key:<18} " + "  ".join(f"{ph} {v:.2f}" for ph, v in r.items()))


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["sides"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ph = res["sides"][name]["phases"]
        med = [ph[p]["median_ms"] for p in PHASES]
        err = [[m - ph[p]["min_ms"] for p, m in zip(PHASES, med)], [ph[p]["max_ms"] - m for p, m in zip(PHASES, med)]]
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(PHASES))], med, width, yerr=err,
               capsize=2, label=name)
    ax.set_xticks(range(len(PHASES)), PHASES)
    ax.set_xlabel("phase of one training step")
    ax.set_ylabel("time per step (ms): median, bars min-max")
    ax.set_title(f"{res['preset']} {res['dtype']}, B={res['batch_size']} T={res['seq_len']}, "
                 f"{res['threads']} thread(s)")
    ax.legend(title="side")
    ax2.bar(names, [res["sides"][n]["gflops"] for n in names], color=[f"C{i}" for i in range(len(names))])
    pk = res["peak_gflops"]
    ax2.axhline(pk["numpy"], color="k", ls="--", lw=1, label=f"NumPy matmul {pk['numpy']:.0f}")
    ax2.axhline(pk["torch"], color="grey", ls=":", lw=1, label=f"torch matmul {pk['torch']:.0f}")
    ax2.set_ylabel("achieved GFLOP/s (6N + 12LTC per token)")
    ax2.set_xlabel("side")
    ax2.set_title("throughput vs measured matmul peak")
    ax2.legend(fontsize=8, loc="upper right")
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the command ----------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny, medium or gpt2-small")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="default: the preset's batch size")
    p.add_argument("--seq-len", type=int_at_least(1), default=None, help="default: the preset's max_seq_len")
    p.add_argument("--repeats", type=int_at_least(20, " (the median, min and max need at least 20 steps)"),
                   default=20, help="timed steps per side (>= 20)")
    p.add_argument("--warmup", type=int_at_least(0), default=3)
    p.add_argument("--threads", type=int_at_least(1), default=1)
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: this process's CPU time (robust on a busy machine)")
    p.add_argument("--profile", choices=[*PHASES, *PROFILE_ALIASES],
                   help="cProfile the manual side of this phase and print the top functions "
                        "(train_step = step; forward+backward profiles both)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG")
    return p, p.parse_args(argv)


@cli("bench.py")
def main(argv=None) -> int:
    p, args = parse_args(argv)
    output_file(args.json, "--json")            # checked before any work (tools/_cli.py): one line, exit 2
    output_file(args.plot, "--plot")
    set_blas_threads(args.threads)              # before NumPy and torch load (they read it once)
    from manual.config import PRESETS
    if args.preset not in PRESETS:
        print(f"bench: unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}", file=sys.stderr)
        return 2
    names = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in names if s not in SIDES]
    if bad or not names:
        p.error(f"--sides {args.sides!r}: unknown {bad}; choose from {', '.join(SIDES)}")
    if args.profile:
        names = ["manual"]
    import torch

    torch.set_num_threads(args.threads)
    from conformance.engine import make_batch
    from manual.config import ModelConfig

    cfg = ModelConfig.preset(args.preset, dtype=args.dtype)
    B = args.batch_size if args.batch_size is not None else PRESETS[args.preset].train.get("batch_size", 4)
    T = args.seq_len if args.seq_len is not None else cfg.max_seq_len
    if T > cfg.max_seq_len:
        p.error(f"--seq-len {T} is outside [1, {cfg.max_seq_len}] for preset {args.preset}")
    ids, targets = make_batch(cfg, B, T, seed=0)
    sides, skipped = make_sides(cfg, ids, targets, names)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.profile:
        return profile(sides["manual"], args, B, T, clock)

    peak = matmul_peak(args.dtype, clock)
    times = time_steps(sides, args.repeats, args.warmup, clock)
    fpt = flops_per_token(cfg, T)
    res = {"preset": args.preset, "dtype": args.dtype, "batch_size": B, "seq_len": T, "threads": args.threads,
           "repeats": args.repeats, "warmup": args.warmup, "clock": args.clock, "machine": machine(),
           "blas": blas_info(), "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
           "flop_convention": FLOP_CONVENTION, "flops_per_token": fpt, "flops_per_step": fpt * B * T,
           "peak_gflops": peak, "sides": summarise(times, B * T, fpt * B * T, peak["best"]), "skipped": skipped}
    for name, side in sides.items():
        res["sides"][name]["peak_memory_bytes"] = peak_memory(side)
    res["ratios"] = ratios(res["sides"])
    print_report(res)
    if args.json:
        write_output(args.json, json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


def profile(side: Side, args, B: int, T: int, clock) -> int:
    """cProfile the manual side's phase: the functions by own time, then manual/ functions by total time."""
    import cProfile
    import pstats

    phases = [side.zero_grad, side.forward, side.backward, side.optimizer]
    first, last = PROFILE_ALIASES.get(args.profile) or \
        {"step": (0, 4), "forward": (1, 2), "backward": (2, 3), "optimizer": (3, 4)}[args.profile]
    for _ in range(args.warmup):
        side.step()
    prof = cProfile.Profile(clock)
    for _ in range(args.repeats):
        for call in phases[:first]:                 # the phases before the profiled one, not profiled
            call()
        prof.enable()
        for call in phases[first:last]:
            call()
        prof.disable()
        for call in phases[last:]:
            call()
    print(f"manual, {args.profile}, preset {args.preset}, dtype {args.dtype}, B={B} T={T}, "
          f"{args.repeats} runs (cProfile, {args.clock} clock; times include its overhead)")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats("manual", 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
