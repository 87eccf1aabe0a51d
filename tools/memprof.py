"""Memory profiler: where every byte of a training step goes, in both implementations.

    python tools/memprof.py --preset tiny --impl both --json out/mem.json --plot out/memprof_tiny.png
    python tools/memprof.py --preset medium --batch-size 8 --seq-len 128 --optimizer sgd
    python tools/memprof.py --preset tiny --sweep seq_len --plot out/sweep.png   # activation bytes against T
    python tools/memprof.py --preset gpt2-small --dry-run                    # sizes it, allocates nothing

What it prints (and writes to --json):

1. Per phase of the first training step (init, forward, backward, optimizer_step), per
   implementation: live bytes by category (parameters, gradients, optimizer_state, activations
   kept for backward, other = workspace, taps, logits, Python objects), the peak within the
   phase, and beside each figure the closed form (conformance.memory.predicted_phases) and the
   difference. manual: tracemalloc, exact for NumPy. reference: torch tensors counted by storage
   (conformance.memory.reference_bytes, saved_tensors, TorchTensorTracker) plus tracemalloc for
   the adapter's NumPy copies.
2. What each layer keeps for backward, tensor by tensor, manual (its caches) beside reference
   (what autograd saved, grouped by the module that saved it).
3. Churn: the NumPy allocations of one steady-state training step (counted one by one by a
   NumPy memory handler, NEP 49), their bytes and the top allocation sites (file: function); for the
   reference the torch storages created in the step.
4. The conformance figures (the same functions the conformance memory checks call), and an RSS
   timeline (memory-profiler) of each implementation over its training steps, phases shaded (--plot).

What every figure means: docs/memory.md.

`--sweep seq_len|batch` measures activation bytes over a range of T or B for manual, reference
and both with attention='flash', fits bytes = a + b x + c x^2 and says whether the growth is
linear or quadratic. `--dry-run` prints the closed-form footprint of a config and allocates
nothing. A real run whose closed-form footprint exceeds --max-gb is refused with the numbers.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np

from conformance import memory as cmem
from conformance.engine import make_batch
from manual import memory as mmem
from manual.config import PRESETS, ModelConfig
from tools._args import float_at_least, int_at_least
from tools._cli import cli, output_file, write_output

PHASES, CATEGORIES = cmem.PHASES, cmem.CATEGORIES
IMPLS = ("manual", "reference")


# -- formatting ---------------------------------------------------------------------------------

def human(n) -> str:
    """1234567 -> '1.18 MiB'; None -> '-'."""
    if n is None:
        return "-"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024


def _diff(measured, predicted):
    return None if measured is None or predicted is None else measured - predicted


# -- one implementation through the phases of a training step -----------------------------------

def _warm_up(impl: str, cfg, optimizer: str) -> None:
    """One training step of a 1-layer model before measuring: torch imports modules lazily at its
    first model build, dispatch mode, backward and optimizer step (tens of MB of Python objects
    that tracemalloc would otherwise book to the measured model)."""
    import manual
    import reference

    small = ModelConfig(n_layers=1, dtype=cfg.dtype, attention=cfg.attention)
    ids, targets = make_batch(small, 2, 4, seed=0)
    with cmem.TorchTensorTracker():
        model = (manual.Model if impl == "manual" else reference.Model)(small, seed=0)
        opt = cmem.memory_optimizer(impl, model, optimizer)
        if impl == "reference":
            cmem.saved_tensors(model, lambda: (model.forward(ids, targets), model.loss_tensor)[1])
        else:
            model.forward(ids, targets)
        model.backward()
        opt.step()


def _row(phase, live, total, peak, predicted) -> dict:
    pred = predicted[phase]
    return {"live": live, "total": total, "peak": peak,
            "predicted": {c: pred[c] for c in (*CATEGORIES, "total", "peak")},
            "diff": {**{c: _diff(live[c], pred[c]) for c in CATEGORIES},
                     "total": _diff(total, pred["total"]), "peak": _diff(peak, pred["peak"])}}


def phases_manual(cfg, ids, targets, optimizer: str) -> dict:
    """tracemalloc from just before Model() on: every NumPy buffer (and Python object) it traces.

    other = traced - (parameters + gradients + optimizer state + cached activations).
    peak = tracemalloc's peak within the phase (absolute, like `total`).
    """
    import manual
    import manual.optim  # noqa: F401

    B, T = ids.shape
    predicted = cmem.predicted_phases(cfg, B, T, optimizer)
    out = {}
    _warm_up("manual", cfg, optimizer)

    def measure(phase, model, opt):
        current, peak = tracemalloc.get_traced_memory()
        live = cmem.manual_bytes(model, opt)
        live["activations"] = model.cache_bytes()
        live["other"] = current - sum(live.values())
        out[phase] = _row(phase, live, current, peak, predicted)
        tracemalloc.reset_peak()

    gc.collect()
    tracemalloc.start()
    try:
        model = manual.Model(cfg, seed=0)
        opt = cmem.memory_optimizer("manual", model, optimizer)
        measure("init", model, opt)
        model.forward(ids, targets)
        measure("forward", model, opt)
        model.backward()
        measure("backward", model, opt)
        opt.step()
        measure("optimizer_step", model, opt)
    finally:
        tracemalloc.stop()
    tensors = cmem.manual_cache_tensors(model)
    return {"phases": out, "tensors": tensors, "activation_bytes": model.cache_bytes()}


def phases_reference(cfg, ids, targets, optimizer: str) -> dict:
    """Torch tensors by storage: parameters / gradients / optimizer state (reference_bytes), the
    tensors autograd saves (saved_tensors), everything else operators create (TorchTensorTracker),
    plus tracemalloc for the adapter's NumPy copies (its tap_grads). peak = live at the phase's
    start + the tracker's peak + the tracemalloc peak within the phase.
    """
    import torch  # imported before tracemalloc starts: module imports are not the model's memory

    import reference
    import reference.optim  # noqa: F401

    B, T = ids.shape
    predicted = cmem.predicted_phases(cfg, B, T, optimizer)
    out = {}
    _warm_up("reference", cfg, optimizer)
    gc.collect()
    tracemalloc.start()
    try:
        with cmem.TorchTensorTracker() as init_tracker:
            model = reference.Model(cfg, seed=0)
            opt = cmem.memory_optimizer("reference", model, optimizer)
        live = cmem.reference_bytes(model, opt)
        live["activations"] = 0
        numpy_now, numpy_peak = tracemalloc.get_traced_memory()
        live["other"] = init_tracker.live_bytes() - live["parameters"] - live["gradients"] + numpy_now
        out["init"] = _row("init", live, sum(live.values()), init_tracker.peak + numpy_peak, predicted)

        state = [p for p in model.torch_params.values()] + [p.grad for p in model.torch_params.values()]
        saved: list[dict] = []
        tracker = cmem.TorchTensorTracker(exclude=state)
        start = {"total": out["init"]["total"], "torch": 0, "numpy": numpy_now}

        def measure(phase):
            live = cmem.reference_bytes(model, opt)
            opt_ptrs = {v.untyped_storage().data_ptr() for st in opt.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor)}
            live["activations"] = sum(r["bytes"] for r in saved)
            numpy_now, numpy_peak = tracemalloc.get_traced_memory()
            live["other"] = tracker.live_bytes(excluding={r["storage"] for r in saved} | opt_ptrs) + numpy_now
            total = sum(live.values())
            # torch's and NumPy's peaks need not coincide: their sum is an upper bound of the phase's peak
            peak = start["total"] + (tracker.peak - start["torch"]) + (numpy_peak - start["numpy"])
            out[phase] = _row(phase, live, total, peak, predicted)
            start.update(total=total, torch=tracker.current, numpy=numpy_now)
            tracker.reset_peak()
            tracemalloc.reset_peak()

        tracemalloc.reset_peak()
        with tracker:
            saved += cmem.saved_tensors(model, lambda: (model.forward(ids, targets), model.loss_tensor)[1])
            measure("forward")
            model.backward()
            measure("backward")
            opt.step()
            measure("optimizer_step")
    finally:
        tracemalloc.stop()
    tensors = [{k: v for k, v in r.items() if k != "storage"} for r in saved]
    return {"phases": out, "tensors": tensors, "activation_bytes": sum(r["bytes"] for r in saved)}


# -- churn: every NumPy allocation of one steady-state step ------------------------------------

class NumpyAllocationCounter:
    """Counts every NumPy data allocation inside a `with` block, by the project function that made it.

    NumPy (>= 1.22, NEP 49) lets a program install its own memory handler: a table of malloc /
    calloc / realloc / free functions that every new array's data goes through. This one forwards
    to the C library and, for each allocation, records its size and the innermost stack frame in
    this repository, as "file: function" (a name outlives edits; a line number does not).
    tracemalloc cannot count these: it only keeps what is still alive, and a step frees almost
    all it allocates. The handler is reached through NumPy's C API
    table (PyDataMem_SetHandler, slot 304 in numpy/_core/include/numpy/__multiarray_api.h).
    Arrays allocated inside the block are freed through this handler later, wherever that
    happens, so its callbacks are kept alive for the life of the process (_KEEP).
    """

    _KEEP: list = []
    _SLOT_SET_HANDLER = 304

    LARGE = 64 * 1024      # bytes: larger arrays are mapped fresh from the OS by malloc (issue 14's count)

    def __init__(self):
        self.count = 0
        self.bytes = 0
        self.large_count = 0                     # allocations over LARGE bytes, and their bytes
        self.large_bytes = 0
        self.sites: dict[str, list[int]] = {}   # "file: function" -> [count, bytes]
        self._previous = None

    def _record(self, size: int) -> None:
        self.count += 1
        self.bytes += size
        if size > self.LARGE:
            self.large_count += 1
            self.large_bytes += size
        frame = sys._getframe(2)
        while frame is not None and not (frame.f_code.co_filename.startswith(str(ROOT))
                                         and "site-packages" not in frame.f_code.co_filename):
            frame = frame.f_back
        site = "(outside the project)" if frame is None else \
            f"{Path(frame.f_code.co_filename).relative_to(ROOT)}: {frame.f_code.co_qualname}"
        entry = self.sites.setdefault(site, [0, 0])
        entry[0] += 1
        entry[1] += size

    def __enter__(self):
        from numpy._core import _multiarray_umath

        api = ctypes.pythonapi
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_New.restype = ctypes.py_object
        api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        table = ctypes.cast(api.PyCapsule_GetPointer(_multiarray_umath._ARRAY_API, None),
                            ctypes.POINTER(ctypes.c_void_p))
        self._set_handler = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(table[self._SLOT_SET_HANDLER])

        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.calloc.restype, libc.calloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]
        libc.realloc.restype, libc.realloc.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]
        libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        MALLOC, CALLOC = ctypes.CFUNCTYPE(vp, vp, sz), ctypes.CFUNCTYPE(vp, vp, sz, sz)
        REALLOC, FREE = ctypes.CFUNCTYPE(vp, vp, vp, sz), ctypes.CFUNCTYPE(None, vp, vp, sz)

        class Allocator(ctypes.Structure):      # PyDataMemAllocator (numpy/ndarraytypes.h)
            _fields_ = [("ctx", vp), ("malloc", MALLOC), ("calloc", CALLOC), ("realloc", REALLOC),
                        ("free", FREE)]

        class Handler(ctypes.Structure):        # PyDataMem_Handler
            _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8), ("allocator", Allocator)]

        def malloc(_ctx, size):
            self._record(size)
            return libc.malloc(size)

        def calloc(_ctx, n, size):
            self._record(n * size)
            return libc.calloc(n, size)

        def realloc(_ctx, ptr, size):
            self._record(size)
            return libc.realloc(ptr, size)

        def free(_ctx, ptr, _size):
            libc.free(ptr)

        callbacks = (MALLOC(malloc), CALLOC(calloc), REALLOC(realloc), FREE(free))
        handler = Handler(b"memprof_counter", 1, Allocator(None, *callbacks))
        capsule = api.PyCapsule_New(ctypes.addressof(handler), b"mem_handler", None)
        self._KEEP.append((callbacks, handler, capsule, libc))
        self._previous = self._set_handler(capsule)
        return self

    def __exit__(self, *exc):
        self._set_handler(self._previous)

    def top(self, n: int = 10) -> list[dict]:
        rows = sorted(self.sites.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))[:n]
        return [{"site": site, "count": c, "bytes": b} for site, (c, b) in rows]


def churn(cfg, ids, targets, optimizer: str, impls, steps_before: int = 2) -> dict:
    """Allocations of one steady-state training step (zero_grad, forward, backward, optimizer step),
    after `steps_before` steps so that the optimizer state and every lazy buffer already exist.

    manual: every NumPy allocation (NumpyAllocationCounter), its bytes, those over 64 KiB, the top sites
    (file: function), and the step's tracemalloc peak above its start; "manual_workspace" the same for
    Model(cfg, workspace=True) (manual/layers/workspace.py: arrays reused across steps). reference: the
    torch storages operators create in the step (TorchTensorTracker) and their bytes.
    """
    import manual
    import reference

    out = {}
    runs = [run for impl in impls for run in ([impl, "manual_workspace"] if impl == "manual" else [impl])]
    for impl in runs:
        side = "manual" if impl.startswith("manual") else "reference"
        kwargs = {"workspace": True} if impl == "manual_workspace" else {}
        model = (manual.Model if side == "manual" else reference.Model)(cfg, seed=0, **kwargs)
        opt = cmem.memory_optimizer(side, model, optimizer)

        def step(model=model, opt=opt):
            opt.zero_grad()
            model.forward(ids, targets)
            model.backward()
            opt.step()

        for _ in range(steps_before):
            step()
        gc.collect()
        if side == "manual":
            tracemalloc.start()
            try:
                base, _ = tracemalloc.get_traced_memory()
                with NumpyAllocationCounter() as counter:
                    step()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            out[impl] = {"allocations": counter.count, "bytes": counter.bytes, "peak_above_start": peak - base,
                         "allocations_over_64k": counter.large_count, "bytes_over_64k": counter.large_bytes,
                         "top_sites": counter.top(10)}
        else:
            existing = [p for p in model.torch_params.values()] + [p.grad for p in model.torch_params.values()] + \
                [v for st in opt.state.values() for v in st.values() if hasattr(v, "untyped_storage")]
            with cmem.TorchTensorTracker(exclude=existing) as tracker:
                step()
            out[impl] = {"allocations": tracker.allocations, "bytes": tracker.allocated_bytes,
                         "peak_above_start": tracker.peak}
        del model, opt
        gc.collect()
    return out


# -- RSS timeline (memory-profiler) --------------------------------------------------------------

def timeline(cfg, B: int, T: int, optimizer: str, impls, steps: int = 3, interval: float = 0.005) -> dict:
    """RSS over time (memory_profiler.memory_usage, every `interval` s) of a fresh child process per
    implementation that builds the model and runs `steps` training steps, printing a timestamp
    at the start of each phase. A fresh process, because RSS only grows in one that has already
    allocated and freed (the C allocator keeps freed pages). RSS is a loose outer bound."""
    import subprocess

    from memory_profiler import memory_usage

    out = {}
    for impl in impls:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--timeline-child", impl, "--preset", "tiny",
               "--config-json", cfg.to_json(), "--batch-size", str(B), "--seq-len", str(T),
               "--optimizer", optimizer, "--steps", str(steps)]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples = memory_usage(child, interval=interval, timestamps=True, include_children=False)
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"timeline child for {impl} failed ({child.returncode}): {stderr[-2000:]}")
        marks = json.loads(stdout.strip().splitlines()[-1])
        t0 = marks[0][1]
        t_end = marks[-1][1]
        keep = [(m, t) for m, t in samples if t0 - 0.05 <= t <= t_end + 0.03]   # not the imports, not the exit
        out[impl] = {"t_s": [round(t - t0, 5) for _, t in keep], "rss_mib": [round(m, 3) for m, _ in keep],
                     "marks": [[name, round(t - t0, 5)] for name, t in marks]}
    return out


def timeline_child(cfg, B: int, T: int, optimizer: str, impl: str, steps: int) -> None:
    """The child process of `timeline`: prints [[phase, time.time()], ...] as its last line."""
    import manual
    import manual.optim  # noqa: F401
    import reference
    import reference.optim  # noqa: F401

    ids, targets = make_batch(cfg, B, T, seed=0)
    time.sleep(0.1)                                    # a few samples of the baseline
    marks = [("init", time.time())]
    model = (manual.Model if impl == "manual" else reference.Model)(cfg, seed=0)
    opt = cmem.memory_optimizer(impl, model, optimizer)
    for _ in range(steps):
        marks.append(("forward", time.time()))
        opt.zero_grad()
        model.forward(ids, targets)
        marks.append(("backward", time.time()))
        model.backward()
        marks.append(("optimizer_step", time.time()))
        opt.step()
    marks.append(("end", time.time()))
    time.sleep(0.05)
    print(json.dumps(marks))


# -- scaling sweeps ---------------------------------------------------------------------------------

def fit_growth(xs, ys, var: str) -> dict:
    """Least squares bytes = a + b x + c x^2; 'quadratic' when the x^2 term is more than 1% of the
    bytes at the largest x, else 'linear'."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    A = np.stack([np.ones_like(x), x, x * x], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(A, y, rcond=None)
    share = abs(c) * x.max() ** 2 / max(abs(y[np.argmax(x)]), 1.0)
    return {"a": float(a), "b": float(b), "c": float(c), "quadratic_share": float(share),
            "growth": f"quadratic in {var}" if share > 0.01 else f"linear in {var}"}


