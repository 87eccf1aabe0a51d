"""Memory accounting: one source of truth for the conformance memory checks and tools/memprof.py.

Bytes are split into categories (docs/memory.md):
    parameters        P * itemsize, P = registry.param_count(cfg) (tied matrix once)
    gradients         P * itemsize (one gradient buffer per parameter)
    optimizer_state   AdamW: 2 * P * itemsize (exp_avg, exp_avg_sq); SGD with momentum:
                      P * itemsize (momentum_buffer). The per-parameter `step` counters are
                      bookkeeping scalars (a Python int in manual, a 4-byte tensor in torch)
                      and are not counted on either side.
    activations       bytes kept from the forward for the backward. Manual: the closed form
                      manual.memory.activation_bytes states, equal to what its caches hold.
                      Reference: what autograd saves (saved_tensors_hooks), parameters
                      excluded, each storage once.
    transient peak    manual: tracemalloc peak of forward + backward above the baseline,
                      against manual.memory's predicted peak.

NumPy allocations are exact under tracemalloc; torch tensors are counted by element size.

What tools/memprof.py adds on top, kept here so that both read one accounting:
    predicted_phases      the closed form of every category after each phase of a training step
    manual_cache_tensors  the manual caches tensor by tensor (manual.memory.cache_tensors; sums to
                          Model.cache_breakdown)
    saved_tensors         autograd's saved tensors tensor by tensor, with the module that saved
                          them and the grad_fn that holds them (sums to activation_saved_bytes)
    TorchTensorTracker    live bytes of the torch tensors created inside a block, and their peak
"""
from __future__ import annotations

import weakref

import numpy as np

from manual import registry

from manual.memory import buffer_owner as _owner
from manual.memory import cache_tensors as manual_cache_tensors
from manual.memory import measured_peak_bytes as manual_peak_bytes
from manual.memory import param_bytes

from .compare import Comparison, compare_exact

PEAK_TOLERANCE = 0.10  # tracemalloc peak within 10% of the predicted peak (issue 4)


# -- closed forms -----------------------------------------------------------------------

def closed_forms(cfg, optimizer: str = "adamw") -> dict:
    per = {"adamw": 2, "sgd": 1, "none": 0}
    if optimizer not in per:
        raise ValueError(f"optimizer must be one of {sorted(per)}, got {optimizer!r}")
    pb = param_bytes(cfg)                       # P * itemsize, the tied matrix once
    return {"parameters": pb, "gradients": pb, "optimizer_state": per[optimizer] * pb}


LR, SGD_MOMENTUM = 1e-3, 0.9   # the memory runs' optimizers (SGD with momentum, so it has state)


def memory_optimizer(impl: str, model, kind: str, manual_optim=None):
    """The optimizer the memory accounting measures ("manual" or "reference" side), no weight decay."""
    if impl == "manual":
        if manual_optim is None:
            import manual.optim as manual_optim
        groups = registry.decay_groups(model.cfg, 0.0)
        if kind == "adamw":
            return manual_optim.AdamW(model.params, model.grads, lr=LR, groups=groups)
        return manual_optim.SGD(model.params, model.grads, lr=LR, momentum=SGD_MOMENTUM, groups=groups)
    from reference import optim as ropt
    return ropt.make_optimizer(model, kind=kind, lr=LR, **({"momentum": SGD_MOMENTUM} if kind == "sgd" else {}))


# -- measured: manual --------------------------------------------------------------------

def _unique_nbytes(arrays) -> int:
    """Bytes of the distinct buffers behind `arrays` (a view counts with its owner, once)."""
    owners = {id(o): o for o in map(_owner, arrays)}
    return sum(o.nbytes for o in owners.values())


def manual_bytes(model, opt=None) -> dict:
    out = {"parameters": _unique_nbytes(model.params.values()),
           "gradients": _unique_nbytes(model.grads.values()),
           "optimizer_state": 0}
    if opt is not None:
        out["optimizer_state"] = _unique_nbytes(
            v for st in opt.state.values() for v in st.values() if isinstance(v, np.ndarray))
    return out


# -- measured: reference --------------------------------------------------------------------

