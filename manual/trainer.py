"""The training loop: NumPy only, generic over the implementation.

It drives any object with the Model interface (manual.Model, reference.Model) and any optimizer
object with `step()`, `zero_grad()`, `groups` (a list of dicts whose "lr" may be set),
`state_dict() -> (tensors, meta)` and `load_state_dict(tensors, meta)`: manual.optim.AdamW / SGD,
or reference.training.TorchOptimizer around torch.optim.

    batches = Batches(x_train, y_train, batch_size=16, seed=0)       # manual/data.py
    trainer = Trainer(model, optimizer, batches, x_val, y_val, total_steps=300, lr=3e-3,
                      clip_norm=1.0, eval_every=100, checkpoint_path="runs/a/checkpoint.safetensors")
    result = trainer.run()          # result.stopped: "finished", "stop_at", "interrupted" or "non-finite"

One step, in this order (the blog post's training step):

    lr = lr_at(step)                          set on every optimizer group
    optimizer.zero_grad()
    loss = model.forward(xb, yb)              a non-finite loss stops the run, naming the step and
                                              the first non-finite tap (in execution order)
    model.backward()
    clip_grad_norm(clip_norm)                 optional; a non-finite gradient norm stops the run,
                                              naming the step and the first non-finite gradient
    clip_grad_value(clip_value)               optional
    optimizer.step()

`step` counts optimizer updates: "step 7" is the 7th update, and its loss is the loss of the batch
that update was computed from. The training loss of step k is state.train_loss[k - 1].

Exact resume. Everything the next step depends on is in the checkpoint: the parameters, the
optimizer state (torch's keys, `optim.<state>.<param name>`), the step, and the position in the
data (epoch, batches of that epoch already used). The learning rate is a pure function of the
step (lr_at), and the batch order is a pure function of (data seed, epoch)
(manual.data.epoch_order), so there is no hidden generator whose state could be lost: the "rng"
metadata records exactly those inputs. Evaluation uses no randomness and touches neither the
parameters nor the gradients, so evaluating (or not) does not change the trajectory. Hence a run
stopped at step k and resumed from its checkpoint ends with the same weights, bit for bit, as the
uninterrupted run on the same implementation.

Checkpoints (manual/checkpoint.save_model, atomic) are written every `save_every` steps and when
the run ends, except when it ends on a non-finite value: then the last good checkpoint is kept as
it is, and parameters are checked to be finite before any checkpoint is written. At the end of a
run the checkpoint is written BEFORE the final evaluation (and again after it, with the final
validation loss), so a run whose evaluation fails still leaves its weights on disk. A checkpoint
being resumed counts as "the last good checkpoint" only once its parameters are checked finite.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .checkpoint import save_model
from .checks import describe_nonfinite
from .config import load_json_object

SCHEDULES = ("constant", "cosine")
TRAIN_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# learning-rate schedule

def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "constant", warmup: int = 0,
          min_lr: float = 0.0) -> float:
    """The learning rate of update number `step` (0-based: the first update is step 0 here).

        warmup      s < warmup:  base_lr * (s + 1) / warmup          (linear, reaches base_lr at s = warmup - 1)
        constant    afterwards:  base_lr
        cosine      afterwards:  min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2,
                                 p = (s - warmup) / max(1, total_steps - warmup)   in [0, 1)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# evaluation

def evaluate(model, inputs: np.ndarray, targets: np.ndarray, batch_size: int = 64) -> float:
    """Mean loss over every non-PAD target of (inputs, targets), each (W, T).

    The model's loss of one batch is already a mean over that batch's non-PAD targets, so the
    batches are combined weighted by their non-PAD counts: the result is the mean over all
    targets, whatever the batch size. (With n_future > 1 the weight is head 1's count, which
    makes it the exact mean for head 1 and a close weighting for the others.) Forward only:
    the parameters and gradients are not touched.
    """
    pad = model.cfg.pad_id
    total, count = 0.0, 0
    for s in range(0, len(inputs), batch_size):
        x, y = inputs[s: s + batch_size], targets[s: s + batch_size]          # (b, T) each
        n = int(np.count_nonzero(y != pad))
        if n == 0:
            continue
        total += float(model.forward(x, y)) * n
        count += n
    if count == 0:
        raise ValueError(f"no non-PAD target among the {len(inputs)} evaluation windows")
    return total / count