def sweep(cfg, B: int, T: int, what: str, values=None) -> dict:
    """Activation bytes against T (what='seq_len') or B (what='batch') for manual and reference,
    standard and flash attention: measured (manual caches, autograd's saved tensors) and, for the
    manual side, the closed form."""
    import manual
    import reference
    from reference import optim as ropt

    if values is None:
        hi = T if what == "seq_len" else 2 * B
        values = sorted({max(1, int(round(v))) for v in np.linspace(max(1, hi / 8), hi, 6)})
    series = {}
    variants = [("manual", "standard"), ("reference", "standard"), ("manual", "flash"), ("reference", "flash")]
    for impl, attention in variants:
        c = cfg.replace(attention=attention)
        model = (manual.Model if impl == "manual" else reference.Model)(c, seed=0)
        ys, closed = [], []
        for v in values:
            b, t = (B, v) if what == "seq_len" else (v, T)
            ids, targets = make_batch(c, b, t, seed=0)
            if impl == "manual":
                model.forward(ids, targets)
                ys.append(model.cache_bytes())
                closed.append(mmem.activation_bytes(c, b, t))
            else:
                ys.append(ropt.activation_saved_bytes(model, ids, targets))
        var = "T" if what == "seq_len" else "B"
        series[f"{impl} ({attention})"] = {"bytes": ys, "fit": fit_growth(values, ys, var),
                                           **({"closed_form": closed} if closed else {})}
        del model
        gc.collect()
    return {"sweep": what, "values": list(values), "fixed": {"batch_size": B} if what == "seq_len" else
            {"seq_len": T}, "series": series}


