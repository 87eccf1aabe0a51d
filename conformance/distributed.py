"""The distributed check: N gloo ranks on localhost equal one process, for both implementations.

    python -m conformance --distributed 2          # or: run_distributed(world=2) -> [Comparison, ...]

It spawns N processes (torch.multiprocessing, start method "spawn"; the rendezvous is a TCPStore
this process hosts on a port the OS picks, so two checks never collide). Each rank builds its
model from its OWN seed (rank r uses seed r), so only the broadcast from rank 0 makes them agree,
runs the glue of parallel/dp.py and writes what it saw to a safetensors file; this process
recomputes everything in ONE process on the concatenated global batch (the oracle) and compares,
in float64, within the suite's 1e-9 of each tensor's scale (conformance/compare.py). The only
legitimate difference is the order of the sums inside the all-reduce and the loss weighting.

Scenarios (SCENARIOS), each for the manual side (ManualDP: one all-reduce over the flat gradient
buffer) and the reference side (DistributedDataParallel):

    uneven_pad       K = 1; the last rank's shard is all PAD but one target
    pad_only_shard   K = 1; rank 1's shard is entirely PAD
    accum3           K = 3 micro-steps, PAD uneven across ranks and micro-steps (one micro-shard all PAD)
    adamw20          20 AdamW steps (clip 1.0, decay groups), K = 1, a new unevenly padded batch each step
    zero20           adamw20 with ZeRO-1 (parallel/zero.py, manual side): the sharded optimizer equals the
                     unsharded one (parameters after every step, the gathered state at the end)

Rows, in the order a bug shows up first (so the first failing row localises it):
    init.param.<name>         every rank's weights after the broadcast            vs rank 0's seed
    micro<k>.grad.<name>      sum over ranks of the weighted local gradients after micro-step k < K
                              (a check-only all-reduce)            vs the oracle's first k micro-batches
    loss, grad.<name>         every rank's global loss, and gradient after the all-reduce   vs one process
    step<s>.grad / .param     the trajectory, every rank, step s = 1..20          vs one process
    final.optim.<key>.<name>  the AdamW state after 20 steps
and then manual-DP against reference-DDP (rank 0, every recorded tensor).

The faults of parallel/dp.py (FAULTS) are injected with fault=...; tests/test_distributed.py
proves each is caught and localised.
"""
from __future__ import annotations

import datetime
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from manual.config import ModelConfig

from .compare import Comparison, compare

IMPLS = ("manual", "reference")
CHECK = "distributed"
STEPS = 20
LR, WEIGHT_DECAY, CLIP = 1e-2, 0.1, 1.0
ROWS_PER_SHARD = 2
TIMEOUT_S = 60.0          # a rank that waits longer than this in a collective raises instead of hanging


def config() -> ModelConfig:
    """A small float64 model: the check is about the glue, not the size (every layer kind is in it)."""
    return ModelConfig.preset("tiny", vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=8,
                              dtype="float64")


