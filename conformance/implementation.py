"""The interface an implementation under test gives the conformance suite. Read top to bottom.

    python -m conformance --impl mypackage.mymodule:make_model

runs the conformance matrix on your implementation, with the PyTorch reference (reference/) as the
oracle. `make_model` is a factory: `make_model(cfg, params)` returns an object with the members
below (a class with a `from_params(cfg, params)` classmethod works too: `manual:Model` is one).
For a program in another language, see conformance/external.py and docs/your-implementation.md.

What the factory receives
    cfg      manual.config.ModelConfig, a frozen dataclass: vocab_size, d_model, n_heads, d_ff,
             n_layers, max_seq_len, norm ('pre' | 'post'), activation ('gelu' exact erf | 'gelu_tanh'
             | 'relu'), bias, tie_embeddings, ln_eps, n_future, attention ('standard' | 'flash'),
             dtype ('float32' | 'float64'), pad_id, loss ('cross_entropy' | 'brier'), temperature.
    params   {canonical name: np.ndarray in cfg.dtype}, the names and shapes of
             manual.registry.param_specs(cfg) (Hugging Face GPT-2 names; matrices stored [in, out],
             y = x @ W + b; wte and an untied lm_head [V, C], logits = x @ W^T). Copy what you keep.
    A configuration you do not implement: raise `Unsupported("why")` from the factory. It is listed
    as unsupported in the report, not as a failure.

Required members (every implementation)
    forward(ids, targets=None) -> float | None
             ids, targets: (B, T) int64 arrays. Runs the model; with targets returns the loss:
             the mean over non-PAD targets (targets == cfg.pad_id are ignored) of the cross entropy
             (or brier) of logits / cfg.temperature, averaged over the prediction heads that have a
             target (n_future > 1 adds heads predicting 2..n_future tokens ahead).
    backward() -> None
             d loss / d every parameter, ACCUMULATED (+=) into grads, as in PyTorch.
    zero_grad() -> None
             every gradient to zero.
    params   {name: np.ndarray}, the parameters (canonical names, cfg.dtype).
    grads    {name: np.ndarray}, d loss / d param, same names and shapes as params.
    logits   (B, T, V) np.ndarray of the last forward, head 1 (next token).
    loss     float, the loss of the last forward with targets.

Optional capabilities (found by the members below, or declared exactly in a `capabilities` set;
a capability you do not have is reported as "not provided", never counted as passed)
    "taps"        taps: {tap name: np.ndarray} of the last forward, the names and shapes of
                  manual.registry.tap_specs(cfg) (e.g. "h.0.ln_1.out" (B, T, C)). A subset is fine;
                  absent taps are listed as not provided. See conformance/conventions.py for the
                  attention entries that are not compared.
    "tap_grads"   tap_grads: {tap name: d loss / d tap} of the last backward (not accumulated).
                  Without them, the first differing parameter gradient can sit downstream of the cause.
    "generation"  generate(prompt, max_new_tokens, temperature=1.0, top_k=None, seed=0) -> (N,) int64
                  the new token ids; sampling must follow manual/sampling.py exactly (one shared
                  stream of uniform draws, manual.sampling.uniform_stream(seed, n)).
    "optimizer"   make_optimizer(kind, groups, **hyper) -> an object with step(), where kind is
                  'adamw' or 'sgd' (PyTorch's AdamW / SGD with momentum semantics, the
                  hyperparameters of conformance.trajectory.OPTIMIZERS), groups is
                  manual.registry.decay_groups(cfg, weight_decay) (which names get weight decay);
                  and clip_grad_norm(max_norm) -> float: scale every gradient by
                  max_norm / (norm + 1e-6) when that is < 1, return the norm before clipping.
                  If the optimizer has state_dict() -> ({"optim.<state>.<param>": array}, meta), its
                  state is compared too.

`manual.Model` and `reference.Model` satisfy the required members as they are. `manual_impl` and
`reference_impl` below wrap them with every optional capability: `--impl conformance.implementation:manual_impl`
runs the matrix on manual/ through this interface (the suite's self-test of this path).
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from manual.config import ModelConfig

REQUIRED = ("forward", "backward", "zero_grad", "params", "grads", "logits", "loss")
REQUIRED_METHODS = ("forward", "backward", "zero_grad")

# capability -> the members that provide it
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "taps": ("taps",),
    "tap_grads": ("tap_grads",),
    "generation": ("generate",),
    "optimizer": ("make_optimizer", "clip_grad_norm"),
}


@runtime_checkable
class Implementation(Protocol):
    """The required members (see the module docstring for their exact meaning)."""
    params: dict
    grads: dict
    logits: np.ndarray | None
    loss: float | None

    def forward(self, ids: np.ndarray, targets: np.ndarray | None = None) -> float | None: ...

    def backward(self) -> None: ...

    def zero_grad(self) -> None: ...


class Unsupported(Exception):
    """Raised by a factory for a configuration the implementation does not implement; the message says why."""


class ImplementationError(ValueError):
    """An implementation that cannot be loaded or lacks required members; the message lists the problems."""


Factory = Callable[[ModelConfig, dict], object]


# -- loading ----------------------------------------------------------------------------------------

def load_impl(spec: str) -> Factory:
    """'package.module:factory' -> a factory(cfg, params). Every failure is an ImplementationError
    whose message names the module or attribute and what was expected."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ImplementationError(f"--impl expects 'package.module:factory' (e.g. 'mypkg.model:make_model'), "
                                  f"got {spec!r}")
    mod_name, attr_path = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise ImplementationError(f"module {mod_name!r} not found (is its folder on PYTHONPATH, or the package "
                                      f"installed?)") from None
        raise ImplementationError(f"importing {mod_name!r} failed: {exc}") from None
    except Exception as exc:   # the user's module raised while importing: say so in one line
        raise ImplementationError(f"importing {mod_name!r} raised {type(exc).__name__}: {exc}") from None
    obj, walked = module, mod_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            raise ImplementationError(f"{walked!r} has no attribute {part!r}; it has: {', '.join(public[:20])}"
                                      + (" ..." if len(public) > 20 else ""))
        obj, walked = getattr(obj, part), f"{walked}.{part}"
    if inspect.isclass(obj):
        if callable(getattr(obj, "from_params", None)):
            return obj.from_params
        return obj
    if not callable(obj):
        raise ImplementationError(f"{spec!r} is a {type(obj).__name__}, not callable; it must be a factory "
                                  f"factory(cfg, params) -> implementation, or a class")
    return obj