# -- dry run: the closed forms only ----------------------------------------------------------------

def dry_run(cfg, B: int, T: int, optimizer: str) -> dict:
    """The training footprint of cfg at (B, T) from the closed forms, nothing allocated.

    steady-state peak = parameters + gradients + optimizer state + manual.memory.peak_bytes (the
    transient of forward + backward above the parameters and gradients: caches, taps, tap
    gradients, the largest workspace).
    """
    from manual.registry import param_count

    closed = cmem.closed_forms(cfg, optimizer)
    act = mmem.activation_bytes(cfg, B, T)
    transient = mmem.peak_bytes(cfg, B, T)
    act_rec, block = mmem.activation_bytes(cfg, B, T, recompute="blocks"), mmem.recompute_block_bytes(cfg, B, T)
    return {"parameters_count": param_count(cfg), **closed, "activations": act,
            # recompute="blocks": block inputs + the rest kept, and one block's caches more during backward
            "activations_recompute_blocks": act_rec, "recompute_one_block": block,
            "activations_recompute_blocks_in_backward": act_rec + block,
            "forward_backward_transient": transient,
            "peak": closed["parameters"] + closed["gradients"] + closed["optimizer_state"] + transient,
            "source": "closed forms (manual/memory.py, conformance/memory.py); nothing allocated"}


