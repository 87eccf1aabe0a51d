"""Memory accounting: one source of truth for the conformance memory checks and tools/memprof.py.

Bytes are split into categories (DESIGN.md):
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
"""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np

from manual import registry

from .compare import Comparison, compare_exact

PEAK_TOLERANCE = 0.10  # tracemalloc peak within 10% of the predicted peak (issue 4)


# -- closed forms -----------------------------------------------------------------------

def itemsize(cfg) -> int:
    return np.dtype(cfg.dtype).itemsize


def closed_forms(cfg, optimizer: str = "adamw") -> dict:
    P = registry.param_count(cfg)
    per = {"adamw": 2, "sgd": 1, "none": 0}
    if optimizer not in per:
        raise ValueError(f"optimizer must be one of {sorted(per)}, got {optimizer!r}")
    return {"parameters": P * itemsize(cfg), "gradients": P * itemsize(cfg),
            "optimizer_state": per[optimizer] * P * itemsize(cfg)}


# -- measured: manual --------------------------------------------------------------------

def _unique_nbytes(arrays) -> int:
    """Bytes of the distinct buffers behind `arrays` (a view counts with its base, once)."""
    seen, total = set(), 0
    for a in arrays:
        base = a
        while isinstance(base, np.ndarray) and base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        key = (base.__array_interface__["data"][0], base.nbytes)
        if key not in seen:
            seen.add(key)
            total += base.nbytes
    return total


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

    # parameters, gradients, optimizer state: manual = reference = closed form
    for kind in ("adamw", "sgd"):
        mm = sides.manual.load(path)
        rr = sides.reference.load(path)
        groups = registry.decay_groups(cfg, 0.0)
        if kind == "adamw":
            mo = sides.manual_optim.AdamW(mm.params, mm.grads, lr=1e-3, groups=groups)
        else:
            mo = sides.manual_optim.SGD(mm.params, mm.grads, lr=1e-3, momentum=0.9, groups=groups)
        ro = ropt.make_optimizer(rr, kind=kind, lr=1e-3, **({"momentum": 0.9} if kind == "sgd" else {}))
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
    predicted = mmem.activation_bytes(cfg, B, T)
    m.forward(ids, targets)
    measured = m.cache_bytes()
    out.append(compare_exact(measured, predicted, tensor="activation bytes (manual caches vs closed form)",
                             check="memory", config=lab))
    ref_saved = ropt.activation_saved_bytes(r, ids, targets)
    ratio = measured / ref_saved if ref_saved else float("inf")
    out.append(Comparison(config=lab, check="memory", tensor="activation bytes ratio manual/reference",
                          passed=bool(ratio <= 1.0), max_abs=float(ratio), max_rel=float(ratio), tol=1.0,
                          rule="ratio <= 1", a_value=measured, b_value=ref_saved,
                          note=f"manual {measured} B vs autograd saved {ref_saved} B"))

    # transient peak of forward + backward, tracemalloc against the prediction
    predicted_peak = mmem.peak_bytes(cfg, B, T)
    measured_peak = manual_peak_bytes(sides.manual.load(path), ids, targets)
    rel = abs(measured_peak - predicted_peak) / predicted_peak
    out.append(Comparison(config=lab, check="memory", tensor="forward+backward peak (tracemalloc vs predicted)",
                          passed=bool(rel <= PEAK_TOLERANCE), max_abs=float(abs(measured_peak - predicted_peak)),
                          max_rel=float(rel), tol=PEAK_TOLERANCE * predicted_peak,
                          rule="within 10% of predicted", a_value=measured_peak, b_value=predicted_peak))
    return out


def manual_peak_bytes(model, ids, targets) -> int:
    """tracemalloc peak of one forward + backward, above what was live before it (params, grads)."""
    model.forward(ids, targets)    # warm-up: first-call allocations (lazy buffers) are not the steady state
    model.backward()
    model.zero_grad()
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        model.forward(ids, targets)
        model.backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base
