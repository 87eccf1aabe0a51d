"""Train the transformer with either implementation, on the same data in the same order.

    python tools/train.py                                    # tiny preset, char level, embedded corpus, 1 epoch
    python tools/train.py --max-steps 300 --json run.json --plot loss.png
    python tools/train.py --impl reference --max-steps 300   # the same run in PyTorch
    python tools/train.py --batch-size 1 --max-steps 2000    # "step train": one example per update
    python tools/train.py --tokenizer word --data notes.txt --epochs 5 --schedule cosine --warmup 100
    python tools/train.py --resume runs/latest               # continue exactly where it stopped
    python tools/sample.py runs/latest --prompt "The "       # then generate

What is the same on both sides: the initial weights (manual.registry.init_params via
Model(cfg, seed)), the tokenizer, the windows and the batch order (manual.data, seeded by
--seed), the decay groups (manual.registry.decay_groups), the learning-rate schedule and the
training loop itself (manual/trainer.py). Only the model's arithmetic and the optimizer's
differ: manual.Model + manual.optim, or reference.Model + torch.optim (reference/training.py).

The model's vocabulary is the tokenizer's (the preset's vocab_size is overridden), and the
tokenizer's PAD (id 0) is the model's pad_id. Data: --data FILE (UTF-8), --synthetic N (a
deterministic N-character corpus for tests), or by default the embedded corpus (the text of the
stdlib module pydoc_data.topics). The last --val-fraction of the token stream validates.

Checkpoints go to OUT/checkpoint.safetensors (atomic: a crash never leaves a torn file) every
--save-every steps and at the end, with the optimizer state, the step, the position in the data,
the tokenizer and these arguments. --resume DIR_OR_FILE continues from one: the saved arguments
are the defaults, so `--resume DIR` alone continues the same run, and an interrupted-and-resumed
run ends with the same weights, bit for bit, as the uninterrupted one (same --impl, same thread
count). The thread count is part of the run: --resume without --threads restores the count the run
was started with (its saved --threads), since BLAS reductions split over a different number of
threads round differently; a --threads that differs from the saved one is used, with a warning
that names both numbers. Ctrl-C stops between two steps, saves and tells you how to resume. A
non-finite loss or gradient norm stops the run with a message naming the step and the first
non-finite tensor; the last good checkpoint is left as it was. The checkpoint is written before
the final evaluation, so a run never ends without one.

Errors (tools/_cli.py): bad input is one line on stderr and exit code 2; --out, --json and --plot
are checked before anything is trained; the run's estimated memory is checked against the
machine's before anything is allocated.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path


from tools._args import (CHECKPOINT_NAME, checkpoint_in, float_at_least, int_at_least,
                         read_header_metadata, set_blas_threads)
from tools._cli import CLIError, cli, output_dir, output_file, save_figure, write_output

# arguments that belong to one session and are never taken from the checkpoint on --resume
# (--threads is not one of them: a resumed run keeps the run's thread count, see the docstring)
SESSION_ONLY = {"resume", "stop_at", "json", "plot", "quiet", "time_limit"}
MODEL_FLAGS = ("d_model", "n_heads", "d_ff", "n_layers", "max_seq_len", "norm", "activation", "bias",
               "tie_embeddings", "n_future", "attention")


def build_parser() -> argparse.ArgumentParser:
    from manual.config import ACTIVATIONS, ATTENTIONS, DTYPES, LOSSES, NORMS, PRESETS

    p = argparse.ArgumentParser(prog="python tools/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("manual", "reference"), default="manual",
                   help="manual (NumPy, hand-written backward) or reference (PyTorch autograd); default manual")
    g = p.add_argument_group("model (the preset, with any field overridden)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    g.add_argument("--d-model", type=int_at_least(1))
    g.add_argument("--n-heads", type=int_at_least(1))
    g.add_argument("--d-ff", type=int_at_least(1))
    g.add_argument("--n-layers", type=int_at_least(1))
    g.add_argument("--max-seq-len", type=int_at_least(1), help="context length = window length T")
    g.add_argument("--norm", choices=NORMS)
    g.add_argument("--activation", choices=ACTIVATIONS)
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--n-future", type=int_at_least(1), help="prediction heads (multi-token prediction)")
    g.add_argument("--attention", choices=ATTENTIONS)
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--loss", choices=LOSSES, default="cross_entropy",
                   help="cross_entropy, or brier (squared distance of the softmax from the one-hot target)")
    g = p.add_argument_group("data")
    g.add_argument("--tokenizer", choices=("char", "word"), default="char")
    g.add_argument("--max-vocab", type=int_at_least(5),
                   help="vocabulary size including the 4 special tokens; char default: every character; "
                        "word default: the preset's vocab_size (tiny: 100, the blog's 100-word vocabulary)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="FILE", help="a UTF-8 text file (default: the embedded corpus)")
    src.add_argument("--synthetic", type=int_at_least(2), metavar="N",
                     help="a deterministic synthetic corpus of N characters (fast tests)")
    g.add_argument("--val-fraction", type=float_at_least(0.0, strict=True), default=0.1,
                   help="the last part of the token stream that validates (default 0.1)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="initial weights and batch order (default 0)")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int_at_least(1), default=16,
                   help="windows per update; 1 is the blog's step training (default 16)")
    g.add_argument("--epochs", type=int_at_least(1), help="passes over the training windows (default 1)")
    g.add_argument("--max-steps", type=int_at_least(1), help="updates (caps --epochs when both are given)")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    g.add_argument("--lr", type=float_at_least(0.0, strict=True), default=3e-3, help="peak learning rate (default 3e-3)")
    g.add_argument("--weight-decay", type=float_at_least(), default=0.0,
                   help="decoupled (AdamW) / L2 (SGD) decay of the matrices only (registry.decay_groups)")
    g.add_argument("--momentum", type=float_at_least(), default=0.0, help="SGD momentum (default 0)")
    g.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    g.add_argument("--warmup", type=int_at_least(0), default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--min-lr-ratio", type=float_at_least(), default=0.1,
                   help="cosine: the final learning rate as a fraction of --lr (default 0.1)")
    g.add_argument("--clip-norm", type=float_at_least(), default=1.0,
                   help="clip the global gradient norm to this (the blog's 1.0; 0 = off)")
    g.add_argument("--clip-value", type=float_at_least(), default=0.0, help="clamp every gradient to [-v, v] (0 = off)")
    g.add_argument("--time-limit", type=float_at_least(0.0, strict=True), metavar="SECONDS",
                   help="stop (and save) after this much wall time")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int_at_least(0), default=100,
                   help="validation loss and perplexity every N steps (and at the start and end; 0 = only those)")
    g.add_argument("--eval-windows", type=int_at_least(0), default=256,
                   help="validation windows used, evenly spaced over the validation text (0 = all; default 256)")
    g.add_argument("--out", metavar="DIR", default="runs/latest",
                   help=f"checkpoint folder; writes DIR/{CHECKPOINT_NAME} (default runs/latest)")
    g.add_argument("--save-every", type=int_at_least(0), default=500,
                   help="checkpoint every N steps, and always at the end (0 = only at the end; default 500)")
    g.add_argument("--resume", metavar="DIR_OR_FILE", help="continue from a checkpoint written by this tool")
    g.add_argument("--stop-at", type=int_at_least(1), metavar="STEP",
                   help="stop and save after this step, as if interrupted (resume later with --resume)")
    g.add_argument("--json", metavar="PATH", help="write a summary: losses, the loss curve, tokens/s")
    g.add_argument("--plot", metavar="PATH", help="write the loss curve as a PNG")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no log lines")
    g.add_argument("--threads", type=int_at_least(1),
                   help="BLAS / torch threads (default: the libraries' own choice)")
    return p


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint file, or a folder holding CHECKPOINT_NAME."""
    p = checkpoint_in(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {path!r} (expected a .safetensors file or a folder "
                                f"holding {CHECKPOINT_NAME})")
    return p


# ----------------------------------------------------------------------------------------------

@cli("train.py")
def main(argv=None) -> int:
    # threads first: BLAS reads these variables when NumPy is imported (build_parser imports it); on
    # --resume without --threads, the run's own count, read from the checkpoint header without NumPy
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int_at_least(1))
    pre.add_argument("--resume")
    early = pre.parse_known_args(argv)[0]
    threads = early.threads or (_saved_threads(early.resume) if early.resume else None)
    if threads:
        set_blas_threads(threads)
    parser = build_parser()
    args = parser.parse_args(argv)
    output_file(args.json, "--json")              # checked before any work: one line, exit 2
    output_file(args.plot, "--plot")
    resume = None
    if args.resume:
        resume = _read_resume(parser, args.resume)
        # the saved arguments become the defaults; what this command line gives still wins
        parser.set_defaults(**{k: v for k, v in resume["args"].items() if k not in SESSION_ONLY})
        args = parser.parse_args(argv)
        saved = resume["args"].get("threads")
        if args.threads != saved:
            print(f"warning: this session uses --threads {args.threads or 'default'}, the run was started with "
                  f"--threads {saved or 'default'}; the weights may differ from the uninterrupted run's in "
                  f"the last bits (leave --threads out to keep the run's count)", file=sys.stderr)
    if args.threads:
        _limit_threads(args.threads)
    if args.stop_at is not None and args.max_steps is not None and args.stop_at > args.max_steps:
        parser.error(f"argument --stop-at: {args.stop_at} is past --max-steps {args.max_steps}")
    output_dir(args.out, "--out")
    return _run(parser, args, resume)