# -- the conformance figures -------------------------------------------------------------------------

def conformance_figures(cfg, ids, targets, optimizer: str, impls) -> dict:
    """The figures the conformance memory checks compute, through the same functions:
    closed_forms, manual_bytes / reference_bytes after one step, Model.cache_bytes against
    activation_bytes, activation_saved_bytes, manual_peak_bytes against manual.memory.peak_bytes."""
    import manual
    import reference
    from reference import optim as ropt

    B, T = ids.shape
    out = {"closed_forms": cmem.closed_forms(cfg, optimizer),
           "activation_bytes_closed_form": mmem.activation_bytes(cfg, B, T)}
    if "manual" in impls:
        m = manual.Model(cfg, seed=0)
        mo = cmem.memory_optimizer("manual", m, optimizer)
        m.forward(ids, targets)
        m.backward()
        mo.step()
        out["manual_bytes"] = cmem.manual_bytes(m, mo)
        out["manual_cache_bytes"] = m.cache_bytes()
        peak = cmem.manual_peak_bytes(manual.Model(cfg, seed=0), ids, targets)
        predicted = mmem.peak_bytes(cfg, B, T)
        out["peak"] = {"measured": peak, "predicted": predicted, "rel_diff": (peak - predicted) / predicted,
                       "tolerance": cmem.PEAK_TOLERANCE}
    if "reference" in impls:
        r = reference.Model(cfg, seed=0)
        ro = cmem.memory_optimizer("reference", r, optimizer)
        r.forward(ids, targets)
        r.backward()
        ro.step()
        out["reference_bytes"] = cmem.reference_bytes(r, ro)
        out["reference_saved_bytes"] = ropt.activation_saved_bytes(reference.Model(cfg, seed=0), ids, targets)
    out["recompute"] = recompute_figures(cfg, ids, targets, impls)
    return out