@dataclass(frozen=True)
class Scenario:
    name: str
    accum: int
    steps: int            # 0: one gradient step without an optimizer; > 0: an AdamW trajectory
    shard: bool = False   # ZeRO-1 (parallel/zero.py, manual side only): parameters and state compared

    def batches(self, cfg: ModelConfig, world: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The global batches (same on every rank: a pure function of the scenario and the world size)."""
        rng = np.random.default_rng(1234 + world)
        b, K, T, pad = ROWS_PER_SHARD, self.accum, cfg.max_seq_len, cfg.pad_id
        B = b * world * K
        out = []
        for _ in range(max(1, self.steps)):
            x = rng.integers(0, cfg.vocab_size, size=(B, T))                               # (B, T)
            y = rng.integers(1, cfg.vocab_size, size=(B, T))                               # (B, T) no PAD yet
            y[rng.random((B, T)) < 0.2] = pad                                              # some PAD everywhere

            def rows(k, r):
                return slice((k * world + r) * b, (k * world + r + 1) * b)

            last = rows(0, world - 1)
            y[last] = pad
            y[last.start, 0] = 1 + int(rng.integers(0, cfg.vocab_size - 1))                 # one target left
            if self.name == "pad_only_shard":
                y[rows(0, 1)] = pad
            if K > 1:
                y[rows(1, 0)] = pad                                                        # a micro-shard all PAD
            out.append((x.astype(np.int64), y.astype(np.int64)))
        return out


SCENARIOS = (Scenario("uneven_pad", 1, 0), Scenario("pad_only_shard", 1, 0), Scenario("accum3", 3, 0),
             Scenario("adamw20", 1, STEPS), Scenario("zero20", 1, STEPS, shard=True))


def _runs(impl: str, sc: Scenario) -> bool:
    return impl == "manual" or not sc.shard


# ----------------------------------------------------------------------------------------------
# both sides' models and optimizers, the same in the oracle and on the ranks

def _model(impl: str, cfg: ModelConfig, seed: int):
    if impl == "manual":
        import manual
        return manual.Model(cfg, seed=seed)
    import reference
    return reference.Model(cfg, seed=seed)


def _optimizer(impl: str, model):
    """AdamW with the registry's decay groups and a clip function (the trainer's setup)."""
    if impl == "manual":
        from manual.optim import AdamW, clip_grad_norm_
        from manual.registry import decay_groups
        opt = AdamW(model.params, model.grads, lr=LR, groups=decay_groups(model.cfg, WEIGHT_DECAY))
        return opt, lambda: clip_grad_norm_(model.grads, CLIP)
    from reference.training import TorchOptimizer, clip_functions
    opt = TorchOptimizer(model, "adamw", lr=LR, weight_decay=WEIGHT_DECAY)
    clip = clip_functions(model)[0]
    return opt, lambda: clip(CLIP)


def _copy(d: dict, prefix: str) -> dict[str, np.ndarray]:
    return {prefix + n: np.array(v, dtype=np.float64, copy=True) for n, v in d.items()}


# ----------------------------------------------------------------------------------------------
# the ranks

def _worker(rank: int, world: int, port: int, outdir: str, plan: tuple, impls: tuple):
    import torch
    import torch.distributed as dist

    from parallel import dp
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ctx = dp.init(rank, world, store=store, timeout_s=TIMEOUT_S)
    cfg = config()
    try:
        for fault, scenarios in plan:
            _rank_runs(rank, world, ctx, cfg, outdir, fault, impls, scenarios)
    finally:
        dp.shutdown()


def _rank_runs(rank, world, ctx, cfg, outdir, fault, impls, scenarios):
    """One rank's runs of every (impl, scenario) with `fault` injected (None: the correct glue)."""
    import torch
    import torch.distributed as dist
    from safetensors.numpy import save_file

    from parallel import dp
    for impl in impls:
        for sc in (sc for sc in scenarios if _runs(impl, sc)):
            rec: dict[str, np.ndarray] = {}
            model = _model(impl, cfg, seed=rank)          # differs per rank: the broadcast must fix it
            zero = _zero(model, ctx) if sc.shard else None
            glue = dp.make(impl, model, ctx, accum=sc.accum, fault=fault, zero=zero)
            glue.broadcast_params()
            rec.update(_copy(model.params, "init.param."))

            def observe(k, local, rec=rec):
                names = list(local)
                flat = torch.from_numpy(np.concatenate([np.ravel(local[n]) for n in names]))
                dist.all_reduce(flat)                     # check only: the sum of the ranks' contributions
                off = 0
                for n in names:
                    size = local[n].size
                    rec[f"micro{k + 1}.grad.{n}"] = flat[off:off + size].numpy().reshape(local[n].shape).copy()
                    off += size

            batches = sc.batches(cfg, world)
            if sc.steps == 0:
                xb, yb = batches[0]
                loss = glue.step(xb, yb, observe)
                rec.update(_copy(model.grads, "grad."))
                rec["loss"] = np.array(loss, dtype=np.float64)
            else:
                opt, clip = _optimizer(impl, model) if zero is None else (zero, lambda: zero.clip_grad_norm(CLIP))
                for s, (xb, yb) in enumerate(batches, start=1):
                    opt.zero_grad()
                    glue.step(xb, yb)
                    rec.update(_copy(model.grads, f"step{s}.grad."))
                    clip()
                    opt.step()
                    rec.update(_copy(model.params, f"step{s}.param."))
                rec.update(_copy(opt.state_dict()[0], "final."))
            save_file(rec, _path(outdir, fault, impl, sc, rank))


