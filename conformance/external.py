"""Outside programs under test: the case directory, the dump, and the harness that runs a command.

    python -m conformance --impl-cmd './my_port {case} {out}'
    python -m conformance --impl-cmd 'python port.py --case {case} --out {out} --steps {steps}'

For every configuration of the matrix the harness writes a case directory (`write_case`), runs the
command with `{case}` and `{out}` replaced (each placeholder replaced inside its own argument, after
shell-style splitting, so paths with spaces stay one argument; no shell is involved), waits at most
`timeout` seconds, reads the dump the program wrote to `{out}` (`read_dump`) and compares it with the
reference (`compare_tensors`). Exit status 3 from the program means "configuration not supported".
With `{steps}` in the command, the program is run a second time with `{steps}` = N (first: 0): it
trains N steps with the case's optimizer (train/optimizer.json) on the case's batches and writes the
loss of every step and the final parameters; both are compared.

Every failure is one line for its configuration and the run goes on with the next: command not
found, not executable, non-zero exit (with the tail of its stderr), timeout, no dump, a truncated or
unreadable dump, wrong dtype, wrong shape (both shapes, and "transposed?" when reversed), unknown keys,
required keys missing. The case's README.txt (`CASE_README`) is the porter's whole contract;
docs/your-implementation.md says the same at length.

The dump format (one forward of ids with targets, one backward of the loss):
    <tap>          every named activation of manual.registry.tap_specs(cfg) ("logits" is one)
    loss           the scalar loss, shape () (or (1,))
    grad.<tap>     d loss / d tap
    grad.<param>   d loss / d parameter, canonical names and layouts ([in, out] matrices)
Required: logits, loss and every grad.<param>. Optional: the other taps and grad.<tap> (absent ones
are reported as "not provided"). The same keys come from an in-process implementation
(conformance.implementation.tensors_of) and from the debugger's --against.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from manual import registry
from manual.checkpoint import CheckpointError, load_model, load_tensors, save_model
from manual.config import ModelConfig

from . import conventions
from .compare import Comparison, compare
from .graph import where as layer_of

CHECKPOINT_NAME = "checkpoint.safetensors"
EXIT_UNSUPPORTED = 3
DEFAULT_TIMEOUT = 120.0          # seconds per run of the command
STDERR_TAIL = 400                # characters of the program's stderr shown in a failure line
PLACEHOLDERS = ("{case}", "{out}", "{steps}")
TRAIN_STEPS = 5                  # {steps} mode: steps trained
TRAIN_OPTIMIZER = "sgd"          # {steps} mode: the optimizer (conformance.trajectory.OPTIMIZERS)


class DumpError(ValueError):
    """A dump that cannot be read at all (missing, truncated, not safetensors / npz, empty)."""


# -- the dump's keys ---------------------------------------------------------------------------------

def dump_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(key, check) of every tensor a dump may hold, in walk order: taps forward, loss, tap gradients
    backward, parameter gradients backward (the order backward produces them)."""
    taps = conventions.tap_names(cfg)
    out = [(n, "activation") for n in taps] + [("loss", "loss")]
    out += [(f"grad.{n}", "activation_grad") for n in reversed(taps)]
    out += [(f"grad.{s.name}", "param_grad") for s in reversed(registry.param_specs(cfg))]
    return out


def dump_specs(cfg: ModelConfig) -> dict[str, tuple]:
    """key -> shape formula over the registry's symbols, e.g. ("B", "H", "T", "T"); loss -> ()."""
    taps = {s.name: s.shape for s in registry.tap_specs(cfg)}
    out = dict(taps)
    out["loss"] = ()
    out.update({f"grad.{n}": s for n, s in taps.items()})
    out.update({f"grad.{s.name}": s.shape for s in registry.param_specs(cfg)})
    return out


def dump_shapes(cfg: ModelConfig, B: int, T: int) -> dict[str, tuple]:
    taps = registry.tap_shapes(cfg, B, T)
    out = dict(taps)
    out["loss"] = ()
    out.update({f"grad.{n}": s for n, s in taps.items()})
    out.update({f"grad.{n}": s for n, s in registry.param_shapes(cfg).items()})
    return out


def required_keys(cfg: ModelConfig) -> list[str]:
    return ["logits", "loss"] + [f"grad.{s.name}" for s in registry.param_specs(cfg)]


# -- the case directory --------------------------------------------------------------------------------