def construct(factory: Factory, cfg: ModelConfig, params: dict):
    """factory(cfg, params), checked. Unsupported passes through; any other exception, and an object
    without the required members, becomes an ImplementationError naming what is wrong."""
    try:
        impl = factory(cfg, {k: np.array(v, copy=True) for k, v in params.items()})
    except Unsupported:
        raise
    except Exception as exc:
        raise ImplementationError(f"the factory raised {type(exc).__name__}: {exc}") from None
    check_members(impl)
    return impl


def check_members(impl) -> None:
    """Raise ImplementationError listing every required member `impl` lacks (and every declared
    capability whose members are missing)."""
    missing = [name for name in REQUIRED if not hasattr(impl, name)]
    not_callable = [name for name in REQUIRED_METHODS if hasattr(impl, name) and not callable(getattr(impl, name))]
    problems = []
    if missing:
        problems.append(f"missing required member(s) {', '.join(missing)}")
    if not_callable:
        problems.append(f"not callable: {', '.join(not_callable)}")
    declared = getattr(impl, "capabilities", None)
    if declared is not None:
        unknown = sorted(set(declared) - set(CAPABILITIES))
        if unknown:
            problems.append(f"unknown capabilities {unknown} (known: {sorted(CAPABILITIES)})")
        for cap in sorted(set(declared) & set(CAPABILITIES)):
            lacking = [m for m in CAPABILITIES[cap] if not hasattr(impl, m)]
            if lacking:
                problems.append(f"declares capability {cap!r} but has no {', '.join(lacking)}")
    if problems:
        raise ImplementationError(f"{type(impl).__name__} is not an Implementation: " + "; ".join(problems)
                                  + f" (required: {', '.join(REQUIRED)}; see conformance/implementation.py)")


def capabilities_of(impl) -> frozenset[str]:
    """The optional capabilities `impl` has: its `capabilities` declaration, else those whose members exist."""
    declared = getattr(impl, "capabilities", None)
    if declared is not None:
        return frozenset(declared) & frozenset(CAPABILITIES)
    return frozenset(cap for cap, members in CAPABILITIES.items() if all(hasattr(impl, m) for m in members))