def recompute_figures(cfg, ids, targets, impls) -> dict:
    """Activation bytes kept for backward in both modes side by side: {mode: {closed_form, manual,
    reference, ratio}} for recompute "none" and "blocks" (manual: its caches; reference: autograd's saved
    tensors, which hold the block inputs torch.utils.checkpoint keeps)."""
    import manual
    import reference
    from reference import optim as ropt

    B, T = ids.shape
    out = {}
    for mode in mmem.RECOMPUTE:
        row = {"closed_form": mmem.activation_bytes(cfg, B, T, recompute=mode)}
        if "manual" in impls:
            m = manual.Model(cfg, seed=0, recompute=mode)
            m.forward(ids, targets)
            row["manual"] = m.cache_bytes()
        if "reference" in impls:
            row["reference"] = ropt.activation_saved_bytes(reference.Model(cfg, seed=0, recompute=mode), ids, targets)
        if "manual" in row and "reference" in row:
            row["ratio"] = row["manual"] / row["reference"]
        out[mode] = row
    return out


# -- the whole profile --------------------------------------------------------------------------------

def profile(cfg, B: int, T: int, optimizer: str, impls, with_timeline: bool = True) -> dict:
    ids, targets = make_batch(cfg, B, T, seed=0)
    runners = {"manual": phases_manual, "reference": phases_reference}
    result = {"config": cfg.to_dict(), "batch_size": B, "seq_len": T, "dtype": cfg.dtype, "optimizer": optimizer,
              "impls": list(impls), "phases": {}, "saved_tensors": {}, "activation_bytes": {}}
    for impl in impls:
        res = runners[impl](cfg, ids, targets, optimizer)
        result["phases"][impl] = res["phases"]
        result["saved_tensors"][impl] = res["tensors"]
        result["activation_bytes"][impl] = res["activation_bytes"]
        gc.collect()
    result["activation_bytes"]["closed_form"] = mmem.activation_bytes(cfg, B, T)
    result["conformance"] = conformance_figures(cfg, ids, targets, optimizer, impls)
    result["churn"] = churn(cfg, ids, targets, optimizer, impls)
    if with_timeline:
        result["timeline"] = timeline(cfg, B, T, optimizer, impls)
    return result


# -- printing -------------------------------------------------------------------------------------------

def print_phases(result) -> None:
    print(f"bytes by category after each phase of the first training step "
          f"(B={result['batch_size']}, T={result['seq_len']}, {result['dtype']}, {result['optimizer']}); "
          f"closed form and measured - closed form beside each figure")
    head = f"{'phase':<15} {'category':<16} " + "".join(
        f"{impl + ' measured':>21} {'closed form':>12} {'diff':>11}" for impl in result["impls"])
    print(head)
    print("-" * len(head))
    for phase in PHASES:
        for cat in (*CATEGORIES, "total", "peak"):
            line = f"{phase if cat == 'parameters' else '':<15} {cat:<16} "
            for impl in result["impls"]:
                row = result["phases"][impl][phase]
                got = row["live"][cat] if cat in CATEGORIES else row[cat]
                line += f"{human(got):>21} {human(row['predicted'][cat]):>12} {human(row['diff'][cat]):>11}"
            print(line)
    ab = result["activation_bytes"]
    print("activation bytes kept for backward: " + ", ".join(f"{k} {v:,}" for k, v in ab.items()))


def _layer_of(module: str) -> str:
    """Reference module name -> manual layer group ('transformer.h.0.attn.c_attn' -> 'h.0.attn')."""
    if module == "(GPT.forward)":
        return "loss"
    parts = module.removeprefix("transformer.").split(".")
    if parts[0] in ("wte", "wpe"):
        return "embed"
    if parts[0] == "h":
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if parts[0] == "mtp" else parts[0]


def saved_table(result) -> list[tuple]:
    """(layer, manual row or None, reference row or None) side by side, manual layer order."""
    m_rows = result["saved_tensors"].get("manual", [])
    r_rows = result["saved_tensors"].get("reference", [])
    groups: dict[str, tuple[list, list]] = {}
    for r in m_rows:
        layer = "loss" if r["layer"].startswith("loss.") else r["layer"]
        groups.setdefault(layer, ([], []))[0].append(r)
    for r in r_rows:
        groups.setdefault(_layer_of(r["module"]), ([], []))[1].append(r)
    out = []
    for layer, (ms, rs) in groups.items():
        for i in range(max(len(ms), len(rs))):
            out.append((layer, ms[i] if i < len(ms) else None, rs[i] if i < len(rs) else None))
    return out


def print_saved(result) -> None:
    print("\nwhat each layer keeps for backward (manual: its caches; reference: autograd's saved tensors; "
          "bytes 0 = a storage already counted)")
    head = f"{'layer':<10} {'manual':<34} {'bytes':>10}   {'reference (module / grad_fn.saved)':<52} {'bytes':>10}"
    print(head)
    print("-" * len(head))
    totals: dict[str, list[int]] = {}
    for layer, m, r in saved_table(result):
        left = f"{m['name']} {tuple(m['shape'])} {m['dtype']}" if m else ""
        right = f"{r['module'].removeprefix('transformer.')} {r['op']} {tuple(r['shape'])} {r['dtype']}" if r else ""
        print(f"{layer:<10} {left[:34]:<34} {m['bytes'] if m else '':>10}   {right[:52]:<52} "
              f"{r['bytes'] if r else '':>10}")
        t = totals.setdefault(layer, [0, 0])
        t[0] += m["bytes"] if m else 0
        t[1] += r["bytes"] if r else 0
    print("per layer: " + "; ".join(f"{k} {a:,} / {b:,}" for k, (a, b) in totals.items() if a != b)
          + ("" if any(a != b for a, b in totals.values()) else "every layer equal"))


def print_churn(result) -> None:
    print("\nchurn: allocations in one steady-state training step (zero_grad, forward, backward, optimizer step)")
    for impl, c in result["churn"].items():
        what = "NumPy allocations" if impl.startswith("manual") else "torch storages"
        print(f"  {impl:<16} {c['allocations']:>6,} {what}, {human(c['bytes'])} allocated in total, "
              f"peak {human(c['peak_above_start'])} above the step's start")
        if "allocations_over_64k" in c:
            print(f"  {'':<16} {c['allocations_over_64k']:>6,} of them over 64 KiB, {human(c['bytes_over_64k'])}")
        for s in c.get("top_sites", []):
            print(f"      {s['count']:>5} x  {human(s['bytes']):>11}  {s['site']}")