CASE_README = """\
A test case for your own implementation of the conformance project's transformer
(any language). Written by `python -m tools.layerdiff --export-case DIR` or, per configuration, by
`python -m conformance --impl-cmd '...'`. The whole protocol: docs/your-implementation.md in the
repository; the tap list and shapes: manual/registry.py (tap_specs, param_specs).

Configuration: {label}
    {cfg_line}
    dtype {dtype}; batch B = {B}, sequence length T = {T}; C = {C}, H = {H}, D = C / H = {D}, F = {F},
    V = {V}, L = {L}, S = max_seq_len = {S}.

Files
    checkpoint.safetensors  the parameters, canonical (Hugging Face GPT-2) names, dtype {dtype}; its
                            metadata "config" holds the configuration as JSON (config.json too).
    config.json             the configuration (manual.config.ModelConfig fields).
    ids.npy, targets.npy    the batch, int64 (B, T) = ({B}, {T}); NumPy .npy files.
    names.txt               every key the dump may hold, in comparison order: key, shape, shape formula.
{train_files}
Layouts (no tensor is ever stored transposed)
    Matrices are [in, out]: y = x @ W + b (GPT-2's Conv1D). c_attn.weight is [C, 3C] with the columns
    Q | K | V; head h of Q is columns h*D .. h*D+D-1. transformer.wte.weight is [V, C] and is also the
    output matrix when tie_embeddings is true (logits = ln_f.out @ wte^T; its gradient is the sum of
    both uses); an untied lm_head.weight is [V, C] too. wpe is [S, C]; rows 0..T-1 are used.
    An nn.Linear-style port ([out, in]) must transpose its matrices when reading and when writing.

The model (norm={norm}: {norm_text})
    embed.out = wte[ids] + wpe[0..T-1]
    layer norm: (x - mean) / sqrt(biased variance + {eps}) * weight + bias, over C
    attention: q, k, v (B, H, T, D) from ln_1.out @ c_attn.weight + c_attn.bias;
               att = q @ k^T / sqrt(D), (B, H, T, T), the scaled scores BEFORE the causal mask;
               probs = softmax over keys of att with every key j > query i set to -inf;
               ctx = probs @ v with heads merged back to (B, T, C); out = ctx @ c_proj.weight + bias
    mlp: fc = x @ c_fc.weight + bias (B, T, F); act = {act_text}; out = act @ c_proj.weight + bias
    logits = ln_f.out @ W_out^T (B, T, V)
    loss = {loss_text},
           of logits / {temperature} (temperature), averaged over the positions whose target is not
           PAD = {pad} (PAD positions count neither in the sum nor in the count){heads_text}.

What to write: one forward of ids with targets, one backward of the loss, then ONE file at the path
you are given, safetensors (or .npz), every float tensor in dtype {dtype}, under these keys:
    logits, loss           required; loss has shape () (or (1,))
    grad.<param name>      required, every parameter, e.g. grad.transformer.h.0.mlp.c_fc.weight [C, F]
    <tap name>             optional, each named activation, e.g. h.0.ln_1.out (B, T, C)
    grad.<tap name>        optional, d loss / d tap, e.g. grad.h.0.attn.out. Write them: without them
                           the first gradient that differs can sit downstream of the cause.
Absent optional keys are reported as "not provided". An unknown key is an error (almost always a
misspelt name); so is a wrong shape or dtype. The exact list is names.txt.

Not compared (cannot affect the loss): in h.<i>.attn.att, grad.h.<i>.attn.att and
grad.h.<i>.attn.probs, the entries with key j > query i. Store anything there (-inf, -1e9, 0): it is
ignored, and the report says how many entries each tap excludes. h.<i>.attn.probs is compared
everywhere: its masked entries are exactly 0 in a correct implementation.

Exit status of your program: 0 = dump written; {unsupported} = this configuration is not supported by
your implementation (print why on stderr: it is shown as "unsupported", not as a failure); anything
else = a failure (the tail of stderr is shown).

Every key, in comparison order (taps forward, loss, tap gradients backward, parameter gradients),
with its shape here and its shape formula (names.txt holds the same list):
{keys}"""

TRAIN_FILES = """\
    train/ids.npy, train/targets.npy   {steps} batches, int64 (N, B, T) = ({steps}, {B}, {T}).
    train/optimizer.json               the optimizer of the {{steps}} run (see below).

{{steps}} run: when the command contains {{steps}}, it is run once with {{steps}} = 0 (the dump above)
and once with {{steps}} = {steps}: starting from checkpoint.safetensors, for each batch s of train/:
zero the gradients, forward, backward, {clip_text}optimizer step. Write to the {{out}} path one file with
    losses        ({steps},) the loss of every step, before its update
    <param name>  every parameter after the last step, canonical names and shapes
The optimizer ({kind}, PyTorch's semantics, exact): {opt_text}
Weight decay applies to the names in "decay" of optimizer.json (the matrices); the others get 0.
"""

OPT_TEXT = {
    "sgd": ("g = grad + weight_decay * p; buf = g at the first step, else buf = momentum * buf + g; "
            "p = p - lr * buf.  lr {lr}, momentum {momentum}, weight_decay {weight_decay}."),
    "adamw": ("p = p * (1 - lr * weight_decay); m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; "
              "p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), t = 1, 2, ...  "
              "lr {lr}, betas ({b1}, {b2}), eps {eps}, weight_decay {weight_decay}."),
}


def _optimizer_settings(kind: str) -> tuple[dict, float | None]:
    from .trajectory import OPTIMIZERS
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[kind]