def _zero(model, ctx):
    from manual.registry import decay_groups
    from parallel.zero import ZeroAdamW
    return ZeroAdamW(model, ctx, lr=LR, groups=decay_groups(model.cfg, WEIGHT_DECAY))


def _path(outdir, fault, impl, sc, rank) -> str:
    return os.path.join(outdir, f"{fault or 'clean'}.{impl}.{sc.name}.rank{rank}.safetensors")


# ----------------------------------------------------------------------------------------------
# the single process (the oracle)

def _oracle(impl: str, cfg: ModelConfig, sc: Scenario, world: int) -> dict[str, np.ndarray]:
    rec: dict[str, np.ndarray] = {}
    model = _model(impl, cfg, seed=0)
    rec.update(_copy(model.params, "init.param."))
    batches = sc.batches(cfg, world)
    if sc.steps == 0:
        xb, yb = batches[0]
        N = int(np.count_nonzero(yb != cfg.pad_id))
        chunk = len(xb) // sc.accum                      # micro-step k of every rank: one contiguous chunk
        acc = None
        for k in range(sc.accum - 1):
            x, y = xb[k * chunk:(k + 1) * chunk], yb[k * chunk:(k + 1) * chunk]
            n = int(np.count_nonzero(y != cfg.pad_id))
            model.zero_grad()
            if n:
                model.forward(x, y)
                model.backward()
            part = {name: g * (n / N) for name, g in model.grads.items()}
            acc = part if acc is None else {name: acc[name] + part[name] for name in part}
            rec.update(_copy(acc, f"micro{k + 1}.grad."))
        model.zero_grad()
        rec["loss"] = np.array(model.forward(xb, yb), dtype=np.float64)
        model.backward()
        rec.update(_copy(model.grads, "grad."))
    else:
        opt, clip = _optimizer(impl, model)
        for s, (xb, yb) in enumerate(batches, start=1):
            opt.zero_grad()
            model.forward(xb, yb)
            model.backward()
            rec.update(_copy(model.grads, f"step{s}.grad."))
            clip()
            opt.step()
            rec.update(_copy(model.params, f"step{s}.param."))
        rec.update(_copy(opt.state_dict()[0], "final."))
    return rec


# ----------------------------------------------------------------------------------------------
# the check

def _order(key: str) -> tuple:
    """init, micro-steps, gradient, loss, then the trajectory step by step, then the final state."""
    head = key.split(".", 1)[0]
    # (a stable sort: within one group, tensors stay in the registry's order)
    if head == "init":
        return (0, 0)
    if head.startswith("micro"):
        return (1, int(head[5:]))
    if head == "loss":                  # the forward first: wrong data shows in the loss before the gradients
        return (2, 0)
    if head == "grad":
        return (2, 1)
    if head.startswith("step"):
        return (3, int(head[4:]), 0 if ".grad." in key else 1)
    return (4, 0)


def _step_of(key: str) -> int | None:
    head = key.split(".", 1)[0]
    for prefix in ("micro", "step"):
        if head.startswith(prefix):
            return int(head[len(prefix):])
    return None


