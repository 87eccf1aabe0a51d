"""The conformance engine: one checkpoint, two implementations, every named tensor compared.

For one `Case` (a config, a seed and a batch shape) `run_case` does, in this order:

    1. writes one checkpoint (manual.checkpoint.save_model of registry.init_params(cfg, seed))
       and loads it into manual.Model and reference.Model;
    2. param_count       manual = reference = closed form, per tensor and in total;
    3. logits, loss      one forward on identical ids and targets (PAD among the targets);
    4. activation        every tap, in forward order;
    5. activation_grad   every tap gradient, in backward order; param_grad every parameter gradient;
    6. optimizer         20 steps of AdamW (decay groups + global-norm clipping) and 20 of SGD
                         with momentum, from the same checkpoint and batches: loss, every
                         parameter and every piece of optimizer state after each step
                         (conformance/trajectory.py, the loop the debugger walks too);
    7. generation        greedy 30 tokens, and temperature + top-k sampling driven by one shared
                         stream of uniform draws, token for token;
    8. memory            parameter / gradient / optimizer-state bytes equal in both and equal to
                         closed forms; manual activation bytes equal to manual/memory.py's closed
                         form; manual / reference (autograd saved tensors) ratio <= 1; tracemalloc
                         peak of forward + backward within 10% of the predicted peak.
    9. training          (cases with train_steps > 0) both trained for train_steps steps with the
                         same loop, data order and schedule (conformance/training.py): the loss of
                         every step and every weight at the end.

Every comparison goes through conformance.compare.compare (or compare_exact for integers).
The manual side is the one under test (`a`), the reference is `b`.

`Sides` lets a caller swap in another implementation for the manual side (the gradient
debugger's fault injection does exactly that), so the suite's failure can be proved.
"""
from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from manual import registry
from manual.checkpoint import save_model
from manual.config import ModelConfig

from . import external, trajectory
from .compare import Comparison, compare_exact, missing

CHECKS = ("param_count", "logits", "loss", "activation", "activation_grad", "param_grad",
          "accumulate", "optimizer", "generation", "memory", "recompute", "training")

OPT_STEPS = 20
GEN_TOKENS = 30


@dataclass
class Case:
    label: str
    cfg: ModelConfig
    seed: int = 0
    batch: int = 2
    seq_len: int | None = None       # None: max_seq_len
    pad: bool | str = True           # PAD among the targets: True/'tail', False/'none', or a PAD_PATTERNS name
    opt_steps: int = OPT_STEPS
    gen_tokens: int = GEN_TOKENS
    train_steps: int = 0             # > 0: also the long training-equivalence check (float64 only)
    flash_block: int | None = None   # keys per block of the manual side's flash attention (None: its default)
    weight_scale: dict = field(default_factory=dict)   # parameter-name suffix -> factor applied at init (stress)
    optimizers: tuple = trajectory.DEFAULT_OPTIMIZERS  # kinds of trajectory.OPTIMIZERS the optimizer check runs
    manual_kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the manual side's load (workspace=True)

    @property
    def T(self) -> int:
        return self.cfg.max_seq_len if self.seq_len is None else self.seq_len

    def name(self) -> str:
        return f"{self.label}/{self.cfg.dtype[-2:]}"


@dataclass
class Sides:
    """The two implementations being compared (classes with the Model interface)."""
    manual: type = None
    reference: type = None
    manual_optim: object = None      # module with SGD, AdamW, clip_grad_norm_
    manual_generate: object = None
    notes: dict = field(default_factory=dict)

    @classmethod
    def default(cls) -> "Sides":
        import manual
        import manual.optim
        import manual.sampling
        import reference
        return cls(manual=manual.Model, reference=reference.Model, manual_optim=manual.optim,
                   manual_generate=manual.sampling.generate)


# -- data -------------------------------------------------------------------------------

PAD_PATTERNS = ("tail", "none", "scatter", "row", "first")