def case_readme(cfg: ModelConfig, B: int, T: int, label: str = "", train_steps: int = 0,
                optimizer: str = TRAIN_OPTIMIZER) -> str:
    s = registry.symbols(cfg, B, T)
    act = {"gelu": "0.5 fc (1 + erf(fc / sqrt 2)) (exact gelu)",
           "gelu_tanh": "0.5 fc (1 + tanh(sqrt(2/pi) (fc + 0.044715 fc^3)))", "relu": "max(fc, 0)"}[cfg.activation]
    loss = {"cross_entropy": "cross entropy -log softmax(z)[target]",
            "brier": "brier sum_v (softmax(z)_v - onehot(target)_v)^2"}[cfg.loss]
    norm_text = ("x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)); then ln_f" if cfg.norm == "pre" else
                 "x = ln_1(x + attn(x)); x = ln_2(x + mlp(x)); then ln_f")
    heads = ("" if cfg.n_future == 1 else
             f"; n_future = {cfg.n_future}: head j = 2..{cfg.n_future} computes mtp.j.out = ln_f.out @ mtp.j.weight "
             f"+ bias and mtp.j.logits = mtp.j.out @ W_out^T, predicting the target j - 1 positions later "
             f"(the last j - 1 positions are PAD); the loss is the mean over the heads that have a non-PAD target")
    if cfg.attention == "flash":
        heads += ("; attention = flash: att and probs are not taps (leave them out)")
    train_files = ""
    if train_steps:
        hp, clip = _optimizer_settings(optimizer)
        b1, b2 = hp.get("betas", (None, None))
        train_files = TRAIN_FILES.format(
            steps=train_steps, B=B, T=T, kind=optimizer,
            clip_text="" if clip is None else (f"clip the gradients to global L2 norm {clip} (scale every gradient "
                                               f"by {clip} / (norm + 1e-6) when that is < 1), "),
            opt_text=OPT_TEXT[optimizer].format(b1=b1, b2=b2, **hp))
    return CASE_README.format(
        label=label or "(none)", cfg_line=cfg.to_json(), dtype=cfg.dtype, B=B, T=T, C=s["C"], H=s["H"], D=s["D"],
        F=s["F"], V=s["V"], L=s["L"], S=s["S"], train_files=train_files, norm=cfg.norm, norm_text=norm_text,
        eps=cfg.ln_eps, act_text=act, loss_text=loss, temperature=cfg.temperature, pad=cfg.pad_id,
        heads_text=heads, unsupported=EXIT_UNSUPPORTED, keys=_key_lines(cfg, B, T, "    "))


def _key_lines(cfg: ModelConfig, B: int, T: int, indent: str = "") -> str:
    """One line per dump key: name, shape, shape formula (names.txt, and the README's list)."""
    shapes, specs = dump_shapes(cfg, B, T), dump_specs(cfg)
    return "".join(f"{indent}{n} {list(shapes[n])} {list(specs[n])}\n" for n, _ in dump_names(cfg))