# ----------------------------------------------------------------------------------------------
# state

@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint's "train_state" metadata (JSON)."""
    step: int = 0                              # optimizer updates done
    epoch: int = 0                             # epoch the next batch comes from
    batch: int = 0                             # batches of that epoch already used
    train_loss: list = field(default_factory=list)   # loss of step k at index k - 1
    val: list = field(default_factory=list)          # [[step, val_loss], ...]; step 0 = before training
    tokens: int = 0                            # non-PAD targets trained on, over all sessions
    train_seconds: float = 0.0                 # time spent in training steps, over all sessions

    @property
    def initial_val_loss(self) -> float | None:
        return self.val[0][1] if self.val and self.val[0][0] == 0 else None

    def to_json(self) -> str:
        return json.dumps({"version": TRAIN_STATE_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        """Read a saved state; one ValueError for text that is not a JSON object of the right fields."""
        d = load_json_object(text, "train_state")
        version = d.pop("version", None)
        if version != TRAIN_STATE_VERSION:
            raise ValueError(f"train_state has version {version!r}; this code reads {TRAIN_STATE_VERSION}")
        known = {f for f in cls.__dataclass_fields__}
        problems = [f"unknown field(s) {sorted(set(d) - known)}"] if set(d) - known else []
        for name in ("step", "epoch", "batch", "tokens"):
            v = d.get(name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"{name} must be an int >= 0, got {v!r}")
        v = d.get("train_seconds", 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            problems.append(f"train_seconds must be a number >= 0, got {v!r}")
        losses = d.get("train_loss", [])
        if not isinstance(losses, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in losses):
            problems.append("train_loss must be a list of numbers")
        val = d.get("val", [])
        if not isinstance(val, list) or not all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], int)
                                                and isinstance(x[1], (int, float)) for x in val):
            problems.append("val must be a list of [step, loss] pairs")
        if not problems and len(losses) != d.get("step", 0):
            problems.append(f"train_loss has {len(losses)} entries for step {d.get('step', 0)}")
        if problems:
            raise ValueError("train_state is invalid: " + "; ".join(problems))
        return cls(**d)


@dataclass
class TrainResult:
    stopped: str               # "finished" | "stop_at" | "interrupted" | "non-finite"
    message: str
    state: TrainState
    tokens_per_s: float        # this session: non-PAD targets / seconds spent in training steps
    checkpoint: str | None     # the checkpoint written last in this session (None: none written)


class NonFinite(Exception):
    """Raised inside the loop when a loss, gradient norm or parameter stops being finite."""


# ----------------------------------------------------------------------------------------------
# the loop

