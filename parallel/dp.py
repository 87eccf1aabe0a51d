"""Data-parallel training of both implementations on torch.distributed (gloo on the CPU).

We write no communication of our own: every collective is torch.distributed's. manual/ stays
NumPy-only; this package is where torch meets it.

    from parallel import dp
    ctx = dp.init()                                       # torchrun's env vars (or rank/world given)
    glue = dp.ManualDP(model, ctx, accum=K)               # or dp.ReferenceDP(reference_model, ctx, accum=K)
    glue.broadcast_params()                               # every rank starts from rank 0's weights
    loss = glue.step(xb, yb)                              # xb, yb: the GLOBAL batch (B, T), same on every rank
    clip, optimizer.step()                                # model.grads now hold the global gradient

One step, on every rank r of W, with K micro-steps (parallel/sampler.py cuts the global batch):

    n[k]   = non-PAD targets of this rank's shard at micro-step k
    N      = all_reduce(sum_k n[k])                       the GLOBAL count, before any backward
    for k: grads_k = d(mean loss over this shard's n[k] targets) / d params       (0 when n[k] == 0)
           local  += w[k] * grads_k,   w[k] = W * n[k] / N
    grads  = all_reduce(local) / W                        ONE all-reduce, over the flat buffer

WHY w[k] = W * n[k] / N IS THE ONLY CORRECT NORMALISATION. One process on the whole batch
computes L = (1/N) * sum of the N per-target losses, so dL/dθ = (1/N) * sum_i dl_i/dθ. A shard's
mean-loss gradient is (1/n[k]) * sum over its targets; to turn the shards' gradients into the
global one, each must be multiplied by n[k]/N and the products SUMMED over every rank and
micro-step. n[k]/N is the only factor that does this for every PAD layout: any weight that does
not know N (the per-rank mean, w = 1; a per-micro-step mean, N_k instead of N) is right only
when every shard holds the same number of targets, and wrong by the ratio of the counts
otherwise (a rank with 1 target would count as much as a rank with 1000). The factor W
compensates the reduction being a MEAN over ranks (all_reduce / W), which is what
DistributedDataParallel does and cannot be told not to do; so both sides use the same weight.
A rank whose shard is all PAD has n = 0: it adds nothing, yet still joins the all-reduce.

Gradient accumulation: the K micro-steps accumulate locally with no communication; the one
all-reduce happens after the last micro-step (reference: DDP's no_sync() for micro-steps
0..K-2, sync on K-1). The reported loss is the global mean, sum(loss_k * n[k]) / N over ranks.

Faults (FAULTS below) are the shipped bugs of data-parallel glue; `fault=` injects one, so that
conformance/distributed.py can prove it catches and localises each. Never set in training.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .sampler import shards

# name -> what the buggy glue does (each injectable on both sides, see ManualDP / ReferenceDP)
FAULTS = {
    "sum_over_ranks": "the gradients are summed over ranks where the mean was needed (no / W)",
    "per_rank_mean": "each rank normalises by its OWN count of non-PAD targets (w = n[k] / sum_k n[k]), "
                     "wrong as soon as PAD is spread unevenly",
    "accum_no_scale": "each micro-step is normalised by its own global count (the 1/K of accumulation "
                      "is missing): the gradient is ~K times too large",
    "skip_last_sync": "the all-reduce is skipped on the last micro-step too: every rank keeps its own gradient",
    "no_broadcast": "ranks start from their own initial weights (no broadcast from rank 0)",
    "overlapping_shards": "the sampler's shards overlap (stride b/2 instead of b): some rows twice, some never",
}

DEFAULT_TIMEOUT_S = 60.0


class DistributedError(ConnectionError):
    """A collective failed or timed out, or the rendezvous failed; the message is one line naming the
    ranks and the step. (A ConnectionError, hence an OSError: tools print it as one line, exit 2.)"""


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    timeout_s: float = DEFAULT_TIMEOUT_S


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun (its RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    variables are set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise ValueError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
                             f"integers (they are set by torchrun)") from None
    return None


def init(rank: int | None = None, world: int | None = None, *, store=None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Join the gloo process group. Without `store`, rendezvous through torchrun's env vars
    (MASTER_ADDR:MASTER_PORT); a collective that waits longer than timeout_s raises instead of hanging."""
    if rank is None or world is None:
        env = torchrun_env()
        if env is None:
            raise ValueError("not launched by torchrun (RANK and WORLD_SIZE are not set); give rank and world")
        rank, world = env
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if store is not None:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "address already in use" in str(exc).lower() or "EADDRINUSE" in str(exc):
            raise DistributedError(f"rank {rank}: the rendezvous port {where} is already in use; pick another "
                                   f"(--rdzv-endpoint HOST:PORT or --master-port)") from None
        raise DistributedError(f"rank {rank}: could not join the process group at {where}: {first}") from None
    return Context(rank, world, timeout_s)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