def spawn(world: int, outdir: str, plan: tuple, impls=IMPLS) -> None:
    """Run the ranks over `plan` ((fault, scenarios), ...); RuntimeError with one line if a rank fails."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)   # the OS picks the port
    try:
        mp.start_processes(_worker, args=(world, store.port, outdir, plan, tuple(impls)),
                           nprocs=world, join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise RuntimeError(f"a rank failed: {lines[0]} ... {lines[-1]}") from None
    except mp.ProcessExitedException as exc:
        raise RuntimeError(f"a rank died: {exc}") from None
    finally:
        del store


def run_distributed(world: int = 2, fault: str | None = None, impls=IMPLS, scenarios=SCENARIOS) -> list[Comparison]:
    """Spawn `world` gloo ranks, run every scenario on each implementation, and compare against one
    process (and manual-DP against reference-DDP). Returns the Comparison rows, in localisation order."""
    return run_plan(world, ((fault, tuple(scenarios)),), impls)[fault]


def run_plan(world: int, plan, impls=IMPLS) -> dict:
    """Several runs in ONE spawn of the ranks (the processes' start-up is most of the time):
    plan = ((fault or None, scenarios), ...) -> {fault: rows}."""
    from safetensors.numpy import load_file
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ValueError(f"--distributed needs a world size >= 2 (the pad_only_shard scenario needs rank 1), "
                         f"got {world!r}")
    plan = tuple((fault, tuple(scs)) for fault, scs in plan)
    for fault, _ in plan:
        if fault is not None and fault not in _faults():
            raise ValueError(f"unknown distributed fault {fault!r}; choose one of {sorted(_faults())}")
    cfg = config()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="conformance-dist-") as outdir:
        try:
            spawn(world, outdir, plan, impls)
        except RuntimeError as exc:
            return {fault: [Comparison(config=f"dist{world}", check=CHECK, tensor="run", passed=False,
                                       max_abs=math.inf, max_rel=math.inf, note=str(exc))] for fault, _ in plan}
        for fault, scenarios in plan:
            got = {(impl, sc.name, r): load_file(_path(outdir, fault, impl, sc, r))
                   for impl in impls for sc in scenarios if _runs(impl, sc) for r in range(world)}
            out[fault] = _rows(cfg, world, fault, impls, scenarios, got)
    return out


def _faults() -> dict:
    from parallel.dp import FAULTS
    return FAULTS


def _rows(cfg, world, fault, impls, scenarios, got) -> list[Comparison]:
    rows: list[Comparison] = []
    for sc in scenarios:
        for impl in (impl for impl in impls if _runs(impl, sc)):
            want = _oracle(impl, cfg, sc, world)
            label = f"dist{world}/{impl}/{sc.name}" + (f"/fault={fault}" if fault else "")
            for key in sorted(want, key=_order):
                if sc.shard and ".grad." in key:     # ZeRO-1 reduces each rank's slice only: no full gradient
                    continue
                for r in range(world):
                    if key.startswith("micro") and r > 0:     # the check-only sum is the same on every rank
                        continue
                    a = got[(impl, sc.name, r)].get(key)
                    row = compare(a if a is not None else np.full((0,), np.nan), want[key], tensor=key,
                                  check=CHECK, config=label, step=_step_of(key), expect_dtype=np.float64,
                                  note=f"rank {r}")
                    row.extra["rank"] = r
                    rows.append(row)
        if len(impls) == 2 and not sc.shard:
            m, ref = got[("manual", sc.name, 0)], got[("reference", sc.name, 0)]
            for key in sorted(ref, key=_order):
                row = compare(m.get(key, np.full((0,), np.nan)), ref[key], tensor=key, check=CHECK,
                              config=f"dist{world}/manual-vs-ddp/{sc.name}" + (f"/fault={fault}" if fault else ""),
                              step=_step_of(key), expect_dtype=np.float64, note="rank 0")
                row.extra["rank"] = 0
                rows.append(row)
    return rows


def first_divergence(rows: list[Comparison]) -> Comparison | None:
    """The first failing row: the tensor, the scenario and the step or micro-step where a bug shows first."""
    return next((c for c in rows if not c.passed), None)


def summary(rows: list[Comparison]) -> str:
    """One line: rows, failures, and the measured agreement (the largest max_rel of the passing rows)."""
    ok = [c for c in rows if c.passed]
    worst = max((c.max_rel for c in ok), default=0.0)
    bad = first_divergence(rows)
    text = f"distributed: {len(rows)} comparisons, {len(rows) - len(ok)} failing; largest max_rel {worst:.2e}"
    if bad is not None:
        where = f" {bad.tensor}" + (f" (step/micro-step {bad.step})" if bad.step is not None else "")
        text += f"; first divergence: {bad.config}{where} on {bad.note}"
    return text