def make_batch(cfg: ModelConfig, B: int, T: int, seed: int, pad: bool | str = True):
    """Identical ids and targets for both sides. Targets avoid PAD except where placed on purpose:
    pad True/'tail': the tail of the last row; False/'none': nowhere; 'scatter': every third
    position; 'row': the whole first row (a row that adds nothing to the loss); 'first': all but the
    first position of every row (the heads for 2+ tokens ahead get no target at all)."""
    pattern = {True: "tail", False: "none"}.get(pad, pad)
    if pattern not in PAD_PATTERNS:
        raise ValueError(f"pad pattern {pad!r} is not one of {PAD_PATTERNS} (or True / False)")
    rng = np.random.default_rng(10_000 + seed)
    ids = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)              # (B, T)
    non_pad = np.array([v for v in range(cfg.vocab_size) if v != cfg.pad_id], dtype=np.int64)
    targets = non_pad[rng.integers(0, len(non_pad), size=(B, T))] if len(non_pad) else \
        np.full((B, T), cfg.pad_id, dtype=np.int64)                                 # (B, T)
    if pattern == "tail" and T > 1:
        # the tail of the last row is padding, as a short final window would be
        targets[-1, T - max(1, T // 4):] = cfg.pad_id
    elif pattern == "scatter":
        targets.reshape(-1)[::3] = cfg.pad_id
    elif pattern == "row":
        targets[0] = cfg.pad_id
    elif pattern == "first":
        targets[:, 1:] = cfg.pad_id
    return ids, targets


# -- the checks -------------------------------------------------------------------------------

def check_param_count(case, m, r) -> list[Comparison]:
    cfg, out = case.cfg, []
    closed = registry.param_count_closed_form(cfg)
    out.append(compare_exact(m.num_params(), closed, tensor="total (manual vs closed form)",
                             check="param_count", config=case.name()))
    out.append(compare_exact(r.num_params(), closed, tensor="total (reference vs closed form)",
                             check="param_count", config=case.name()))
    for spec in registry.param_specs(cfg):
        shape = registry.resolve(spec, cfg)
        want = int(np.prod(shape))
        a = m.params[spec.name].size if spec.name in m.params else -1
        b = r.params[spec.name].size if spec.name in r.params else -1
        c = compare_exact(a, b, tensor=spec.name, check="param_count", config=case.name())
        if c.passed and a != want:
            c.passed, c.note = False, f"both sides have {a} elements, the registry says {want} {shape}"
        out.append(c)
    extra = sorted((set(m.params) | set(r.params)) - {s.name for s in registry.param_specs(cfg)})
    for name in extra:
        out.append(Comparison(config=case.name(), check="param_count", tensor=name, passed=False,
                              note="parameter not in the registry"))
    return out


FB_CHECKS = ("logits", "loss", "activation", "activation_grad", "param_grad")


def walk_names(cfg: ModelConfig, want=CHECKS) -> list[tuple[str, str]]:
    """(dump key, check) of the forward + backward checks in `want`, in the walk order of
    external.dump_names (taps forward, loss, tap gradients backward, parameter gradients backward);
    the logits are compared once more under their own check, right after the taps."""
    names = [(k, c) for k, c in external.dump_names(cfg) if c in want]
    if "logits" in want:
        at = next((i for i, (k, c) in enumerate(names) if c != "activation"), len(names))
        names.insert(at, ("logits", "logits"))
    return names


def fb_tensors(model, loss, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A model's last forward (+ backward) keyed as in a dump: <tap>, loss (the value forward returned,
    in cfg.dtype), grad.<tap>, grad.<param>. No copies."""
    out = {"logits": model.logits, **model.taps, "loss": np.asarray(loss, dtype=np.dtype(cfg.dtype))}
    out.update({f"grad.{n}": v for n, v in model.tap_grads.items()})
    out.update({f"grad.{n}": v for n, v in model.grads.items()})
    return out


def check_forward_backward(case, m, r, ids, targets, want=CHECKS) -> list[Comparison]:
    """logits, loss, activation, activation_grad, param_grad: the debugger's walk
    (external.compare_tensors, tools/layerdiff/walk.py) over both sides' tensors, in walk order.
    Rows name the tensor as the registry does (a gradient's row: check activation_grad / param_grad,
    tensor without "grad."); a failing row carries the layer that wrote it (`layer`)."""
    cfg = case.cfg
    m.zero_grad()
    r.zero_grad()
    loss_manual = m.forward(ids, targets)
    loss_reference = r.forward(ids, targets)
    if "activation_grad" in want or "param_grad" in want:
        m.backward()
        r.backward()
    names = walk_names(cfg, want)
    a, b = fb_tensors(m, loss_manual, cfg), fb_tensors(r, loss_reference, cfg)
    a = {k: a.get(k, missing()) for k, _ in names}     # a tensor one side lacks fails as a shape mismatch
    b = {k: b.get(k, missing()) for k, _ in names}
    out = external.compare_tensors(a, b, cfg, case.name(), names=names)
    for c in out:
        if c.check in ("activation_grad", "param_grad"):
            c.tensor = c.tensor[len("grad."):]
    return out


def check_accumulate(case, m, r) -> list[Comparison]:
    """Gradient accumulation: zero_grad, then two forward + backward passes on two batches, with no
    zero_grad between (as micro-batches are run). Every parameter gradient must be the sum of both on
    each side: a backward that assigns (`=`) where it must add (`+=`) passes every single-backward check
    when the gradients start at zero, and fails this one."""
    from .compare import compare
    m.zero_grad()
    r.zero_grad()
    for ids, targets in trajectory_batches(case, 2):
        m.forward(ids, targets)
        r.forward(ids, targets)
        m.backward()
        r.backward()
    return [compare(m.grads[s.name], r.grads[s.name], tensor=f"{s.name} grad (accumulated over 2 backward passes)",
                    check="accumulate", config=case.name(), expect_dtype=np.dtype(case.cfg.dtype))
            for s in reversed(registry.param_specs(case.cfg))]


def trajectory_batches(case: Case, n: int):
    return [make_batch(case.cfg, case.batch, case.T, case.seed + 1 + s, case.pad) for s in range(n)]


def check_optimizer(case, path, sides: Sides) -> list[Comparison]:
    """case.opt_steps steps of every optimizer of trajectory.OPTIMIZERS (AdamW with decay groups and
    clipping, SGD with momentum) from one checkpoint (conformance/trajectory.py). Per tensor: its
    first failing step if it ever fails, else its worst passing step."""
    batches = trajectory_batches(case, case.opt_steps)
    out = []
    for kind in case.optimizers:
        m = load_manual(case, path, sides)
        r = sides.reference.load(path)
        worst: dict[str, Comparison] = {}
        for step in trajectory.run(sides.manual_optim, m, r, kind, batches, label=case.name()):
            for c in step.rows:
                old = worst.get(c.tensor)
                if old is None or (old.passed and not c.passed) or \
                        (old.passed and c.passed and c.badness > old.badness):
                    worst[c.tensor] = c
        out += list(worst.values())
    return out


def check_generation(case, m, r, sides: Sides) -> list[Comparison]:
    from reference.sampling import generate as rgen

    cfg, lab = case.cfg, case.name()
    prompt = make_batch(cfg, 1, min(4, cfg.max_seq_len), case.seed + 99, pad=False)[0][0]
    out = []
    for label, kw in (("greedy", dict(temperature=0.0)),
                      ("sample_t0.8_k10", dict(temperature=0.8, top_k=min(10, cfg.vocab_size), seed=case.seed))):
        a = sides.manual_generate(m, prompt, case.gen_tokens, **kw)
        b = rgen(r, prompt, case.gen_tokens, **kw)
        c = compare_exact(a, b, tensor=f"tokens.{label}", check="generation", config=lab)
        if not c.passed:
            first = int(np.nonzero(a != b)[0][0]) if a.shape == b.shape else -1
            c.note = f"first different token at position {first}"
        out.append(c)
    return out


def check_memory(case, path, m, r, ids, targets, sides: Sides) -> list[Comparison]:
    """Bytes by category (conformance/memory.py holds the accounting and the closed forms)."""
    from . import memory
    return memory.memory_checks(case, path, m, r, ids, targets, sides)


# -- one case ---------------------------------------------------------------------------------

def load_manual(case: Case, path, sides: Sides):
    """The manual side of `case` from the checkpoint at `path` (with the case's flash block, if set, and
    its manual_kwargs)."""
    kwargs = dict(case.manual_kwargs)
    if case.flash_block is not None:
        kwargs["flash_block"] = case.flash_block
    return sides.manual.load(path, **kwargs)


def init_params(case: Case) -> dict:
    """The case's initial weights: registry.init_params, times case.weight_scale by name suffix."""
    params = registry.init_params(case.cfg, case.seed)
    for name, arr in params.items():
        for suffix, factor in case.weight_scale.items():
            if name.endswith(suffix):
                arr *= arr.dtype.type(factor)
    return params


def run_case(case: Case, checks=CHECKS, sides: Sides | None = None, workdir=None) -> list[Comparison]:
    sides = sides or Sides.default()
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; choose from {CHECKS}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "case.safetensors"
        save_model(path, case.cfg, init_params(case))
        m = load_manual(case, path, sides)
        r = sides.reference.load(path)
        ids, targets = make_batch(case.cfg, case.batch, case.T, case.seed, case.pad)
        out: list[Comparison] = []
        if "param_count" in checks:
            out += check_param_count(case, m, r)
        if set(checks) & set(FB_CHECKS):
            out += check_forward_backward(case, m, r, ids, targets, checks)
        if "accumulate" in checks:
            out += check_accumulate(case, m, r)
        if "optimizer" in checks:
            out += check_optimizer(case, path, sides)
        if "generation" in checks:
            out += check_generation(case, m, r, sides)
        if "memory" in checks:
            out += check_memory(case, path, m, r, ids, targets, sides)
        if "recompute" in checks:
            from .memory import recompute_checks
            out += recompute_checks(case, path, ids, targets, sides)
        if "training" in checks and case.train_steps > 0:
            from .training import training_equivalence
            out += training_equivalence(case.cfg, steps=case.train_steps, seed=case.seed,
                                        label=f"{case.name()}.train{case.train_steps}")
        del m, r
        gc.collect()
    return out