FAILED_KEY = "parallel/failed/"
SETTLE_S = 2.0     # how long a rank that saw a collective fail waits for the other survivors to say so


def _collective(ctx: Context, what: str, fn):
    """Run a collective; a failure (a dead peer, a timeout) becomes one line naming the rank(s) that
    stopped answering, never a hang: gloo gives up after ctx.timeout_s (a killed peer closes its
    sockets, and the others fail at once)."""
    try:
        return fn()
    except DistributedError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"rank {ctx.rank} of {ctx.world}: {what} failed: {_missing(ctx)} "
                               f"(gloo: {first})") from None


def _missing(ctx: Context) -> str:
    """Which ranks are gone, as the survivors can tell: each survivor marks itself in the rendezvous
    store, waits SETTLE_S, and names the ranks that did not. If the store itself is unreachable, its
    host (rank 0 under torchrun's static rendezvous) is the one that died."""
    if not _store_host_answers():
        return "rank 0 (the rendezvous host) died or stopped answering"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{FAILED_KEY}{ctx.rank}", "1")
        time.sleep(SETTLE_S)
        gone = [r for r in range(ctx.world) if r != ctx.rank and not store.check([f"{FAILED_KEY}{r}"])]
    except Exception:                              # noqa: BLE001 - no store: its host is gone
        return "rank 0 (the rendezvous host) died or stopped answering"
    if not gone:
        return f"every rank reported the failure; no answer within {ctx.timeout_s:g} s"
    return f"rank{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} died or stopped answering"


def global_counts(ctx: Context, n_local: list[int]) -> np.ndarray:
    """all_reduce(SUM) of this rank's per-micro-step counts: the global count of each micro-step (K,)."""
    t = torch.tensor(n_local, dtype=torch.int64)                                   # (K,)
    _collective(ctx, "all-reduce of the non-PAD target counts", lambda: dist.all_reduce(t))
    return t.numpy().copy()