class Trainer:
    """Trains `model` with `optimizer` on `batches` (a manual.data.Batches) for total_steps updates.

    clip_grad_norm(max_norm) -> float and clip_grad_value(value) act on the model's gradients in
    place. They default to manual.optim's functions applied to `model.grads`, which only works
    when model.grads is the model's live dict (manual.Model); reference.training.clip_functions
    gives the torch ones. A model whose `grads` is a fresh copy at every access is refused
    without them, since clipping a copy would silently do nothing.

    Hooks (all optional): on_step(trainer, loss, lr) after each update; on_eval(trainer, step,
    val_loss) after each evaluation; on_save(trainer, path) after each checkpoint;
    should_stop() -> reason is asked before each update; a truthy reason (a str names it) stops
    the run between steps, which then evaluates, saves and can be resumed exactly (Ctrl-C, a
    time limit). extra_metadata (str -> str) goes into every checkpoint.
    """

    def __init__(self, model, optimizer, batches, val_inputs=None, val_targets=None, *,
                 total_steps: int, lr: float, schedule: str = "constant", warmup: int = 0,
                 min_lr: float = 0.0, clip_norm: float | None = None, clip_value: float | None = None,
                 clip_grad_norm=None, clip_grad_value=None, eval_every: int = 0,
                 eval_batch_size: int = 64, save_every: int = 0, checkpoint_path=None,
                 extra_metadata: dict | None = None, on_step=None, on_eval=None, on_save=None,
                 should_stop=None, state: TrainState | None = None):
        problems = []
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            problems.append(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            problems.append(f"lr must be a finite number >= 0, got {lr!r}")
        if schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            problems.append(f"warmup must be an int >= 0, got {warmup!r}")
        for name, v in (("clip_norm", clip_norm), ("clip_value", clip_value)):
            if v is not None and not (math.isfinite(v) and v > 0):
                problems.append(f"{name} must be a finite number > 0 (or None for no clipping), got {v!r}")
        for name, v in (("eval_every", eval_every), ("save_every", save_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"{name} must be an int >= 0 (0 = never), got {v!r}")
        if (val_inputs is None) != (val_targets is None):
            problems.append("give both val_inputs and val_targets, or neither")
        if eval_every and val_inputs is None:
            problems.append(f"eval_every={eval_every} needs validation windows (val_inputs, val_targets)")
        if save_every and checkpoint_path is None:
            problems.append(f"save_every={save_every} needs a checkpoint_path")
        if problems:
            raise ValueError("Trainer: " + "; ".join(problems))
        if (clip_norm or clip_value) and (clip_grad_norm is None or clip_grad_value is None):
            if model.grads is not model.grads:
                raise TypeError(f"{type(model).__module__}.{type(model).__name__}.grads returns a new dict "
                                f"at every access, so clipping it would change nothing; pass "
                                f"clip_grad_norm / clip_grad_value (reference.training.clip_functions)")
            from .optim import clip_grad_norm_, clip_grad_value_
            clip_grad_norm = clip_grad_norm or (
                lambda max_norm: clip_grad_norm_(model.grads, max_norm, error_if_nonfinite=False))
            clip_grad_value = clip_grad_value or (lambda value: clip_grad_value_(model.grads, value))
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.val_inputs, self.val_targets = val_inputs, val_targets
        self.total_steps, self.lr, self.schedule, self.warmup, self.min_lr = total_steps, lr, schedule, warmup, min_lr
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.eval_every, self.eval_batch_size, self.save_every = eval_every, eval_batch_size, save_every
        self.checkpoint_path = None if checkpoint_path is None else str(checkpoint_path)
        self.extra_metadata = dict(extra_metadata or {})
        self.on_step, self.on_eval, self.on_save, self.should_stop = on_step, on_eval, on_save, should_stop
        self.state = state if state is not None else TrainState()
        self.last_checkpoint: str | None = None
        self.last_checkpoint_step: int | None = None
        self._batch_iter, self._batch_iter_at = None, None
        self._session_tokens = 0
        self._session_seconds = 0.0

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_metadata(self, opt_meta: dict) -> dict[str, str]:
        """The training metadata of a checkpoint (all strings), plus extra_metadata.
        opt_meta: the second half of optimizer.state_dict()."""
        st = self.state
        meta = dict(self.extra_metadata)
        meta.update({
            "step": str(st.step),
            "epoch": str(st.epoch),
            "batch_in_epoch": str(st.batch),
            # no hidden generator: the batch order of epoch e is manual.data.epoch_order(data_seed, e)
            "rng": json.dumps({"kind": "manual.data.epoch_order", "data_seed": self.batches.seed,
                               "shuffle": self.batches.shuffle, "epoch": st.epoch, "batch": st.batch}),
            "optimizer": json.dumps(opt_meta),
            "train_state": st.to_json(),
        })
        return meta

    def save_checkpoint(self, path=None) -> str:
        """Write parameters, optimizer state and training state atomically. Refuses (NonFinite)
        to write non-finite parameters, so the previous checkpoint stays the last good one."""
        path = str(path or self.checkpoint_path)
        self._check_params_finite()
        tensors, opt_meta = self.optimizer.state_dict()
        save_model(path, self.model.cfg, self.model.params, tensors, self.checkpoint_metadata(opt_meta))
        self.last_checkpoint, self.last_checkpoint_step = path, self.state.step
        if self.on_save:
            self.on_save(self, path)
        return path

    def restore(self, extras: dict, metadata: dict, path=None) -> None:
        """Continue from a checkpoint: optimizer state from its `optim.*` tensors and "optimizer"
        metadata, and the training state. (The parameters are the model's: build the model from
        the same checkpoint.) `path`, the file read, counts as the last good checkpoint."""
        found = describe_nonfinite(self.model.params, "parameter")
        if found is not None:          # never call a non-finite checkpoint "the last good one"
            raise ValueError(f"cannot resume from {path or 'the checkpoint'}: {found}")
        missing = [k for k in ("optimizer", "train_state") if k not in metadata]
        if missing:
            raise ValueError(f"the checkpoint has no {missing} metadata: it is a model checkpoint, not a "
                             f"training checkpoint, so training cannot resume from it exactly")
        try:
            self.optimizer.load_state_dict(extras, load_json_object(metadata["optimizer"], "optimizer metadata"))
        except (KeyError, TypeError, AttributeError, IndexError) as exc:   # a field of the wrong type or missing
            raise ValueError(f"the checkpoint's optimizer metadata does not fit: {type(exc).__name__}: {exc}") from None
        self.state = TrainState.from_json(metadata["train_state"])
        if self.state.step > self.total_steps:
            raise ValueError(f"the checkpoint is at step {self.state.step}, past total_steps {self.total_steps}")
        if self.state.batch > len(self.batches):
            raise ValueError(f"the checkpoint is at batch {self.state.batch} of epoch {self.state.epoch}, but an "
                             f"epoch now has only {len(self.batches)} batches: the data or batch size changed")
        if path is not None:
            self.last_checkpoint, self.last_checkpoint_step = str(path), self.state.step

    def _check_params_finite(self) -> None:
        found = describe_nonfinite(self.model.params, "parameter")
        if found is not None:
            raise NonFinite(f"non-finite parameters after step {self.state.step}: {found}")

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self) -> float:
        with np.errstate(over="ignore", invalid="ignore"):
            val = evaluate(self.model, self.val_inputs, self.val_targets, self.eval_batch_size)
        if not math.isfinite(val):
            raise NonFinite(f"validation loss is {val} after step {self.state.step}")
        self.state.val.append([self.state.step, val])
        if self.on_eval:
            self.on_eval(self, self.state.step, val)
        return val

    # -- one update -----------------------------------------------------------------------------

    def train_step(self, xb: np.ndarray, yb: np.ndarray) -> float:
        """One update on the batch (xb, yb), each (B, T). Returns its loss."""
        st = self.state
        lr = lr_at(st.step, self.lr, self.total_steps, self.schedule, self.warmup, self.min_lr)
        for group in self.optimizer.groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        with np.errstate(over="ignore", invalid="ignore"):     # a diverging run is reported below, by step
            loss = self.model.forward(xb, yb)
        if not math.isfinite(loss):
            first = describe_nonfinite(self.model.taps, "the first non-finite tap:") or "every tap is finite"
            raise NonFinite(f"the loss is {loss} at step {st.step + 1} (lr {lr:.3g}); {first}")
        with np.errstate(over="ignore", invalid="ignore"):
            self.model.backward()
        if self.clip_norm:
            norm = self.clip_grad_norm(self.clip_norm)
            if not math.isfinite(norm):
                first = describe_nonfinite(self.model.grads, "the first non-finite gradient:") or ""
                raise NonFinite(f"the gradient norm is {norm} at step {st.step + 1} (loss {loss:.4g}, lr {lr:.3g})"
                                + (f"; {first}" if first else ""))
        if self.clip_value:
            self.clip_grad_value(self.clip_value)
        self.optimizer.step()
        return loss

    # -- the run ----------------------------------------------------------------------------------

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until total_steps (or until step `stop_at`, as if interrupted there).

        Evaluates before the first step (the initial validation loss, once per run), every
        eval_every steps and where the run ends; saves every save_every steps and at the end, where
        the checkpoint is written before the final evaluation and again after it.
        """
        st = self.state
        stopped, message = "finished", f"finished {self.total_steps} steps"
        try:
            if self.val_inputs is not None and st.initial_val_loss is None and st.step == 0:
                self.evaluate()
            while st.step < self.total_steps:
                if stop_at is not None and st.step >= stop_at:
                    stopped, message = "stop_at", f"stopped at step {st.step} (stop_at={stop_at})"
                    break
                reason = self.should_stop() if self.should_stop is not None else None
                if reason:
                    stopped = "interrupted"
                    message = f"{reason if isinstance(reason, str) else 'interrupted'} after step {st.step}"
                    break
                xb, yb = self._next_batch()                                   # (B, T) each
                t0 = time.perf_counter()
                loss = self.train_step(xb, yb)
                seconds = time.perf_counter() - t0
                tokens = int(np.count_nonzero(yb != self.model.cfg.pad_id))
                st.step, st.batch = st.step + 1, st.batch + 1
                st.train_loss.append(loss)
                st.tokens += tokens
                st.train_seconds += seconds
                self._session_tokens += tokens
                self._session_seconds += seconds
                if self.on_step:
                    self.on_step(self, loss, lr_at(st.step - 1, self.lr, self.total_steps, self.schedule,
                                                   self.warmup, self.min_lr))
                last = st.step == self.total_steps
                if self.val_inputs is not None and self.eval_every and st.step % self.eval_every == 0 and not last:
                    self.evaluate()
                if self.save_every and st.step % self.save_every == 0 and not last:
                    self.save_checkpoint()
            # the end: save first, so that a failing evaluation cannot leave the run without a checkpoint
            if self.checkpoint_path is not None:
                self.save_checkpoint()
            if self.val_inputs is not None and (stopped == "finished" or st.val) and \
                    (not st.val or st.val[-1][0] != st.step):
                self.evaluate()                    # the validation loss where the run ended
                if self.checkpoint_path is not None:
                    self.save_checkpoint()         # again, now holding that validation loss
        except NonFinite as exc:
            stopped = "non-finite"
            kept = (f"the last good checkpoint {self.last_checkpoint} (step {self.last_checkpoint_step}) is kept"
                    if self.last_checkpoint else "no checkpoint was written in this run")
            message = f"stopping: {exc}; {kept}"
        return TrainResult(stopped, message, st, self.tokens_per_s, self.last_checkpoint)

    def _next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The batch at the state's position (epoch, batch), moving to the next epoch when one is
        used up. One generator is kept while the position follows it (a new one would redraw the
        epoch's permutation every step)."""
        st = self.state
        if st.batch >= len(self.batches):
            st.epoch, st.batch = st.epoch + 1, 0
        if self._batch_iter is None or self._batch_iter_at != (st.epoch, st.batch):
            self._batch_iter = self.batches.epoch(st.epoch, start=st.batch)
        xb, yb = next(self._batch_iter)
        self._batch_iter_at = (st.epoch, st.batch + 1)
        return xb, yb

    @property
    def tokens_per_s(self) -> float:
        """Non-PAD targets per second of training steps in this session (evaluation and saving excluded)."""
        return self._session_tokens / self._session_seconds if self._session_seconds > 0 else 0.0
