"""Data-parallel training with manual/trainer.py's loop, as tools/train.py runs it under torchrun.

    torchrun --standalone --nproc-per-node 2 tools/train.py --impl manual --batch-size 16 ...
    python tools/train.py --grad-accum 4 ...          # one process, 4 micro-steps per update

`start(impl, model, grad_accum)` joins the gloo group (torchrun's env vars; a
one-rank group when not launched by torchrun), wraps the model in ManualDP / ReferenceDP and
broadcasts rank 0's weights. `DistributedTrainer` is manual.trainer.Trainer with three changes:

- a training step runs the glue (forward and backward of this rank's shards, the one all-reduce)
  where the plain trainer runs model.forward + model.backward; clipping and the optimizer step
  then act on the global gradient, the same on every rank, so every rank keeps the same weights;
- the ranks decide together whether to stop before each step (Ctrl-C, --time-limit): one tiny
  all-reduce, so that no rank stops alone and leaves the others waiting;
- only rank 0 writes checkpoints (atomically, through manual/checkpoint.py); they record the
  world size and the micro-step count, and resuming with another world size says what changes.

--batch-size is the GLOBAL batch: the data order, the learning-rate schedule and the step count
do not depend on the world size, so N ranks train the same run as one process (up to the order
of the sums in the all-reduce).
"""
from __future__ import annotations

import sys

from manual.trainer import Trainer

from . import dp


def requested(grad_accum: int, shard_optimizer: bool = False) -> bool:
    """Is this a data-parallel run (launched by torchrun, with micro-steps, or with ZeRO-1)?"""
    return dp.torchrun_env() is not None or grad_accum > 1 or shard_optimizer


def start(impl: str, model, grad_accum: int, timeout_s: float = dp.DEFAULT_TIMEOUT_S, zero_args: dict | None = None):
    """Join the process group and return the glue around `model`, with rank 0's weights everywhere.
    zero_args (AdamW's lr, weight_decay, groups): also build the ZeRO-1 optimizer, as glue.zero."""
    import torch.distributed as dist

    env = dp.torchrun_env()
    if env is None:
        ctx = dp.init(0, 1, store=dist.HashStore(), timeout_s=timeout_s)
    else:
        ctx = dp.init(timeout_s=timeout_s)
    zero = None
    if zero_args is not None:
        if impl != "manual":
            dp.shutdown()
            raise ValueError("--shard-optimizer (ZeRO-1) is built for --impl manual only")
        from .zero import ZeroAdamW
        zero = ZeroAdamW(model, ctx, **zero_args)
    glue = dp.make(impl, model, ctx, accum=grad_accum, zero=zero)
    glue.broadcast_params()
    return glue


def setup(args, model, optimizer):
    """tools/train.py's entry: (glue, optimizer) for a data-parallel run, (None, optimizer) for a plain
    one-process run. With --shard-optimizer the optimizer becomes parallel.zero.ZeroAdamW. Ranks
    other than 0 print nothing and write no --json / --plot (rank 0 speaks for the run)."""
    if not requested(args.grad_accum, args.shard_optimizer):
        return None, optimizer
    zero_args = None
    if args.shard_optimizer:
        if args.impl != "manual" or args.optimizer != "adamw":
            raise ValueError(f"--shard-optimizer (ZeRO-1) needs --impl manual and --optimizer adamw, got --impl "
                             f"{args.impl} --optimizer {args.optimizer}")
        from manual.registry import decay_groups
        zero_args = dict(lr=args.lr, weight_decay=args.weight_decay, groups=decay_groups(model.cfg, args.weight_decay))
    glue = start(args.impl, model, args.grad_accum, zero_args=zero_args)
    if glue.ctx.rank != 0:
        args.quiet, args.json, args.plot = True, None, None
    elif not args.quiet:
        print(f"data-parallel: {glue.ctx.world} rank(s) x {args.grad_accum} micro-step(s) per update, global batch "
              f"{args.batch_size}, gloo{', ZeRO-1 optimizer state' if glue.zero is not None else ''}",
              file=sys.stderr)
    return glue, (optimizer if getattr(glue, "zero", None) is None else glue.zero)


class _GlueStep:
    """The model as the trainer's train_step sees it during a data-parallel step: forward(xb, yb)
    runs the whole glue step on the global batch (every micro-step's forward and backward, the
    all-reduce) and returns the global loss; backward() has nothing left to do. Everything else
    (grads, taps, cfg, ...) is the model's own."""

    def __init__(self, model, glue):
        self._model, self._glue = model, glue

    def forward(self, xb, yb):
        return self._glue.step(xb, yb)

    def backward(self):
        pass

    def __getattr__(self, name):
        return getattr(self._model, name)


class DistributedTrainer(Trainer):
    """manual.trainer.Trainer over the data-parallel glue (module docstring)."""

    def __init__(self, *args, glue, **kwargs):
        super().__init__(*args, **kwargs)
        self.glue = glue
        self.zero = getattr(glue, "zero", None)
        if self.zero is not None:       # the gradient lives in slices: clip through the sharded optimizer
            self.clip_grad_norm, self.clip_grad_value = self.zero.clip_grad_norm, self.zero.clip_grad_value
        self.extra_metadata.update({"world_size": str(glue.ctx.world), "grad_accum": str(glue.accum),
                                    "shard_optimizer": str(self.zero is not None)})
        # stop together: a time limit or Ctrl-C may be seen by one rank a step before the others, and a
        # rank that stops alone leaves the others waiting in the next all-reduce
        local = self.should_stop

        def should_stop():
            reason = local() if local is not None else None
            if dp.any_rank(glue.ctx, bool(reason)):
                return reason or "stopped because another rank stopped"
            return None
        self.should_stop = should_stop

    @property
    def rank(self) -> int:
        return self.glue.ctx.rank

    def train_step(self, xb, yb) -> float:
        model = self.model
        self.model = _GlueStep(model, self.glue)
        try:
            return super().train_step(xb, yb)
        finally:
            self.model = model

    def save_checkpoint(self, path=None) -> str:
        """Rank 0 writes; the other ranks hold the same weights and only keep the bookkeeping."""
        if self.rank == 0:
            return super().save_checkpoint(path)
        path = str(path or self.checkpoint_path)
        self._check_params_finite()
        if self.zero is not None:
            self.optimizer.state_dict()             # a collective: rank 0's gathers the state from every rank
        self.last_checkpoint, self.last_checkpoint_step = path, self.state.step
        return path

    def restore(self, extras, metadata, path=None) -> None:
        super().restore(extras, metadata, path)
        saved = (metadata.get("world_size", "1"), metadata.get("grad_accum", "1"))
        now = (str(self.glue.ctx.world), str(self.glue.accum))
        if saved != now and self.rank == 0:
            print(f"note: resuming a run saved with world size {saved[0]} x grad-accum {saved[1]} on world size "
                  f"{now[0]} x grad-accum {now[1]}: the global batch, the data order and the schedule are "
                  f"unchanged, each rank now trains on about "
                  f"{self.batches.batch_size / (self.glue.ctx.world * self.glue.accum):.3g} rows per micro-step; the weights equal the uninterrupted run's up to the order of the "
                  f"sums in the all-reduce, not bit for bit", file=sys.stderr)