def any_rank(ctx: Context, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (all_reduce MAX): decisions that every
    rank must take at the same step (stop now: Ctrl-C, a time limit) are taken together."""
    t = torch.tensor([int(bool(flag))], dtype=torch.int64)
    _collective(ctx, "all-reduce of the stop flag", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    return bool(t.item())


def weights(world: int, n_local: list[int], n_global: np.ndarray, fault: str | None = None) -> list[float]:
    """w[k] = W * n[k] / N (see the module docstring), or the fault's wrong weight."""
    N = int(n_global.sum())
    if N == 0:
        raise ValueError(f"every target of the global batch is PAD (all {world} ranks): the loss averages over "
                         f"no positions")
    if fault == "per_rank_mean":
        mine = sum(n_local)
        return [n / mine if mine else 0.0 for n in n_local]      # W * n / (W * mine): blind to N
    if fault == "accum_no_scale":
        return [world * n / int(nk) if nk else 0.0 for n, nk in zip(n_local, n_global)]
    return [world * n / N for n in n_local]


def _check_fault(fault):
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown distributed fault {fault!r}; choose one of {sorted(FAULTS)}")


def _store_host_answers() -> bool:
    """Does MASTER_ADDR:MASTER_PORT accept a connection? (Asked before touching the store, whose client
    prints a C++ stack on a dead host.) True when there is no such address to ask."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not port.isdigit():
        return True
    try:
        socket.create_connection((addr, int(port)), timeout=1.0).close()
        return True
    except OSError:
        return False


class _Glue:
    """What both sides share: sharding, counting, weighting, the global loss."""

    def __init__(self, cfg, ctx: Context, accum: int, fault: str | None):
        _check_fault(fault)
        if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
            raise ValueError(f"grad-accum must be an int >= 1, got {accum!r}")
        if cfg.n_future != 1:
            raise ValueError(f"data-parallel training supports n_future = 1 only, got {cfg.n_future}: with several "
                             f"heads each head needs its own global count and its own backward seed, which the "
                             f"models do not expose")
        self.cfg, self.ctx, self.accum, self.fault = cfg, ctx, accum, fault
        self.step_count = 0

    def close(self) -> None:
        """Leave the process group (at the end of a run)."""
        shutdown()

    def _plan(self, xb, yb):
        W, r = self.ctx.world, self.ctx.rank
        micro = shards(np.asarray(xb), np.asarray(yb), W, self.accum, r,
                       self.fault if self.fault == "overlapping_shards" else None)
        n_local = [int(np.count_nonzero(y != self.cfg.pad_id)) for _, y in micro]
        n_global = global_counts(self.ctx, n_local)
        return micro, n_local, n_global, weights(W, n_local, n_global, self.fault)

    def _global_loss(self, loss_sum: float, N: int) -> float:
        t = torch.tensor([loss_sum], dtype=torch.float64)
        _collective(self.ctx, f"all-reduce of the loss at step {self.step_count}", lambda: dist.all_reduce(t))
        return float(t.item()) / N


class ManualDP(_Glue):
    """manual.Model, data-parallel: per-rank forward/backward on the shard, one all-reduce over the
    model's flat gradient buffer (`model.grad_buffer`, shared zero-copy with torch.from_numpy)."""

    def __init__(self, model, ctx: Context, accum: int = 1, fault: str | None = None, zero=None):
        super().__init__(model.cfg, ctx, accum, fault)
        if zero is not None and zero.model is not model:
            raise ValueError("the ZeroAdamW given was built for another model")
        self.zero = zero                                # parallel.zero.ZeroAdamW: reduce-scatter, not all-reduce
        buf = getattr(model, "grad_buffer", None)
        if buf is None or not all(np.shares_memory(g, buf) for g in model.grads.values()):
            raise TypeError("ManualDP needs a manual.Model whose grads are views into one flat grad_buffer")
        self.model = model
        self.flat = torch.from_numpy(buf)               # (P,) the same memory: no copy
        self._acc = np.zeros_like(buf) if accum > 1 else None   # (P,) local sum of the weighted micro-steps

    def broadcast_params(self) -> None:
        """Every rank takes rank 0's parameters (in place, tensor by tensor, once at the start)."""
        if self.fault == "no_broadcast":
            return
        for name, p in self.model.params.items():
            _collective(self.ctx, f"broadcast of {name}", lambda p=p: dist.broadcast(torch.from_numpy(p), src=0))

    def step(self, xb, yb, observe=None) -> float:
        """Forward and backward of this rank's K shards of the global batch (xb, yb), then the one
        all-reduce. Leaves the global gradient in model.grads; returns the global mean loss.
        observe(k, local) (checks only) sees this rank's weighted local sum after micro-step k < K-1,
        in the units of the global gradient (already / W)."""
        model, W = self.model, self.ctx.world
        micro, n_local, n_global, w = self._plan(xb, yb)
        buf = model.grad_buffer
        if self._acc is not None:
            self._acc.fill(0)
        loss_sum = 0.0
        for k, (x, y) in enumerate(micro):
            model.zero_grad()
            if n_local[k]:                              # an all-PAD shard adds nothing (and has no loss)
                loss_sum += float(model.forward(x, y)) * n_local[k]
                model.backward()                        # buf = d(mean loss of this shard) / d params
            if self._acc is not None:
                self._acc += w[k] * buf                 # (P,) local += w[k] * grads_k
            if observe is not None and k < self.accum - 1:
                observe(k, self._named(self._acc / W))
        if self._acc is not None:
            buf[...] = self._acc
        else:
            buf *= w[0]
        if self.zero is not None:                       # ZeRO-1: each rank gets the mean of its slice only
            self.zero.reduce_gradients(self.step_count + 1)
        elif self.fault != "skip_last_sync":
            _collective(self.ctx, f"gradient all-reduce at step {self.step_count + 1}",
                        lambda: dist.all_reduce(self.flat))   # SUM over ranks, in place in NumPy memory
            if self.fault != "sum_over_ranks":
                buf /= W                                # the mean over ranks (see the module docstring)
        self.step_count += 1
        return self._global_loss(loss_sum, int(n_global.sum()))

    def _named(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, off = {}, 0
        for name, g in self.model.grads.items():
            out[name] = flat[off:off + g.size].reshape(g.shape)
            off += g.size
        return out


def _sum_hook(state, bucket):
    """A DDP communication hook that all-reduces WITHOUT dividing by the world size (fault only)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class ReferenceDP(_Glue):
    """reference.Model, data-parallel through torch's DistributedDataParallel on gloo. DDP averages
    over ranks (sum / W); the loss is weighted by w[k] = W * n[k] / N to correct for it (module docstring)."""

    def __init__(self, model, ctx: Context, accum: int = 1, fault: str | None = None):
        super().__init__(model.cfg, ctx, accum, fault)
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.zero = None                                # ZeRO-1 is built for the manual side only
        self.model = model
        # init_sync: DDP broadcasts rank 0's parameters when it is built (the fault turns that off)
        self.ddp = DDP(model.module, init_sync=(fault != "no_broadcast"))
        if fault == "sum_over_ranks":
            self.ddp.register_comm_hook(None, _sum_hook)
        self._params = model.torch_params

    def broadcast_params(self) -> None:
        """Nothing to do: DDP's constructor already broadcast rank 0's parameters."""

    def step(self, xb, yb, observe=None) -> float:
        """As ManualDP.step, through DDP: no_sync() for micro-steps 0..K-2, the all-reduce in the last
        backward. Leaves the global gradient in the parameters' .grad; returns the global mean loss."""
        from reference import check_ids
        W = self.ctx.world
        micro, n_local, n_global, w = self._plan(xb, yb)
        self.model.zero_grad()
        loss_sum = 0.0
        for k, (x, y) in enumerate(micro):
            if len(x) == 0:   # an empty shard (B < W K): a stand-in row, weighted 0, so this rank joins DDP's all-reduce
                x = y = np.full((1, 1), self.cfg.pad_id, dtype=np.int64)
            ids = torch.from_numpy(check_ids(self.cfg, x))
            tgt = torch.from_numpy(check_ids(self.cfg, y, what="target id", name="targets"))
            sync = k == self.accum - 1 and self.fault != "skip_last_sync"
            with (nullcontext() if sync else self.ddp.no_sync()):
                if n_local[k]:
                    _, loss = self.ddp(ids, tgt)
                    loss_sum += float(loss.detach()) * n_local[k]
                    scaled = loss * w[k]
                else:       # all PAD: no loss, but this rank must still run backward to join DDP's all-reduce
                    heads, _ = self.ddp(ids, None)
                    scaled = heads[0].sum() * 0.0
                _collective(self.ctx, f"DDP backward at step {self.step_count + 1}, micro-step {k + 1}",
                            scaled.backward)
            if observe is not None and k < self.accum - 1:
                observe(k, {n: p.grad.detach().numpy() / W for n, p in self._params.items()})
        self.step_count += 1
        return self._global_loss(loss_sum, int(n_global.sum()))


def make(impl: str, model, ctx: Context, accum: int = 1, fault: str | None = None, zero=None):
    """ManualDP for impl 'manual', ReferenceDP for 'reference'. zero: a parallel.zero.ZeroAdamW
    (manual only) whose sharded state the gradients are reduce-scattered into."""
    if impl == "manual":
        return ManualDP(model, ctx, accum, fault, zero)
    if zero is not None:
        raise ValueError("--shard-optimizer (ZeRO-1) is built for --impl manual only; the reference side "
                         "would use torch's ZeroRedundancyOptimizer")
    if impl == "reference":
        return ReferenceDP(model, ctx, accum, fault)
    raise ValueError(f"impl must be 'manual' or 'reference', got {impl!r}")