def print_conformance(result) -> None:
    c = result["conformance"]
    print("\nconformance figures (conformance/memory.py, the functions the conformance memory checks call)")
    print(f"  closed forms: {c['closed_forms']}")
    for key in ("manual_bytes", "reference_bytes"):
        if key in c:
            same = c[key] == c["closed_forms"]
            print(f"  {key}: {c[key]}  {'= closed forms' if same else '!= closed forms'}")
    if "manual_cache_bytes" in c:
        print(f"  manual cache bytes {c['manual_cache_bytes']:,} vs closed form {c['activation_bytes_closed_form']:,}")
        p = c["peak"]
        print(f"  forward+backward peak (tracemalloc) {p['measured']:,} vs predicted {p['predicted']:,} "
              f"({p['rel_diff']:+.1%}, tolerance {p['tolerance']:.0%})")
    if "reference_saved_bytes" in c:
        print(f"  reference autograd saved bytes {c['reference_saved_bytes']:,}")
    rec = c["recompute"]
    print("  activation bytes kept for backward, recompute=none | recompute=blocks:")
    for key in ("closed_form", "manual", "reference", "ratio"):
        if key in rec["none"]:
            cells = [f"{rec[mode][key]:.3f}" if key == "ratio" else f"{rec[mode][key]:,}" for mode in rec]
            print(f"    {key:<12} " + " | ".join(f"{cell:>14}" for cell in cells))


def print_dry_run(name, B, T, d) -> None:
    print(f"{name} at B={B}, T={T} ({d['parameters_count']:,} parameters), from the closed forms, nothing allocated:")
    for key in ("parameters", "gradients", "optimizer_state", "activations", "forward_backward_transient", "peak"):
        print(f"  {key:<28} {d[key]:>18,} B  {human(d[key]):>12}")
    print(f"  with recompute=\"blocks\" (Model(cfg, recompute=\"blocks\"), both sides), activations kept "
          f"{d['activations_recompute_blocks']:,} B ({human(d['activations_recompute_blocks'])}), "
          f"{d['activations_recompute_blocks_in_backward']:,} B ({human(d['activations_recompute_blocks_in_backward'])}) "
          f"with the one block backward rebuilds, against {human(d['activations'])} without")
    if "ranks" in d:
        print(f"  with --shard-optimizer over {d['ranks']} ranks (ZeRO-1, parallel/zero.py), AdamW state per rank "
              f"{d['optimizer_state_per_rank_sharded']:,} B ({human(d['optimizer_state_per_rank_sharded'])}): "
              f"1/{d['ranks']} of 2 P, the last slice padded")


def print_sweep(s) -> None:
    var = "T" if s["sweep"] == "seq_len" else "B"
    print(f"activation bytes against {var} ({', '.join(f'{k}={v}' for k, v in s['fixed'].items())})")
    print(f"{var:>6} " + "".join(f"{name:>22}" for name in s["series"]))
    for i, v in enumerate(s["values"]):
        print(f"{v:>6} " + "".join(f"{ser['bytes'][i]:>22,}" for ser in s["series"].values()))
    for name, ser in s["series"].items():
        f = ser["fit"]
        print(f"  {name:<22} bytes = {f['a']:.0f} + {f['b']:.1f} {var} + {f['c']:.2f} {var}^2   -> {f['growth']} "
              f"({var}^2 term {f['quadratic_share']:.1%} of the bytes at {var} = {max(s['values'])})")


# -- plots (matplotlib, Agg) ----------------------------------------------------------------------------

COLORS = {"manual": "tab:blue", "reference": "tab:orange"}
PHASE_COLORS = {"forward": "#d9ead3", "backward": "#f4cccc", "optimizer_step": "#d9d2e9"}
HATCHES = {"parameters": "", "gradients": "//", "optimizer_state": "xx", "activations": "..", "other": "--"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9})
    return plt