# -- the one forward + backward, as dump tensors ------------------------------------------------------

def tensors_of(impl, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The tensors of `impl`'s last forward + backward, keyed as in a dump (conformance/external.py):
    the taps (logits among them), "loss", "grad.<tap>", "grad.<param>". What it does not provide is absent."""
    caps = capabilities_of(impl)
    out: dict[str, np.ndarray] = {}
    if "taps" in caps:
        out.update({name: np.array(v, copy=True) for name, v in dict(impl.taps).items()})
    if impl.logits is not None:
        out["logits"] = np.array(impl.logits, copy=True)
    if impl.loss is not None:
        out["loss"] = np.asarray(impl.loss, dtype=np.dtype(cfg.dtype))
    if "tap_grads" in caps:
        out.update({f"grad.{name}": np.array(v, copy=True) for name, v in dict(impl.tap_grads).items()})
    out.update({f"grad.{name}": np.array(v, copy=True) for name, v in dict(impl.grads).items()})
    return out


def run_tensors(impl, cfg: ModelConfig, ids: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """zero_grad, forward(ids, targets), backward; then tensors_of."""
    impl.zero_grad()
    impl.forward(ids, targets)
    impl.backward()
    return tensors_of(impl, cfg)


def train(impl, cfg: ModelConfig, batches, kind: str, hyper: dict, clip: float | None) -> tuple[np.ndarray, dict]:
    """Train `impl` (capability "optimizer") one step per batch: zero_grad, forward, backward, clip (global
    norm, when `clip`), step. Returns (the loss of every step before its update (N,) float64,
    {name: final parameter copy}). The loop of the outside-program harness's {steps} mode."""
    from manual import registry
    opt = impl.make_optimizer(kind, registry.decay_groups(cfg, hyper.get("weight_decay", 0.0)), **hyper)
    losses = []
    for ids, targets in batches:
        impl.zero_grad()
        losses.append(impl.forward(ids, targets))
        impl.backward()
        if clip is not None:
            impl.clip_grad_norm(clip)
        opt.step()
    return np.asarray(losses, dtype=np.float64), {k: np.array(v, copy=True) for k, v in impl.params.items()}


# -- the two implementations of this project, with every capability ---------------------------------

class ModelAdapter:
    """manual.Model or reference.Model with the optional capabilities added (generation, optimizer).

    Everything is delegated: params / grads are the model's own live dicts, so an optimizer built
    with make_optimizer updates the model."""
    capabilities = frozenset(CAPABILITIES)

    def __init__(self, model, side: str):
        self.model, self.side, self.cfg = model, side, model.cfg

    def forward(self, ids, targets=None):
        return self.model.forward(ids, targets)

    def backward(self):
        self.model.backward()

    def zero_grad(self):
        self.model.zero_grad()

    params = property(lambda self: self.model.params)
    grads = property(lambda self: self.model.grads)
    logits = property(lambda self: self.model.logits)
    loss = property(lambda self: self.model.loss)
    taps = property(lambda self: self.model.taps)
    tap_grads = property(lambda self: self.model.tap_grads)

    def generate(self, prompt, max_new_tokens, temperature=1.0, top_k=None, seed=0):
        if self.side == "manual":
            from manual.sampling import generate
        else:
            from reference.sampling import generate
        return generate(self.model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)

    def make_optimizer(self, kind, groups, **hyper):
        if self.side == "reference":
            from reference import optim as ropt
            return _TorchOptimizer(self.model, ropt.make_optimizer(self.model, kind=kind, **hyper))
        from manual import optim as mopt
        cls = {"adamw": mopt.AdamW, "sgd": mopt.SGD}[kind]
        return cls(self.model.params, self.model.grads, groups=groups, **hyper)

    def clip_grad_norm(self, max_norm):
        if self.side == "reference":
            from reference import optim as ropt
            return ropt.clip_grad_norm(self.model, max_norm)
        from manual import optim as mopt
        return mopt.clip_grad_norm_(self.model.grads, max_norm)


class _TorchOptimizer:
    """A torch optimizer with the manual optimizer's state_dict() shape ({"optim.<state>.<param>": array}, meta)."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def step(self):
        self.opt.step()

    def state_dict(self):
        from reference import optim as ropt
        return ropt.optimizer_state(self.model, self.opt), {}


def manual_impl(cfg: ModelConfig, params: dict) -> ModelAdapter:
    """manual.Model through this interface, with every capability."""
    import manual
    return ModelAdapter(manual.Model.from_params(cfg, params), "manual")


def reference_impl(cfg: ModelConfig, params: dict) -> ModelAdapter:
    """reference.Model through this interface, with every capability."""
    import reference
    return ModelAdapter(reference.Model.from_params(cfg, params), "reference")


# -- one configuration of the matrix, in process ---------------------------------------------------------

GEN_TOKENS = 10


def check_impl(factory: Factory, cfg: ModelConfig, params: dict, ids, targets, *, label: str,
               train_batches: list | None = None, optimizer: str = "sgd", keep=None):
    """Construct the implementation, run one forward + backward and compare every tensor it provides
    with the reference's (conformance.external.compare_tensors, the walk every implementation goes
    through); then generation and optimizer steps if it has them. Returns an external.Outcome: an
    Unsupported factory gives status "unsupported", any exception one failing line, a missing optional
    capability a "not provided" entry. `keep`: a folder to write the case and the implementation's
    tensors into (case/, dump.safetensors), for the debugger."""
    from . import external
    from .compare import compare_exact

    try:
        impl = construct(factory, cfg, params)
    except Unsupported as exc:
        return external.Outcome(label, "unsupported", str(exc) or "declared unsupported")
    except ImplementationError as exc:
        return external.failure(label, "construct", str(exc))
    caps = capabilities_of(impl)
    try:
        under = run_tensors(impl, cfg, ids, targets)
    except Exception as exc:
        return external.failure(label, "forward/backward", f"{type(exc).__name__}: {exc}")
    if keep is not None:
        from manual.checkpoint import save_tensors
        external.write_case(Path(keep) / "case", cfg, params, ids, targets, label=label)
        save_tensors(Path(keep) / "dump.safetensors", {k: np.ascontiguousarray(v) for k, v in under.items()})
    ref = external.reference_tensors(cfg, params, ids, targets)
    check = external.check_dump(under, cfg, *np.asarray(ids).shape, strict=True)
    out = external.Outcome(label, rows=external.compare_tensors(check.tensors, ref, cfg, label),
                           not_provided=[n for n in external.not_provided(under, cfg)
                                         if n["check"] in ("activation", "activation_grad")],
                           notes=list(check.notes))
    out.rows[:0] = [_row(label, "impl", "tensors", p) for p in check.problems]
    if "generation" in caps:
        prompt = np.asarray(ids)[0, : min(4, np.asarray(ids).shape[1])]
        ref_impl = reference_impl(cfg, params)
        for name, kw in (("greedy", dict(temperature=0.0)),
                         ("sample_t0.8_k10", dict(temperature=0.8, top_k=min(10, cfg.vocab_size), seed=0))):
            try:
                got = np.asarray(impl.generate(prompt, GEN_TOKENS, **kw))
            except Exception as exc:
                out.rows.append(_row(label, "generation", f"tokens.{name}", f"generate raised "
                                                                             f"{type(exc).__name__}: {exc}"))
                continue
            out.rows.append(compare_exact(got, ref_impl.generate(prompt, GEN_TOKENS, **kw), tensor=f"tokens.{name}",
                                          check="generation", config=label))
    else:
        out.not_provided.append({"check": "generation", "what": "generation (generate)", "count": 1, "of": 1,
                                 "keys": []})
    if not train_batches:
        return out
    if "optimizer" in caps:
        try:
            fresh = construct(factory, cfg, params)
            hp, clip = external._optimizer_settings(optimizer)
            losses, final = train(fresh, cfg, train_batches, optimizer, hp, clip)
        except Exception as exc:
            out.rows.append(_row(label, "optimizer", f"{optimizer} x{len(train_batches)}",
                                 f"training raised {type(exc).__name__}: {exc}"))
            return out
        ref_losses, ref_params = external.reference_training(cfg, params, train_batches, optimizer)
        out.rows += external.compare_training(losses, final, ref_losses, ref_params, cfg, label)
    else:
        out.not_provided.append({"check": "optimizer", "what": "optimizer steps (make_optimizer, clip_grad_norm)",
                                 "count": 1, "of": 1, "keys": []})
    return out


def _row(label, check, tensor, note):
    from .compare import Comparison
    return Comparison(config=label, check=check, tensor=tensor, passed=False, note=note)