def reference_bytes(model, opt=None) -> dict:
    params = {id(p): p for p in model.module.parameters()}.values()
    out = {"parameters": sum(p.numel() * p.element_size() for p in params),
           "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer_state": 0}
    if opt is not None:
        import torch
        out["optimizer_state"] = sum(v.numel() * v.element_size() for st in opt.state.values()
                                     for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step")
    return out


# -- checks ---------------------------------------------------------------------------------

def memory_checks(case, path, m, r, ids, targets, sides) -> list[Comparison]:
    from manual import memory as mmem
    from reference import optim as ropt

    cfg, lab = case.cfg, case.name()
    out: list[Comparison] = []
    B, T = ids.shape
    active = mmem.heads_with_targets(cfg, targets)   # a head without targets keeps nothing (manual.memory)

    # parameters, gradients, optimizer state: manual = reference = closed form
    for kind in ("adamw", "sgd"):
        mm = sides.manual.load(path)
        rr = sides.reference.load(path)
        mo = memory_optimizer("manual", mm, kind, sides.manual_optim)
        ro = memory_optimizer("reference", rr, kind)
        for model in (mm, rr):
            model.forward(ids, targets)
            model.backward()
        mo.step()
        ro.step()
        closed = closed_forms(cfg, kind)
        got_m, got_r = manual_bytes(mm, mo), reference_bytes(rr, ro)
        cats = ("parameters", "gradients", "optimizer_state") if kind == "adamw" else ("optimizer_state",)
        for cat in cats:
            label = cat if cat != "optimizer_state" else f"optimizer_state.{kind}"
            out.append(compare_exact(got_m[cat], closed[cat], tensor=f"{label} bytes (manual vs closed form)",
                                     check="memory", config=lab))
            out.append(compare_exact(got_r[cat], closed[cat], tensor=f"{label} bytes (reference vs closed form)",
                                     check="memory", config=lab))
        del mm, rr, mo, ro

    # activations kept for backward
    m.forward(ids, targets)
    out += activation_byte_checks(lab, m.cache_bytes(), mmem.activation_bytes(cfg, B, T, active=active),
                                  ropt.activation_saved_bytes(r, ids, targets),
                                  "activation bytes (manual caches vs closed form)",
                                  "activation bytes ratio manual/reference")

    # transient peak of forward + backward, tracemalloc against the prediction
    predicted_peak = mmem.peak_bytes(cfg, B, T, active)
    measured_peak = manual_peak_bytes(sides.manual.load(path), ids, targets)
    rel = abs(measured_peak - predicted_peak) / predicted_peak
    out.append(Comparison(config=lab, check="memory", tensor="forward+backward peak (tracemalloc vs predicted)",
                          passed=bool(rel <= PEAK_TOLERANCE), max_abs=float(abs(measured_peak - predicted_peak)),
                          max_rel=float(rel), tol=PEAK_TOLERANCE * predicted_peak,
                          rule="within 10% of predicted", a_value=measured_peak, b_value=predicted_peak,
                          scale=float(predicted_peak)))
    return out


def recompute_checks(case, path, ids, targets, sides) -> list[Comparison]:
    """Activation recomputation (Model(..., recompute="blocks") on both sides), issue 14:
      - manual: every parameter gradient and the loss with recompute equal those without, bit for bit
        (the recomputed forward is the same arithmetic on the same block input);
      - reference (torch.utils.checkpoint) with recompute against manual with recompute: the suite's
        tolerances, per parameter gradient;
      - manual activation bytes with recompute = manual.memory.activation_bytes(..., recompute="blocks"),
        measured on the cached buffers themselves (manual.memory.cache_tensors), not through the
        model's own cache_bytes() (which the recompute="none" check above reads);
      - manual / reference activation bytes <= 1 with recompute (reference.optim.activation_saved_bytes:
        checkpoint keeps each block's input through save_for_backward, so autograd's saved tensors
        include them; tests/test_recompute.py checks that they do).
    """
    from manual import memory as mmem
    from reference import optim as ropt

    from .compare import compare

    cfg, lab = case.cfg, case.name()
    dt = np.dtype(cfg.dtype)
    B, T = ids.shape
    runs = {}
    for mode in ("none", "blocks"):
        m = sides.manual.load(path, recompute=mode)
        loss = m.forward(ids, targets)
        kept = sum(row["bytes"] for row in manual_cache_tensors(m))   # the cached buffers themselves
        m.backward()
        runs[mode] = (loss, kept, m.grads)
    r = sides.reference.load(path, recompute="blocks")
    r.forward(ids, targets)
    r.backward()
    (loss_n, _, g_n), (loss_b, kept_b, g_b) = runs["none"], runs["blocks"]
    out = [compare_exact(loss_b, loss_n, tensor="loss (manual, recompute=blocks vs none)", check="recompute",
                         config=lab)]
    for spec in reversed(registry.param_specs(cfg)):
        name = spec.name
        out.append(compare_exact(g_b[name], g_n[name], tensor=f"{name} grad (manual, recompute=blocks vs none)",
                                 check="recompute", config=lab))
        out.append(compare(g_b[name], r.grads[name], tensor=f"{name} grad (recompute=blocks, manual vs reference)",
                           check="recompute", config=lab, expect_dtype=dt))
    out += activation_byte_checks(lab, kept_b, mmem.activation_bytes(cfg, B, T, recompute="blocks",
                                                                   active=mmem.heads_with_targets(cfg, targets)),
                                  ropt.activation_saved_bytes(r, ids, targets),
                                  "activation bytes, recompute=blocks (manual vs closed form)",
                                  "activation bytes ratio manual/reference, recompute=blocks", check="recompute")
    return out


def activation_byte_checks(lab, measured, predicted, ref_saved, exact_name, ratio_name,
                           check: str = "memory") -> list[Comparison]:
    """Manual activation bytes = their closed form, and manual / reference (autograd's saved bytes) <= 1."""
    ratio = measured / ref_saved if ref_saved else float("inf")
    return [compare_exact(measured, predicted, tensor=exact_name, check=check, config=lab),
            Comparison(config=lab, check=check, tensor=ratio_name, passed=bool(ratio <= 1.0), max_abs=float(ratio),
                       max_rel=float(ratio), tol=1.0, rule="ratio <= 1", a_value=measured, b_value=ref_saved,
                       scale=1.0, note=f"manual {measured} B vs autograd saved {ref_saved} B")]


# -- per phase closed forms (tools/memprof.py) ---------------------------------------------------

PHASES = ("init", "forward", "backward", "optimizer_step")
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "other")