def _save(fig, path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    fig.clf()


def _plot_timeline(ax, impl: str, tl: dict) -> None:
    """RSS of one implementation from the start of its first training step (t = 0), phases shaded.

    The model build (phase `init`, before t = 0) is left out of the axis and stated in the title:
    the reference's includes torch's lazy start-up (about a second), which would otherwise fill it."""
    t = np.asarray(tl["t_s"]) * 1e3
    rss = np.asarray(tl["rss_mib"])
    marks = [(name, ms * 1e3) for name, ms in tl["marks"]]
    t_build, t_end = marks[1][1], marks[-1][1]              # marks: init, forward, ..., end
    base = np.interp(t_build, t, rss)
    keep = t > t_build                                      # and the RSS at t = 0, interpolated
    for (name, a), (_, b) in zip(marks[1:], marks[2:]):
        ax.axvspan(a - t_build, b - t_build, color=PHASE_COLORS[name], lw=0)
    steps = [ms for name, ms in marks if name == "forward"] + [t_end]
    for k, (a, b) in enumerate(zip(steps, steps[1:]), start=1):
        ax.text((a + b) / 2 - t_build, 0.98, f"step {k}", transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=9)
        ax.axvline(a - t_build, color="gray", lw=0.6)
    ax.plot(np.r_[0.0, t[keep] - t_build], np.r_[0.0, rss[keep] - base], color=COLORS[impl], lw=1.8,
            marker=".", ms=5)
    ax.set_xlim(-0.02 * (t_end - t_build), (t_end - t_build) * 1.02)
    ax.set_xlabel("ms since the first training step started")
    ax.set_title(f"{impl}: RSS over {len(steps) - 1} training steps\nmodel build before t = 0 (not drawn): "
                 f"{t_build - marks[0][1]:.0f} ms, +{base - rss[0]:.0f} MiB")


def plot_profile(result, path) -> None:
    """Top: RSS over the training steps of each implementation (memory-profiler, its own fresh
    process and clock), phases shaded. Bottom: the exact bytes by category after each phase of
    the first step, manual and reference side by side, and the peak within each phase."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    timelines = result.get("timeline", {})
    fig = plt.figure(figsize=(10, 8.5))
    grid = fig.add_gridspec(2, max(1, len(timelines)), height_ratios=[1, 1.15])
    first = None
    for k, (impl, tl) in enumerate(timelines.items()):
        ax = fig.add_subplot(grid[0, k], sharey=first)
        first = first or ax
        _plot_timeline(ax, impl, tl)
        if k == 0:
            ax.set_ylabel("RSS above the first step's start (MiB)")

    ax2 = fig.add_subplot(grid[1, :])
    impls, width = result["impls"], 0.8 / len(result["impls"])
    x = np.arange(len(PHASES))
    for k, impl in enumerate(impls):
        bottom = np.zeros(len(PHASES))
        offset = x + (k - (len(impls) - 1) / 2) * width
        for cat in CATEGORIES:
            vals = np.array([result["phases"][impl][p]["live"][cat] for p in PHASES]) / 2**20
            ax2.bar(offset, vals, width * 0.95, bottom=bottom, color=COLORS[impl],
                    alpha=0.35 + 0.13 * CATEGORIES.index(cat), hatch=HATCHES[cat], edgecolor="black", lw=0.4)
            bottom += vals
        peaks = np.array([result["phases"][impl][p]["peak"] for p in PHASES]) / 2**20
        ax2.scatter(offset, peaks, marker="_", s=600, color="black", lw=2)
    handles = [Patch(color=COLORS[i], label=i) for i in impls]
    handles.append(plt.Line2D([], [], color="black", marker="_", ms=14, mew=2, ls="", label="peak within phase"))
    handles += [Patch(facecolor="white", edgecolor="black", hatch=HATCHES[c], label=c) for c in CATEGORIES]
    if timelines:
        handles += [Patch(color=c, label=f"top: {n}") for n, c in PHASE_COLORS.items()]
    ax2.legend(handles=handles, ncol=3, loc="upper left")
    ax2.set_xticks(x, [f"after {p}" for p in PHASES])
    ax2.set_ylabel("MiB (exact: tracemalloc / torch storages)")
    ax2.set_title(f"live bytes by category after each phase of the first step "
                  f"(B={result['batch_size']}, T={result['seq_len']}, {result['dtype']}, {result['optimizer']})")
    fig.suptitle(f"memory of a training step, {result['config']['d_model']}-wide {result['config']['n_layers']}"
                 f"-layer model: manual (NumPy) vs reference (PyTorch)", fontsize=12)
    _save(fig, path)
    plt.close(fig)


def plot_sweep(s, path) -> None:
    """Left: activation bytes against T (or B), measured points and the fitted a + b x + c x^2;
    manual and reference overlap (they differ by a few KiB), so they get different markers.
    Right: the same bytes per token, where the T^2 term of standard attention is a rising line and
    flash attention a flat one."""
    plt = _pyplot()
    var = "T" if s["sweep"] == "seq_len" else "B"
    label = "sequence length T (tokens)" if var == "T" else "batch size B (sequences)"
    other = s["fixed"]
    xs = np.asarray(s["values"], dtype=float)
    tokens = xs * (other["batch_size"] if var == "T" else other["seq_len"])
    fine = np.linspace(xs.min(), xs.max(), 100)
    fine_tokens = fine * (tokens[0] / xs[0])
    styles = {"manual": dict(marker="o", ms=9, mfc="none", mew=1.8, ls="-", lw=3, alpha=0.55),
              "reference": dict(marker="x", ms=7, mew=1.8, ls="--", lw=1.5, alpha=1.0)}
    colors = {"standard": "tab:red", "flash": "tab:green"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    for name, ser in s["series"].items():
        impl, attention = name.split(" (")[0], name.split("(")[1].rstrip(")")
        f = ser["fit"]
        ys = np.asarray(ser["bytes"], dtype=float)
        fit = f["a"] + f["b"] * fine + f["c"] * fine ** 2
        st = dict(styles[impl])
        line = {k: st.pop(k) for k in ("ls", "lw", "alpha")}
        for ax, y, fy in ((ax1, ys / 2**20, fit / 2**20), (ax2, ys / tokens / 2**10, fit / fine_tokens / 2**10)):
            ax.plot(xs, y, ls="", color=colors[attention], **st)
            ax.plot(fine, fy, color=colors[attention], **line)
        ax1.plot([], [], color=colors[attention], label=f"{name}: {f['growth']}", **line, **st)
    ax1.set_xlabel(label)
    ax1.set_ylabel("activation bytes kept for backward (MiB)")
    ax1.set_title(f"total: measured (marks) and fit a + b{var} + c{var}\u00b2 (lines)")
    ax1.legend(loc="upper left")
    ax2.set_xlabel(label)
    ax2.set_ylabel("KiB per token (bytes / (B\u00b7T))")
    ax2.set_title("per token: the T\u00b2 term is the rising line" if var == "T" else
                  "per token: flat = linear in B")
    fixed = ", ".join(f"{k} = {v}" for k, v in other.items())
    fig.suptitle(f"activation memory against {var} ({fixed}): standard attention keeps (B, H, T, T) "
                 f"probabilities, flash only (B, H, T)", fontsize=11)
    _save(fig, path)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------------------

def estimated_run_bytes(cfg, B: int, T: int, optimizer: str) -> int:
    """What a real run needs at most, from the closed forms: the steady-state peak of one
    implementation, doubled for the reference's extra copies (retained tap gradients and their
    NumPy copies) and for the init's float64 temporaries."""
    return 2 * dry_run(cfg, B, T, optimizer)["peak"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--impl", default="both", choices=["manual", "reference", "both"])
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's batch size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                   help=f"sgd runs with momentum {cmem.SGD_MOMENTUM} (one state buffer per parameter)")
    p.add_argument("--attention", default=None, choices=["standard", "flash"], help="default: the preset's")
    p.add_argument("--json", metavar="PATH", help="write every table to this JSON file")
    p.add_argument("--plot", metavar="PNG", help="write the timeline + category chart (or the sweep chart) here")
    p.add_argument("--sweep", choices=["seq_len", "batch"], help="activation bytes against T or B instead")
    p.add_argument("--sweep-values", type=int, nargs="+", metavar="N", help="the T or B values of --sweep")
    p.add_argument("--dry-run", action="store_true", help="size the config from the closed forms; allocate nothing")
    p.add_argument("--ranks", type=int_at_least(1), default=None, metavar="N",
                   help="with --dry-run: also the AdamW state per rank when N ranks shard it (--shard-optimizer, ZeRO-1)")
    p.add_argument("--no-timeline", action="store_true", help="skip the RSS timeline (memory-profiler)")
    p.add_argument("--timeline-child", choices=IMPLS, help=argparse.SUPPRESS)   # internal: see timeline()
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--max-gb", type=float_at_least(0.0, strict=True), default=8.0,
                   help="refuse a real run whose estimated footprint exceeds this many GiB (default 8)")
    return p