def write_case(folder, cfg: ModelConfig, params: dict, ids: np.ndarray, targets: np.ndarray, *, label: str = "",
               train_batches: list | None = None, optimizer: str = TRAIN_OPTIMIZER) -> list[Path]:
    """Write a case directory (see CASE_README); returns the files written. With `train_batches`
    [(ids, targets), ...] also train/ for the {steps} run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    B, T = ids.shape
    save_model(folder / CHECKPOINT_NAME, cfg, params)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")
    np.save(folder / "ids.npy", np.asarray(ids, dtype=np.int64))
    np.save(folder / "targets.npy", np.asarray(targets, dtype=np.int64))
    (folder / "names.txt").write_text(_key_lines(cfg, B, T))
    written = [folder / n for n in (CHECKPOINT_NAME, "config.json", "ids.npy", "targets.npy", "names.txt")]
    n_steps = len(train_batches or [])
    if n_steps:
        hp, clip = _optimizer_settings(optimizer)
        (folder / "train").mkdir(exist_ok=True)
        np.save(folder / "train" / "ids.npy", np.stack([np.asarray(i, dtype=np.int64) for i, _ in train_batches]))
        np.save(folder / "train" / "targets.npy", np.stack([np.asarray(t, dtype=np.int64) for _, t in train_batches]))
        decay = registry.decay_groups(cfg, hp["weight_decay"])[0]["names"]
        (folder / "train" / "optimizer.json").write_text(json.dumps(
            {"kind": optimizer, **hp, "clip_grad_norm": clip, "decay": decay, "steps": n_steps}, indent=1) + "\n")
        written += [folder / "train" / n for n in ("ids.npy", "targets.npy", "optimizer.json")]
    (folder / "README.txt").write_text(case_readme(cfg, B, T, label, n_steps, optimizer))
    return written + [folder / "README.txt"]


# -- reading a dump -----------------------------------------------------------------------------------

def load_dump_file(path) -> dict[str, np.ndarray]:
    """Every array of a safetensors or .npz file (told apart by content, not by name). DumpError when the
    file is missing, empty, truncated or neither format."""
    path = Path(path)
    if not path.exists():
        raise DumpError(f"no dump: {path} does not exist")
    if not path.is_file():
        raise DumpError(f"no dump: {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise DumpError(f"empty dump: {path} has 0 bytes")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        try:
            with np.load(path, allow_pickle=False) as z:
                tensors = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise DumpError(f"unreadable dump: {path} ({size} bytes) is a damaged .npz: {exc}") from None
    else:
        with open(path, "rb") as f:
            first = f.read(9)[8:]
        if size < 9 or first != b"{":
            raise DumpError(f"unreadable dump: {path} ({size} bytes) is neither safetensors (8-byte header length, "
                            f"then a JSON header) nor .npz (a zip file)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise DumpError(f"truncated dump: {path} has {size} bytes, its safetensors header alone says {n + 8}")
        with open(path, "rb") as f:
            f.seek(8)
            try:
                header = json.loads(f.read(n))
                need = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                                   default=0)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise DumpError(f"unreadable dump: {path} has a damaged safetensors header: {exc}") from None
        if need > size:
            raise DumpError(f"truncated dump: {path} has {size} bytes, its header describes {need} "
                            f"(did the program stop writing early?)")
        try:
            tensors, _meta = load_tensors(path)
        except CheckpointError as exc:
            raise DumpError(f"unreadable dump: {exc} (expected safetensors or .npz)") from None
    if not tensors:
        raise DumpError(f"empty dump: {path} holds no tensors")
    return tensors


def shape_problem(key: str, got: tuple, want: tuple, formula: tuple = ()) -> str:
    """'wrong shape: KEY is (192, 64), expected (64, 192) [C, 3*C] (transposed? ...)'."""
    got, want = tuple(got), tuple(want)
    text = f"wrong shape: {key} is {got}, expected {want}" + (f" [{', '.join(formula)}]" if formula else "")
    if len(got) >= 2 and got == want[::-1] and got != want:
        text += " (transposed? matrices are stored [in, out]: y = x @ W)"
    elif sorted(got) == sorted(want) and got != want:
        text += " (the same sizes in another order: a different layout?)"
    elif int(np.prod(got)) == int(np.prod(want)):
        text += " (the same number of elements: reshape?)"
    return text


@dataclass
class Dump:
    tensors: dict                 # key -> array, only the well-formed ones (right shape, comparable dtype)
    problems: list                # one line each: unknown keys, wrong shapes, wrong dtypes, missing required keys
    notes: list                   # dtype notes, warnings (no tap gradients)


def check_dump(tensors: dict, cfg: ModelConfig, B: int, T: int, *, strict: bool = True,
               require: bool = True) -> Dump:
    """Sort a dump's arrays into comparable tensors and problems (never raises for content).
    strict: see conventions.dtype_policy; require: missing required keys are a problem (the matrix),
    or not (the debugger compares whatever a dump holds)."""
    shapes, specs = dump_shapes(cfg, B, T), dump_specs(cfg)
    problems, notes, good = [], [], {}
    tensors = dict(tensors)
    if "loss" in tensors and np.asarray(tensors["loss"]).size == 1:
        tensors["loss"] = np.asarray(tensors["loss"]).reshape(())     # a scalar saved as (1,) is the same scalar
    unknown = sorted(set(tensors) - set(shapes))
    if unknown:
        problems.append(f"unknown key(s) ({len(unknown)}): {', '.join(unknown[:6])}" + (" ..." if len(unknown) > 6
                        else "") + f"; the keys are listed in the case's names.txt (e.g. {next(iter(shapes))})")
    dtype_notes = set()
    for key, arr in tensors.items():
        if key not in shapes:
            continue
        arr = np.asarray(arr)
        if arr.shape != shapes[key]:
            problems.append(shape_problem(key, arr.shape, shapes[key], specs[key]))
            continue
        try:
            policy = conventions.dtype_policy(arr.dtype, cfg.dtype, strict=strict, key=key)
        except conventions.DumpDtypeError as exc:
            problems.append(str(exc))
            continue
        if policy.note:
            dtype_notes.add(policy.note)
        good[key] = arr
    notes += sorted(dtype_notes)
    missing = [k for k in required_keys(cfg) if k not in tensors] if require else []
    if missing:
        problems.append(f"required key(s) missing ({len(missing)}): {', '.join(missing[:6])}"
                        + (" ..." if len(missing) > 6 else ""))
    warning = conventions.missing_tap_grads_warning(tensors, cfg)
    if warning:
        notes.append(warning)
    return Dump(good, problems, notes)


def read_dump(path, cfg: ModelConfig, B: int, T: int, *, strict: bool = True, require: bool = True) -> Dump:
    """load_dump_file + check_dump. Raises DumpError when nothing can be read."""
    return check_dump(load_dump_file(path), cfg, B, T, strict=strict, require=require)


# -- comparing: one walk for every implementation under test -------------------------------------------

def compare_tensors(under: dict, ref: dict, cfg: ModelConfig, label: str = "", *, strict: bool = True,
                    names: list | None = None) -> list[Comparison]:
    """Compare `under` (the implementation under test, dump keys) with `ref` (the reference) in walk
    order (dump_names). Keys absent from `under` are skipped (see not_provided); the conventions apply:
    masked attention entries are not compared (counted in extra["excluded"]), a float32 / float64
    mismatch is compared at float32's tolerance when not strict, with a note. A failing row names the
    layer(s) that wrote its tensor (`layer`, conformance/graph.py `where`)."""
    rows = []
    for key, check in (names or dump_names(cfg)):
        if key not in under or key not in ref:
            continue
        c = compare_one(key, under[key], ref[key], check=check, cfg=cfg, label=label, strict=strict)
        if not c.passed:
            c.layer = layer_of(cfg, key)
        rows.append(c)
    return rows


def compare_one(key: str, a, b, *, check: str, cfg: ModelConfig, label: str = "", strict: bool = True,
                step: int | None = None) -> Comparison:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        c = Comparison(config=label, check=check, tensor=key, passed=False, max_abs=math.inf, max_rel=math.inf,
                       shape=tuple(b.shape), dtype=str(b.dtype), step=step,
                       note=shape_problem(key, a.shape, b.shape, dump_specs(cfg).get(key, ())))
        return c
    try:
        policy = conventions.dtype_policy(a.dtype, cfg.dtype, strict=strict, key=key)
    except conventions.DumpDtypeError as exc:
        return Comparison(config=label, check=check, tensor=key, passed=False, shape=tuple(b.shape),
                          dtype=str(a.dtype), step=step, note=str(exc))
    dt = policy.compare_dtype
    if policy.note:                       # compared at the looser dtype; else b keeps its own (compare checks it)
        a, b = a.astype(dt, copy=False), b.astype(dt, copy=False)
    a, b, excluded = conventions.apply_mask(key, a, b)
    note = policy.note
    if excluded:
        note = (note + "; " if note else "") + f"{excluded} masked entries not compared"
    c = compare(a, b, tensor=key, check=check, config=label, step=step, expect_dtype=dt, note=note)
    if excluded:
        c.extra["excluded"] = excluded
        c.extra["excluded_reason"] = conventions.MASK_REASON
    return c


def not_provided(under: dict, cfg: ModelConfig) -> list[dict]:
    """What an implementation under test left out, one entry per group:
    {"check": ..., "what": ..., "count": n, "of": total, "keys": [...]}."""
    out = []
    groups = {"activation": ("taps", []), "activation_grad": ("tap gradients (grad.<tap>)", []),
              "loss": ("loss", []), "param_grad": ("parameter gradients (grad.<param>)", [])}
    for key, check in dump_names(cfg):
        groups[check][1].append(key)
    for check, (what, keys) in groups.items():
        absent = [k for k in keys if k not in under]
        if absent:
            out.append({"check": check, "what": what, "count": len(absent), "of": len(keys), "keys": absent})
    return out


# -- running the command -----------------------------------------------------------------------------

@dataclass
class Run:
    status: str                # "ok", "unsupported", "error"
    message: str = ""
    seconds: float = 0.0


def command_argv(template: str, case_dir, out, steps: int | None = None) -> list[str]:
    """The command as an argument list: split like a shell, then each placeholder replaced inside its
    argument (so a path with spaces stays one argument)."""
    try:
        parts = shlex.split(template)
    except ValueError as exc:
        raise ValueError(f"--impl-cmd {template!r} cannot be split into arguments: {exc}") from None
    if not parts:
        raise ValueError("--impl-cmd is empty; give a command like './my_port {case} {out}'")
    joined = " ".join(parts)
    for ph in ("{case}", "{out}"):
        if ph not in joined:
            raise ValueError(f"--impl-cmd {template!r} has no {ph} placeholder; the program needs "
                             f"{{case}} (the case directory to read) and {{out}} (the dump file to write)")
    subs = {"{case}": str(case_dir), "{out}": str(out), "{steps}": str(steps if steps is not None else 0)}
    argv = []
    for p in parts:
        for ph, value in subs.items():
            p = p.replace(ph, value)
        argv.append(p)
    return argv


def wants_steps(template: str) -> bool:
    return "{steps}" in template


def _tail(text: str) -> str:
    text = (text or "").strip()
    if len(text) > STDERR_TAIL:
        text = "..." + text[-STDERR_TAIL:]
    return text.replace("\n", " | ")


def run_command(template: str, case_dir, out, *, steps: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                cwd=None) -> Run:
    """Run the command once; never raises for what the program does."""
    argv = command_argv(template, case_dir, out, steps)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, cwd=cwd,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        where = (f"no such file, relative to {Path(cwd or '.').resolve()}" if "/" in argv[0] else
                 "not on PATH; give its path, e.g. ./" + argv[0])
        return Run("error", f"command not found: {argv[0]!r} ({where})")
    except PermissionError:
        return Run("error", f"command not executable: {argv[0]!r} (chmod +x, or run it through its interpreter)")
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        return Run("error", f"timeout: no exit after {timeout:g} s (--impl-timeout)"
                            + (f"; stderr: {_tail(err)}" if err else ""), time.perf_counter() - t0)
    except OSError as exc:
        return Run("error", f"cannot run {argv[0]!r}: {exc}")
    dt = time.perf_counter() - t0
    if proc.returncode == EXIT_UNSUPPORTED:
        why = _tail(proc.stderr) or _tail(proc.stdout) or "no reason given"
        return Run("unsupported", why, dt)
    if proc.returncode != 0:
        what = f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        return Run("error", f"exited with {what}; stderr: {_tail(proc.stderr) or '(empty)'}", dt)
    return Run("ok", "", dt)


# -- one configuration -----------------------------------------------------------------------------

@dataclass
class Outcome:
    """What the matrix reports for one configuration of an implementation under test."""
    config: str
    status: str = "compared"            # "compared", "unsupported", "error"
    message: str = ""                   # the one line for "unsupported" / "error"
    rows: list = field(default_factory=list)          # Comparisons (an error is one failing row, check "impl")
    not_provided: list = field(default_factory=list)  # see not_provided()
    notes: list = field(default_factory=list)         # warnings and dtype notes
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "unsupported" or (self.status == "compared" and all(c.passed for c in self.rows))

    def first_failure(self) -> Comparison | None:
        return next((c for c in self.rows if not c.passed), None)

    def as_json(self) -> dict:
        return {"config": self.config, "status": self.status, "message": self.message, "passed": self.passed,
                "not_provided": [{k: v for k, v in n.items() if k != "keys"} | {"keys": n["keys"][:20]}
                                 for n in self.not_provided],
                "notes": self.notes, "seconds": round(self.seconds, 3)}


def failure(config: str, stage: str, message: str) -> Outcome:
    """An outcome whose configuration failed before any comparison: one line."""
    row = Comparison(config=config, check="impl", tensor=stage, passed=False, note=message)
    return Outcome(config, "error", message, rows=[row])


def reference_tensors(cfg: ModelConfig, params: dict, ids, targets) -> dict:
    from .implementation import reference_impl, run_tensors
    return run_tensors(reference_impl(cfg, params), cfg, ids, targets)


def reference_training(cfg: ModelConfig, params: dict, batches, optimizer: str) -> tuple[np.ndarray, dict]:
    from .implementation import reference_impl, train
    hp, clip = _optimizer_settings(optimizer)
    return train(reference_impl(cfg, params), cfg, batches, optimizer, hp, clip)


def compare_training(losses, params: dict, ref_losses, ref_params: dict, cfg: ModelConfig, label: str,
                     strict: bool = True) -> list[Comparison]:
    """Per-step losses and final parameters of a {steps} run (or an in-process optimizer run)."""
    n = len(ref_losses)
    rows = [compare_one("losses", np.asarray(losses, dtype=cfg.dtype), np.asarray(ref_losses, dtype=cfg.dtype),
                        check="optimizer", cfg=cfg, label=label, strict=strict, step=n)]
    for name, ref in ref_params.items():
        if name not in params:
            rows.append(Comparison(config=label, check="optimizer", tensor=name, passed=False, step=n,
                                   note=f"parameter {name} missing after {n} steps"))
            continue
        rows.append(compare_one(name, params[name], ref, check="optimizer", cfg=cfg, label=label, strict=strict,
                                step=n))
    return rows


def check_command(template: str, cfg: ModelConfig, params: dict, ids, targets, *, label: str,
                  train_batches: list | None = None, optimizer: str = TRAIN_OPTIMIZER,
                  timeout: float = DEFAULT_TIMEOUT, workdir=None, keep=None) -> Outcome:
    """Write the case, run the command, read and compare its dump (and its {steps} run). One Outcome.
    `keep`: a folder to write the case and the dump into and leave there (else a temporary one)."""
    t0 = time.perf_counter()
    B, T = np.asarray(ids).shape
    steps_mode = wants_steps(template) and bool(train_batches)
    if keep is not None:                   # a folder the user reads afterwards (--impl-keep)
        tmp = Path(keep)
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="impl-case-", dir=workdir)
    case_dir, out = Path(tmp) / "case", Path(tmp) / "dump.safetensors"
    try:
        write_case(case_dir, cfg, params, ids, targets, label=label,
                   train_batches=train_batches if steps_mode else None, optimizer=optimizer)
        outcome = _run_and_compare(template, cfg, params, ids, targets, case_dir, out, label, B, T, timeout)
        if steps_mode and outcome.status == "compared":
            outcome.rows += _run_steps(template, cfg, params, train_batches, optimizer, case_dir, Path(tmp),
                                       label, timeout)
    finally:
        if keep is None:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _run_and_compare(template, cfg, params, ids, targets, case_dir, out, label, B, T, timeout) -> Outcome:
    run = run_command(template, case_dir, out, steps=0, timeout=timeout)
    if run.status == "unsupported":
        return Outcome(label, "unsupported", run.message)
    if run.status == "error":
        return failure(label, "command", run.message)
    try:
        dump = read_dump(out, cfg, B, T, strict=True)
    except DumpError as exc:
        return failure(label, "dump", str(exc))
    ref = reference_tensors(cfg, params, ids, targets)
    outcome = Outcome(label, rows=compare_tensors(dump.tensors, ref, cfg, label, strict=True),
                      not_provided=[n for n in not_provided(dump.tensors, cfg) if n["check"] in
                                    ("activation", "activation_grad")],
                      notes=list(dump.notes))
    # a malformed dump fails the configuration: one row per problem, ahead of the comparisons
    outcome.rows[:0] = [Comparison(config=label, check="impl", tensor="dump", passed=False, note=p)
                        for p in dump.problems]
    return outcome


def _run_steps(template, cfg, params, batches, optimizer, case_dir, tmp, label, timeout) -> list[Comparison]:
    n = len(batches)
    out = tmp / "train.safetensors"
    run = run_command(template, case_dir, out, steps=n, timeout=timeout)
    if run.status != "ok":      # exit 3 here: the program trains no steps although it ran the forward
        return [Comparison(config=label, check="optimizer", tensor=f"{{steps}}={n}", passed=False,
                           note=run.message if run.status == "error" else f"unsupported with {{steps}}={n}: "
                                                                            f"{run.message}")]
    try:
        got = load_dump_file(out)
    except DumpError as exc:
        return [Comparison(config=label, check="optimizer", tensor=f"{{steps}}={n}", passed=False, note=str(exc))]
    known = set(registry.param_shapes(cfg)) | {"losses"}
    problems = []
    unknown = sorted(set(got) - known)
    if unknown:
        problems.append(f"unknown key(s) in the {{steps}} dump: {', '.join(unknown[:6])} (expected losses and "
                        f"the parameter names)")
    if "losses" not in got:
        problems.append(f"the {{steps}} dump has no 'losses' ({n},)")
    rows = [Comparison(config=label, check="optimizer", tensor="dump", passed=False, note=p) for p in problems]
    ref_losses, ref_params = reference_training(cfg, params, batches, optimizer)
    losses = np.asarray(got.get("losses", np.full((0,), np.nan))).reshape(-1)
    return rows + compare_training(losses, got, ref_losses, ref_params, cfg, label)


def read_case(folder) -> tuple[ModelConfig, dict, np.ndarray, np.ndarray]:
    """(cfg, params, ids, targets) of a case directory written by write_case."""
    folder = Path(folder)
    if not (folder / CHECKPOINT_NAME).is_file():
        raise ValueError(f"{folder} is not a case directory: no {CHECKPOINT_NAME} (write one with --export-case)")
    cfg, params, _extras, _meta = load_model(folder / CHECKPOINT_NAME)
    ids = np.load(folder / "ids.npy", allow_pickle=False)
    targets = np.load(folder / "targets.npy", allow_pickle=False)
    return cfg, params, ids, targets


# -- the matrix: every configuration, one line each ----------------------------------------------------

@dataclass
class MatrixJob:
    """One configuration of an --impl / --impl-cmd run (picklable: it travels to a worker process)."""
    case: object                        # conformance.engine.Case
    impl: str | None = None             # 'package.module:factory' (in process)
    cmd: str | None = None              # the command template (outside program)
    timeout: float = DEFAULT_TIMEOUT
    steps: int = TRAIN_STEPS            # optimizer steps ({steps} mode / the "optimizer" capability); 0: none
    optimizer: str = TRAIN_OPTIMIZER
    keep: str | None = None             # folder for the case and dump (outside programs)


def run_job(job: MatrixJob) -> Outcome:
    """One configuration: the case's weights (engine.init_params: registry.init_params(cfg, seed), scaled
    as the case says, so the stress variants stress the implementation under test too) and batch
    (engine.make_batch)."""
    from .engine import init_params, make_batch, trajectory_batches
    case = job.case
    cfg, label = case.cfg, case.name()
    params = init_params(case)
    ids, targets = make_batch(cfg, case.batch, case.T, case.seed, case.pad)
    batches = trajectory_batches(case, job.steps) if job.steps else None
    keep = None if job.keep is None else Path(job.keep) / label.replace("/", "_")
    if job.impl is not None:
        from .implementation import ImplementationError, check_impl, load_impl
        try:
            factory = load_impl(job.impl)
        except ImplementationError as exc:
            return failure(label, "load", str(exc))
        t0 = time.perf_counter()
        out = check_impl(factory, cfg, params, ids, targets, label=label, train_batches=batches,
                         optimizer=job.optimizer, keep=keep)
        out.seconds = time.perf_counter() - t0
        return out
    return check_command(job.cmd, cfg, params, ids, targets, label=label, train_batches=batches,
                         optimizer=job.optimizer, timeout=job.timeout, keep=keep)


def first_divergent(outcome: Outcome, cfg: ModelConfig) -> str:
    """'first divergent: grad.h.2.out (activation_grad), written by ln_f (manual/layers/layernorm.py:
    layernorm_backward) at (2, 6, 6): ...': the first failing tensor in walk order and the layer that wrote
    it (conformance/graph.py, the debugger's graph)."""
    c = outcome.first_failure()
    if c is None:
        return ""
    if c.check == "impl":
        return c.note
    where = f", written by {c.layer}" if c.layer else ""
    step = f" at step {c.step}" if c.check == "optimizer" and c.step is not None else ""
    index = f" at {tuple(c.worst_index)}: {c.a_value!r} vs reference {c.b_value!r}" if c.worst_index else ""
    note = f" [{c.note}]" if c.note else ""
    return f"first divergent: {c.tensor}{step} ({c.check}){where}{index}{note}"


MATRIX_HEADER = f"{'config':<32} {'result':<12} detail"


def outcome_lines(o: Outcome, cfg: ModelConfig, verbose: int = 0) -> list[str]:
    """The line of one configuration (ok / FAIL / ERROR / unsupported); with verbose, its failing
    comparisons (-vv: every comparison) below it."""
    n = len(o.rows)
    if o.status == "unsupported":
        result, detail = "unsupported", o.message
    elif o.status == "error":
        result, detail = "ERROR", o.message
    elif o.passed:
        result, detail = "ok", f"{n} comparisons agree ({o.seconds:.1f} s)"
    else:
        result = "FAIL"
        detail = f"{sum(not c.passed for c in o.rows)} of {n} differ; " + first_divergent(o, cfg)
    lines = [f"{o.config:<32} {result:<12} {detail}"]
    if verbose and o.status == "compared":
        lines += ["    " + c.line() for c in (o.rows if verbose > 1 else [c for c in o.rows if not c.passed])]
    return lines


def print_summary(outcomes: list[Outcome], *, keep: str | None = None, out=None) -> bool:
    """After the configurations' lines: what was not provided, the notes, the masked entries not
    compared, and a verdict. Returns True when every configuration passed or was declared unsupported
    and at least one was compared."""
    import sys
    out = out or sys.stdout
    missing = [(o.config, n) for o in outcomes for n in o.not_provided]
    if missing:
        print("\nnot provided (not compared, never counted as passed):", file=out)
        by_what: dict[str, list] = {}
        for config, n in missing:
            by_what.setdefault(f"{n['what']}" + (f": {n['count']} of {n['of']} keys" if n["keys"] else ""),
                               []).append(config)
        for what, configs in by_what.items():
            shown = ", ".join(configs) if len(configs) <= 4 else f"{len(configs)} configurations"
            print(f"  {what}  [{shown}]", file=out)
    notes = {note for o in outcomes for note in o.notes}
    for note in sorted(notes):
        print("\n" + note, file=out)
    excluded = {}
    for o in outcomes:
        for c in o.rows:
            if c.extra.get("excluded"):
                excluded.setdefault(re.sub(r"h\.\d+\.", "h.*.", c.tensor), (c.extra["excluded"], int(np.prod(c.shape))))
    if excluded:
        print(f"\nentries not compared ({conventions.MASK_REASON}):", file=out)
        for key, (n, total) in excluded.items():
            print(f"  {key}: {n} of {total} entries (first configuration)", file=out)
    compared = [o for o in outcomes if o.status != "unsupported"]
    bad = [o for o in outcomes if not o.passed]
    unsupported = [o for o in outcomes if o.status == "unsupported"]
    passed = not bad and bool(compared)
    print("-" * 100, file=out)
    print(f"{'PASSED' if passed else 'FAILED'}: {len(compared) - len(bad)} of {len(compared)} configurations agree"
          + (f", {len(unsupported)} declared unsupported" if unsupported else "")
          + ("" if compared else " (nothing was compared)"), file=out)
    first = next((o for o in bad if o.status == "compared"), None)
    if keep and first is not None:
        d = Path(keep) / first.config.replace("/", "_")
        print(f"locate the layer and the wrong side: python -m tools.layerdiff --case {d / 'case'} "
              f"--against {d / 'dump.safetensors'}", file=out)
    return passed


def matrix_json(outcomes: list[Outcome], under_test: str) -> dict:
    """The report's JSON: today's {"passed", "checks"} plus one entry per configuration."""
    compared = [o for o in outcomes if o.status != "unsupported"]
    return {"passed": bool(compared) and all(o.passed for o in outcomes), "under_test": under_test,
            "configurations": [o.as_json() for o in outcomes],
            "unsupported": [{"config": o.config, "reason": o.message} for o in outcomes if o.status == "unsupported"],
            "checks": [c.as_json() for o in outcomes for c in o.rows]}


def add_arguments(p) -> None:
    """The command-line flags of `python -m conformance` for an implementation under test."""
    g = p.add_argument_group("your implementation under test (docs/your-implementation.md)")
    g.add_argument("--impl", metavar="MODULE:FACTORY",
                   help="run the matrix on a Python implementation: factory(cfg, params) -> model "
                        "(conformance/implementation.py)")
    g.add_argument("--impl-cmd", metavar="'CMD {case} {out}'",
                   help="run the matrix on an outside program: per configuration it reads the case folder "
                        "{case} and writes the dump file {out}; with {steps} it also trains")
    g.add_argument("--impl-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds per run of --impl-cmd (default {DEFAULT_TIMEOUT:g})")
    g.add_argument("--impl-steps", type=int, default=TRAIN_STEPS, metavar="N",
                   help=f"optimizer steps compared ({{steps}} mode / the optimizer capability; default {TRAIN_STEPS}, "
                        f"0: none)")
    g.add_argument("--impl-optimizer", choices=("sgd", "adamw"), default=TRAIN_OPTIMIZER,
                   help=f"the optimizer of those steps (default {TRAIN_OPTIMIZER})")
    g.add_argument("--impl-keep", metavar="DIR",
                   help="keep every configuration's case folder and dump (the program's, or the tensors of "
                        "--impl) under DIR, for python -m tools.layerdiff --case ... --against ...")


def matrix_main(p, args, cases: list, initializer=None) -> int:
    """`python -m conformance --impl ... | --impl-cmd ...`: the matrix on an implementation under test.
    Exit status 0 when every configuration agrees or is declared unsupported, 1 otherwise, 2 on bad flags."""
    import json as _json
    from concurrent.futures import ProcessPoolExecutor

    if args.impl and args.impl_cmd:
        p.error("give --impl or --impl-cmd, not both")
    if args.check:
        p.error("--check does not apply to --impl / --impl-cmd: every tensor the implementation provides is compared")
    if args.impl_timeout <= 0:
        p.error(f"--impl-timeout must be > 0 seconds, got {args.impl_timeout:g}")
    if args.impl_steps < 0:
        p.error(f"--impl-steps must be >= 0, got {args.impl_steps}")
    if args.impl:
        from .implementation import ImplementationError, load_impl
        try:
            load_impl(args.impl)
        except ImplementationError as exc:
            p.error(f"--impl: {exc}")
        under_test = args.impl
    else:
        try:
            command_argv(args.impl_cmd, "case", "out")
        except ValueError as exc:
            p.error(str(exc))
        under_test = args.impl_cmd
    steps = args.impl_steps if (args.impl or wants_steps(args.impl_cmd)) else 0
    jobs = [MatrixJob(case, impl=args.impl, cmd=args.impl_cmd, timeout=args.impl_timeout, steps=steps,
                      optimizer=args.impl_optimizer, keep=args.impl_keep) for case in cases]
    t0 = time.perf_counter()
    print(f"conformance of {under_test} against the reference (reference/, PyTorch), {len(cases)} configurations")
    print(MATRIX_HEADER + "\n" + "-" * 100, flush=True)
    outcomes = []
    pool = ProcessPoolExecutor(max_workers=args.jobs, initializer=initializer) if args.jobs > 1 and len(jobs) > 1 \
        else None
    try:   # each configuration's line as soon as it and those before it are done (matrix order)
        for case, o in zip(cases, pool.map(run_job, jobs) if pool else map(run_job, jobs)):
            outcomes.append(o)
            print("\n".join(outcome_lines(o, case.cfg, args.verbose)), flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    passed = print_summary(outcomes, keep=args.impl_keep)
    print(f"({len(cases)} configurations, {time.perf_counter() - t0:.1f} s)")
    if args.json:
        Path(args.json).write_text(_json.dumps(matrix_json(outcomes, under_test), indent=1))
        print(f"wrote {args.json}")
    return 0 if passed else 1