def predicted_phases(cfg, B: int, T: int, optimizer: str = "adamw") -> dict:
    """Closed-form bytes of each category after each phase of the FIRST training step (manual side).

    {phase: {category: bytes or None, "total": ..., "peak": ...}}; None where no closed form exists.
        init            parameters + gradient buffers (manual allocates them zeroed; the reference
                        too, `p.grad = zeros`); optimizer state is created lazily at the first step
        forward         + activations (manual.memory.activation_bytes); other = the forward's taps
                        and logits that are not also cached: held_after_forward_bytes - activations
        backward        + other grows by the tap gradients (tap_grad_bytes); peak = parameters +
                        gradients + manual.memory.peak_bytes (= peak_bytes_closed_form)
        optimizer_step  + optimizer state (closed_forms)
    The caches, taps and tap gradients stay alive until the next forward replaces them.
    """
    from manual import memory as mmem

    closed = closed_forms(cfg, optimizer)
    act = mmem.activation_bytes(cfg, B, T)
    held = mmem.held_after_forward_bytes(cfg, B, T)
    grads_of_taps = mmem.tap_grad_bytes(cfg, B, T)
    base = {"parameters": closed["parameters"], "gradients": closed["gradients"], "optimizer_state": 0}
    out = {
        "init": {**base, "activations": 0, "other": None, "peak": None},
        "forward": {**base, "activations": act, "other": held - act, "peak": None},
        "backward": {**base, "activations": act, "other": held - act + grads_of_taps,
                     "peak": mmem.peak_bytes_closed_form(cfg, B, T)},
        "optimizer_step": {**base, "optimizer_state": closed["optimizer_state"], "activations": act,
                           "other": held - act + grads_of_taps, "peak": None},
    }
    for row in out.values():
        row["total"] = None if any(row[c] is None for c in CATEGORIES) else sum(row[c] for c in CATEGORIES)
    return out