@cli("memprof.py")
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    output_file(args.json, "--json")         # checked before any work (tools/_cli.py): one line, exit 2
    output_file(args.plot, "--plot")
    if args.timeline_child:
        cfg = ModelConfig.from_json(args.config_json)
        timeline_child(cfg, args.batch_size, args.seq_len, args.optimizer, args.timeline_child, args.steps)
        return 0
    overrides = {"dtype": args.dtype, **({"attention": args.attention} if args.attention else {})}
    cfg = ModelConfig.preset(args.preset, **overrides)
    B = args.batch_size if args.batch_size is not None else PRESETS[args.preset].train.get("batch_size", 4)
    T = args.seq_len if args.seq_len is not None else cfg.max_seq_len
    if B < 1:
        p.error(f"--batch-size must be >= 1, got {B}")
    if not 1 <= T <= cfg.max_seq_len:
        p.error(f"--seq-len {T} is outside [1, {cfg.max_seq_len}] (max_seq_len of preset {args.preset})")
    if args.sweep_values and not args.sweep:
        p.error("--sweep-values needs --sweep seq_len or --sweep batch")
    if args.sweep_values:
        bad = [v for v in args.sweep_values if v < 1 or (args.sweep == "seq_len" and v > cfg.max_seq_len)]
        if bad:
            p.error(f"--sweep-values {bad} are outside [1, {cfg.max_seq_len if args.sweep == 'seq_len' else 'inf'}]")
        if len(set(args.sweep_values)) < 3:
            p.error(f"--sweep-values needs at least 3 distinct values to fit a + b x + c x^2, got {args.sweep_values}")
    if args.dry_run and args.sweep:
        p.error("--dry-run and --sweep are separate modes; choose one")
    impls = IMPLS if args.impl == "both" else (args.impl,)

    if args.dry_run:
        d = dry_run(cfg, B, T, args.optimizer)
        if args.ranks is not None:
            d["optimizer_state_per_rank_sharded"] = mmem.sharded_adamw_state_bytes(cfg, args.ranks)
            d["ranks"] = args.ranks
        print_dry_run(args.preset, B, T, d)
        result = {"preset": args.preset, "batch_size": B, "seq_len": T, "dtype": args.dtype,
                  "optimizer": args.optimizer, "config": cfg.to_dict(), "dry_run": d}
    else:
        b, t = B, T                              # the largest run this command would make
        if args.sweep:
            xs = args.sweep_values or [T if args.sweep == "seq_len" else 2 * B]
            b, t = (B, max(xs)) if args.sweep == "seq_len" else (max(xs), T)
        need = estimated_run_bytes(cfg, b, t, args.optimizer)
        if need > args.max_gb * 2**30:
            small_T = min(64, cfg.max_seq_len)
            small = human(estimated_run_bytes(cfg, 1, small_T, args.optimizer))
            p.error(f"a real run of {args.preset} at B={b}, T={t} needs an estimated {human(need)} "
                    f"(closed-form peak {human(dry_run(cfg, b, t, args.optimizer)['peak'])}, x2 for the reference's "
                    f"extra copies), over --max-gb {args.max_gb:g}. Use --dry-run to size it without allocating, "
                    f"pick a smaller --batch-size / --seq-len (--batch-size 1 --seq-len {small_T} needs about {small}), "
                    f"or raise --max-gb.")
        if args.sweep:
            result = {"preset": args.preset, "dtype": args.dtype, "config": cfg.to_dict(),
                      **sweep(cfg, B, T, args.sweep, args.sweep_values)}
            print_sweep(result)
            if args.plot:
                plot_sweep(result, args.plot)
        else:
            result = {"preset": args.preset, **profile(cfg, B, T, args.optimizer, impls,
                                                       with_timeline=not args.no_timeline)}
            print_phases(result)
            print_saved(result)
            print_churn(result)
            print_conformance(result)
            if args.plot:
                plot_profile(result, args.plot)
        if args.plot:
            result["plot"] = str(args.plot)
            print(f"wrote {args.plot}")
    if args.json:
        write_output(args.json, json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