def _saved_threads(where: str) -> int | None:
    """The --threads a run was started with, from its checkpoint's train_args (None when unknown)."""
    try:
        args = json.loads(read_header_metadata(checkpoint_in(where)).get("train_args", "{}"))
    except (OSError, ValueError, RecursionError):
        return None             # the full read in _read_resume reports what is wrong with the file
    threads = args.get("threads") if isinstance(args, dict) else None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1 else None


def _limit_threads(n: int) -> None:
    """BLAS threads of this process, also when NumPy is already loaded (threadpoolctl, if installed);
    the environment variables (set_blas_threads) cover a fresh process and its children."""
    set_blas_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=n, user_api="blas")


def _read_resume(parser, where: str) -> dict:
    from manual.checkpoint import CheckpointError, load_model
    from manual.config import load_json_object

    try:
        path = resolve_checkpoint(where)
        cfg, params, extras, meta = load_model(path)
    except FileNotFoundError as exc:
        raise CLIError(f"--resume: {exc}") from None
    missing = [k for k in ("train_args", "tokenizer", "optimizer", "train_state") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} has no {missing} metadata; it is not a training "
                              f"checkpoint written by tools/train.py")
    try:
        saved = _check_saved_args(parser, load_json_object(meta["train_args"], "train_args"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return {"path": path, "cfg": cfg, "params": params, "extras": extras, "meta": meta, "args": saved}


def _check_saved_args(parser, saved: dict) -> dict:
    """The saved arguments of a run, each checked as if it had been typed (its type, its choices):
    a tampered checkpoint gives one ValueError, never a crash later. Unknown names are dropped."""
    actions = {a.dest: a for a in parser._actions}
    out, problems = {}, []
    for name, value in saved.items():
        action = actions.get(name)
        if action is None or name in SESSION_ONLY:
            continue
        if value is None:
            out[name] = None
            continue
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            ok = isinstance(value, bool)
        elif action.type is not None:
            try:
                ok = not isinstance(value, (bool, list, dict)) and action.type(str(value)) == value
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                ok = False
        else:
            ok = isinstance(value, str)
        if ok and action.choices is not None and value not in action.choices:
            ok = False
        if ok:
            out[name] = value
        else:
            problems.append(f"{name}={value!r}")
    if problems:
        raise ValueError(f"train_args holds values this tool does not accept: {', '.join(problems)}")
    return out


def _run(parser, args, resume) -> int:
    import numpy as np

    from manual.config import PRESETS, ModelConfig
    from manual.data import Batches, default_corpus, make_windows, read_corpus, synthetic_corpus, train_val_split
    from manual.tokenizer import KINDS, tokenizer_from_json
    from manual.trainer import Trainer

    t_start = time.perf_counter()
    # -- data and tokenizer
    if args.data:
        text, source = read_corpus(args.data), args.data
    elif args.synthetic:
        text, source = synthetic_corpus(args.synthetic, seed=args.seed), f"synthetic({args.synthetic})"
    else:
        text, source = default_corpus(), "pydoc_data.topics"
    if resume:
        tok = tokenizer_from_json(resume["meta"]["tokenizer"])
        if tok.kind != args.tokenizer:
            parser.error(f"argument --tokenizer: the checkpoint's tokenizer is {tok.kind!r}, not {args.tokenizer!r}")
    else:
        max_vocab = args.max_vocab
        if max_vocab is None and args.tokenizer == "word":
            max_vocab = PRESETS[args.preset].model.get("vocab_size", 100)
        tok = KINDS[args.tokenizer].fit(text, max_vocab=max_vocab)
    ids = tok.encode(text)                                                        # (N,)
    train_ids, val_ids = train_val_split(ids, args.val_fraction)
    data_sha256 = hashlib.sha256(train_ids.tobytes()).hexdigest()
    if resume and resume["meta"].get("data_sha256", data_sha256) != data_sha256:
        print(f"warning: the training data differs from the data the checkpoint was trained on "
              f"({source}); the run continues, but not as the uninterrupted run would have", file=sys.stderr)

    # -- config: the preset, the flags given, the tokenizer's vocabulary and PAD
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    cfg = ModelConfig.preset(args.preset, vocab_size=tok.vocab_size, pad_id=tok.PAD, dtype=args.dtype,
                             loss=args.loss, **overrides)
    if resume and resume["cfg"] != cfg:
        diffs = [f"{k}: checkpoint {v!r}, command line {getattr(cfg, k)!r}"
                 for k, v in resume["cfg"].to_dict().items() if getattr(cfg, k) != v]
        parser.error("the model flags do not match the checkpoint being resumed: " + "; ".join(diffs))
    T = cfg.max_seq_len
    x_train, y_train = make_windows(train_ids, T, pad_id=tok.PAD)                 # (W, T) each
    x_val, y_val = make_windows(val_ids, T, pad_id=tok.PAD)                       # (Wv, T) each
    if args.eval_windows and args.eval_windows < len(x_val):
        pick = np.linspace(0, len(x_val) - 1, args.eval_windows).round().astype(np.int64)
        x_val, y_val = x_val[pick], y_val[pick]
    batches = Batches(x_train, y_train, batch_size=args.batch_size, seed=args.seed)
    if args.max_steps is not None:
        total = args.max_steps if args.epochs is None else min(args.max_steps, args.epochs * len(batches))
    else:
        total = (args.epochs or 1) * len(batches)
    if args.stop_at is not None and args.stop_at > total:
        parser.error(f"argument --stop-at: {args.stop_at} is past the last step {total}")

    # -- memory: the estimate against the machine's, before anything is allocated
    _check_memory(cfg, args.batch_size, args.impl, len(x_val))

    # -- model and optimizer
    model, optimizer, clip_fns = _build(args, cfg, resume)

    # -- the loop, with its progress bar and log lines
    out = Path(args.out) if args.out else None
    saved_args = dict(vars(args))
    log = _Log(args, total, cfg)
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:                       # a second Ctrl-C: stop now
            signal.default_int_handler(signum, frame)
        interrupted["flag"] = True
        log.write("Ctrl-C: stopping after this step (press again to abort without saving)")

    def should_stop():
        if interrupted["flag"]:
            return "interrupted (Ctrl-C)"
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            return f"time limit {args.time_limit:g} s reached"
        return None

    trainer = Trainer(
        model, optimizer, batches, x_val, y_val, total_steps=total, lr=args.lr, schedule=args.schedule,
        warmup=args.warmup, min_lr=args.lr * args.min_lr_ratio, clip_norm=args.clip_norm or None,
        clip_value=args.clip_value or None, clip_grad_norm=clip_fns[0], clip_grad_value=clip_fns[1],
        eval_every=args.eval_every, eval_batch_size=64,
        save_every=args.save_every if out is not None else 0,
        checkpoint_path=(out / CHECKPOINT_NAME) if out is not None else None,
        extra_metadata={"tokenizer": tok.to_json(), "train_args": json.dumps(saved_args), "impl": args.impl,
                        "data": source, "data_sha256": data_sha256},
        on_step=log.on_step, on_eval=log.on_eval, should_stop=should_stop)
    if resume:
        trainer.restore(resume["extras"], resume["meta"], path=resume["path"])
    start_step = trainer.state.step
    log.start(trainer, source, tok, len(x_train), len(batches), model)
    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    try:
        result = trainer.run(stop_at=args.stop_at)
    except (ValueError, FileNotFoundError) as exc:    # not a usage error: keep the traceback (see main)
        raise RuntimeError(f"training failed at step {trainer.state.step + 1}: {exc}") from exc
    finally:
        log.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    # -- the summary
    st = result.state
    initial = st.initial_val_loss
    final = st.val[-1][1] if st.val else None
    ce = cfg.loss == "cross_entropy"
    summary = {
        "impl": args.impl, "preset": args.preset, "config": cfg.to_dict(), "data": source,
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "batch_size": args.batch_size,
        "optimizer": args.optimizer, "lr": args.lr, "schedule": args.schedule,
        "steps": st.step, "total_steps": total, "start_step": start_step, "epoch": st.epoch,
        "initial_val_loss": initial, "final_val_loss": final,
        "initial_perplexity": perplexity(initial) if ce and initial is not None else None,
        "final_perplexity": perplexity(final) if ce and final is not None else None,
        "val_loss_reduction": (1 - final / initial) if initial and final is not None else None,
        "tokens_per_s": result.tokens_per_s, "tokens": st.tokens, "train_seconds": st.train_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "stopped": result.stopped, "message": result.message, "checkpoint": result.checkpoint,
        "loss_curve": {"step": list(range(1, len(st.train_loss) + 1)), "train_loss": st.train_loss,
                       "val_step": [s for s, _ in st.val], "val_loss": [v for _, v in st.val]},
        "args": saved_args,
    }
    if args.json:
        write_output(args.json, json.dumps(summary, indent=1))
    if args.plot and st.train_loss:
        plot_loss(st, args.plot, title=f"{args.impl}, {args.preset}, {tok.kind}-level, {source}")
    log.summary(summary, args)
    if result.stopped == "non-finite":
        return 1
    if result.stopped == "interrupted" and interrupted["flag"]:
        return 130
    return 0


def perplexity(loss: float) -> float | None:
    """exp(loss); None where it overflows a float (a diverging run's loss can be huge and finite)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(cfg, batch_size: int, impl: str, n_val: int) -> None:
    """Refuse a run whose closed-form footprint (manual.memory: parameters, gradients, two optimizer
    buffers, the peak of one step at the larger of the training and evaluation batches; x2 for the
    reference's extra copies, as tools/memprof.py counts it) exceeds the machine's physical memory."""
    from manual.memory import param_bytes, peak_bytes_closed_form

    have = physical_memory_bytes()
    if have is None:
        return
    B = max(batch_size, min(64, max(n_val, 1)))
    need = (peak_bytes_closed_form(cfg, B, cfg.max_seq_len) + 2 * param_bytes(cfg)) * (2 if impl == "reference" else 1)
    if need > have:
        raise CLIError(f"this run needs an estimated {need / 2**30:,.1f} GiB (max_seq_len {cfg.max_seq_len}, "
                       f"batch {B}, d_model {cfg.d_model}, n_layers {cfg.n_layers}), more than the machine's "
                       f"{have / 2**30:,.1f} GiB; use a smaller --max-seq-len, --batch-size or model "
                       f"(python tools/memprof.py --dry-run sizes a config)")


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _build(args, cfg, resume):
    """(model, optimizer, (clip_grad_norm, clip_grad_value)) for --impl; from the checkpoint on --resume."""
    if args.impl == "manual":
        import manual
        from manual.optim import SGD, AdamW
        from manual.registry import decay_groups

        model = manual.Model.from_params(cfg, resume["params"]) if resume else manual.Model(cfg, seed=args.seed)
        groups = decay_groups(cfg, args.weight_decay)
        if args.optimizer == "adamw":
            opt = AdamW(model.params, model.grads, lr=args.lr, weight_decay=args.weight_decay, groups=groups)
        else:
            opt = SGD(model.params, model.grads, lr=args.lr, momentum=args.momentum,
                      weight_decay=args.weight_decay, groups=groups)
        return model, opt, (None, None)            # the trainer clips model.grads with manual.optim
    import torch

    import reference
    from reference.training import TorchOptimizer, clip_functions

    if args.threads:
        torch.set_num_threads(args.threads)
    model = reference.Model.from_params(cfg, resume["params"]) if resume else reference.Model(cfg, seed=args.seed)
    opt = TorchOptimizer(model, args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    return model, opt, clip_functions(model)


# ----------------------------------------------------------------------------------------------

class _Log:
    """The tqdm progress bar (only on a terminal, never with --quiet) and the log lines."""

    def __init__(self, args, total: int, cfg):
        self.args, self.total, self.cfg = args, total, cfg
        self.bar = None
        self.ema = None
        self.quiet = args.quiet

    def start(self, trainer, source, tok, n_windows, n_batches, model):
        st = trainer.state
        if not self.quiet:
            what = "resuming at" if st.step else "starting at"
            self.write(f"{self.args.impl}: {model.num_params():,} parameters ({self.cfg.dtype}), "
                       f"{tok.kind} tokenizer with {tok.vocab_size} tokens, data {source}: "
                       f"{n_windows:,} windows of {self.cfg.max_seq_len}, {n_batches:,} batches of "
                       f"{self.args.batch_size} per epoch; {what} step {st.step} of {self.total}")
            if sys.stderr.isatty():
                from tqdm import tqdm
                self.bar = tqdm(total=self.total, initial=st.step, unit="step", dynamic_ncols=True,
                                file=sys.stderr, leave=True)

    def write(self, line: str):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def on_step(self, trainer, loss, lr):
        self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
        if self.bar is not None:
            self.bar.update(1)
            if trainer.state.step % 5 == 0 or trainer.state.step == self.total:
                self.bar.set_postfix(loss=f"{self.ema:.3f}", lr=f"{lr:.2g}",
                                     tok_s=f"{trainer.tokens_per_s:,.0f}", refresh=False)

    def on_eval(self, trainer, step, val):
        ppl = perplexity(val)
        ppl = (f"  perplexity {ppl if ppl is not None else float('inf'):8.2f}"
               if self.cfg.loss == "cross_entropy" else "")
        train = f"  train loss {self.ema:.4f}" if self.ema is not None else ""
        speed = f"  {trainer.tokens_per_s:,.0f} tok/s" if trainer.tokens_per_s else ""
        self.write(f"step {step:>6}/{self.total}{train}  val loss {val:.4f}{ppl}{speed}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, s, args):
        if s["stopped"] == "non-finite":
            print(f"train.py: {s['message']}", file=sys.stderr)
        if self.quiet:
            return
        if s["initial_val_loss"] is not None and s["final_val_loss"] is not None:
            change = f" ({-100 * s['val_loss_reduction']:+.1f}%)" if s["val_loss_reduction"] is not None else ""
            print(f"val loss {s['initial_val_loss']:.4f} -> {s['final_val_loss']:.4f}{change} after "
                  f"{s['steps']} steps; {s['tokens_per_s']:,.0f} tokens/s ({args.impl})")
        if s["stopped"] != "non-finite":
            print(s["message"] + (f"; checkpoint {s['checkpoint']}" if s["checkpoint"] else ""))
        if s["stopped"] in ("stop_at", "interrupted") and s["checkpoint"]:
            print(f"resume with: python tools/train.py --resume {Path(s['checkpoint']).parent}")
        if args.json:
            print(f"wrote {args.json}")
        if args.plot and s["loss_curve"]["train_loss"]:
            print(f"wrote {args.plot}")


def plot_loss(state, path, title: str = "") -> None:
    """Training loss per step (and its moving average) and validation loss, against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    loss = np.asarray(state.train_loss, dtype=np.float64)
    steps = np.arange(1, len(loss) + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (per step)")
    w = max(1, min(50, len(loss) // 10))
    if w > 1:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color="tab:blue", linewidth=1.5, label=f"train loss ({w}-step mean)")
    if state.val:
        vs, vl = zip(*state.val)
        ax.plot(vs, vl, "o-", color="tab:orange", markersize=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