# -- tensor by tensor: manual caches ------------------------------------------------------------
# manual_cache_tensors(model): manual.memory.cache_tensors, the accounting next to the closed forms it
# must match (imported above under this module's name for it).


# -- tensor by tensor: what autograd saves ------------------------------------------------------

def saved_tensors(model, run) -> list[dict]:
    """The tensors autograd saves for backward while `run()` executes a forward of `model`
    (a reference.Model); `run` returns the loss tensor.

    The rules of reference.optim.activation_saved_bytes: every saved tensor is counted by its
    storage, each storage once (by data_ptr), storages of parameters and module buffers excluded.
    Each row: module (the innermost module running when the tensor was saved, from forward hooks;
    "(GPT.forward)" for the loss, computed outside any submodule), op (a grad_fn that holds the
    storage, and its attribute), shape, dtype, bytes (the storage's, 0 for a storage already
    counted), storage (its data_ptr, to match it against other accounts while it is alive).
    """
    import torch

    module = model.module
    state = list(module.parameters()) + list(module.buffers())
    excluded = {t.untyped_storage().data_ptr() for t in state}
    stack: list[str] = []
    rows: list[dict] = []
    counted: set[int] = set()

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded:
            rows.append({"module": stack[-1] if stack else "(GPT.forward)", "op": "", "storage": ptr,
                         "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                         "bytes": 0 if ptr in counted else int(storage.nbytes())})
            counted.add(ptr)
        return t

    def enter(name):
        def hook(_module, _args):
            stack.append(name)           # returns None: the input is left unchanged
        return hook

    def leave(_module, _args, _output):
        stack.pop()                      # returns None: the output is left unchanged

    handles = []
    for name, sub in module.named_modules():
        if name:
            handles += [sub.register_forward_pre_hook(enter(name)), sub.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run()
    finally:
        for h in handles:
            h.remove()
    ops = _saved_by(loss.grad_fn) if loss is not None and loss.grad_fn is not None else {}
    for row in rows:
        row["op"] = ops.get(row["storage"], "")
    return rows


def _saved_by(root) -> dict[int, str]:
    """{storage data_ptr: "GradFnName._saved_attr"} for the tensors the graph under `root` holds."""
    import torch

    out, seen, todo = {}, set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:          # a saved tensor already freed
                continue
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor):
                    out.setdefault(t.untyped_storage().data_ptr(), f"{type(node).__name__}.{attr[7:]}")
        todo += [n for n, _ in node.next_functions]
    return out


# -- live torch tensors -------------------------------------------------------------------------

class TorchTensorTracker:
    """Live bytes of the torch tensors that operators create inside a `with` block, and their peak.

    Every operator's output (forward, autograd's backward kernels, optimizer updates) is seen
    through a TorchDispatchMode and counted by its storage, each storage once; a storage leaves
    the count when the last tracked tensor using it is freed (weakref). Storages in `exclude`
    (the parameters, gradient buffers and optimizer state that existed before the block, which
    in-place updates hand back as outputs) are never counted. Kernel-internal scratch buffers
    that no operator returns are not seen.
    """

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, int] = {}          # storage data_ptr -> bytes, while alive
        self.refs: dict[int, int] = {}          # storage data_ptr -> tracked tensors using it
        self.current = self.peak = 0            # live bytes now / highest since reset_peak()
        self.allocations = self.allocated_bytes = 0   # storages created, and their bytes, in total
        self._mode = None

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    tracker._track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def _track(self, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0:
            return
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
            self.allocations += 1
            self.allocated_bytes += self.live[key]
        self.refs[key] = self.refs.get(key, 0) + 1
        weakref.finalize(t, self._release, key)

    def reset_peak(self) -> None:
        self.peak = self.current

    def live_bytes(self, excluding=()) -> int:
        """Bytes of the tracked storages alive now, leaving out the data_ptrs in `excluding`."""
        skip = set(excluding)
        return sum(n for ptr, n in self.live.items() if ptr not in skip)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.current -= self.live.pop(key)
