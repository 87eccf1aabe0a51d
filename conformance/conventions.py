"""Dump conventions that must not mislead: which entries are compared, in which dtype, and what a
dump without tap gradients can and cannot tell.

An implementation under test (manual/, a Python port loaded with --impl, or an outside program's
dump) is compared tensor by tensor with the reference. Three things differ between correct ports
without being bugs, and each is settled here, once, for every caller (conformance engine, the
outside-program harness, the debugger):

1. Masked attention entries (`masked_entries`). Causal attention replaces the score of every key j
   in the future of query i (j > i) before the softmax. What a port stores in those entries of the
   score tap is its own business: the reference keeps the unmasked scaled score there, most
   hand-written code stores -inf, some -1e9 or 0. None of it can reach the loss. Likewise the loss
   does not depend on those scores at all, so the gradient there is 0 by definition, and the
   gradient with respect to the masked probabilities is multiplied by p_ij = 0 in the softmax
   backward, so it never reaches the loss either (the reference keeps dy v^T there; a port may
   store 0). These entries are not compared:

       h.{i}.attn.att          (B, H, T, T)  entries with key j > query i   any stored value ignored
       grad.h.{i}.attn.att     (B, H, T, T)  entries with key j > query i   any stored value ignored
       grad.h.{i}.attn.probs   (B, H, T, T)  entries with key j > query i   any stored value ignored

   `h.{i}.attn.probs` itself IS compared everywhere: its masked entries are exactly 0 in every
   correct implementation (exp(-inf) = 0, and exp(-1e9 - max) underflows to exactly 0 in float32
   and float64), and a nonzero value there changes ctx = probs v, so it is a real bug.

2. The dtype of a dump (`dtype_policy`). A dump must be in the case's dtype. When it is not, the
   outside-program harness (strict) reports one line, "wrong dtype", for the configuration; the
   debugger (not strict) compares at the looser dtype's tolerance, converting both sides to the
   looser dtype, and every row says so. Never rows of inf.

3. A dump without tap gradients (`missing_tap_grads_warning`). With only parameter gradients, the
   first gradient that differs, in backward order, can belong to a layer *upstream* of the cause: a
   wrong layer-norm backward in ln_f is correct about ln_f's own weight and bias gradients (they
   need only the incoming gradient) and hands a wrong gradient to the block below, whose
   parameter gradients are then the first to differ. The warning says so and asks for grad.<tap>.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from manual import registry
from manual.config import ModelConfig

MASK_REASON = ("causal mask: key j > query i cannot affect the loss (the score is replaced before the softmax; "
               "its gradients are multiplied by p = 0)")

_MASKED = re.compile(r"^(grad\.)?h\.\d+\.attn\.(att|probs)$")


def masked_entries(name: str, shape: tuple) -> np.ndarray | None:
    """Boolean mask (shape `shape`) of the entries of dump key `name` that are not compared, or None.

    `name` is a dump key: a tap ("h.0.attn.att"), "grad.<tap>", "grad.<param>" or "loss". Only the
    score tap and the two attention gradients have such entries (see the module docstring)."""
    m = _MASKED.match(name)
    if m is None or (m.group(2) == "probs" and m.group(1) is None) or len(shape) != 4 or shape[-1] != shape[-2]:
        return None
    T = shape[-1]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)                       # (T, T) key j > query i
    return np.broadcast_to(future, shape)                                     # (B, H, T, T) read-only view


def apply_mask(name: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(a, b, n_excluded): copies of a and b with the ignored entries set to 0 in both, so any value a
    port stored there (-inf, -1e9, 0, NaN) compares equal. Unchanged inputs and 0 when nothing is masked
    or the shapes differ (the shape check reports that)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return a, b, 0
    mask = masked_entries(name, b.shape)
    if mask is None:
        return a, b, 0
    a, b = a.copy(), b.copy()
    a[mask] = 0
    b[mask] = 0
    return a, b, int(mask.sum())


# -- dtypes ----------------------------------------------------------------------------------------

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class DumpDtypeError(ValueError):
    """A dump's dtype cannot be compared with the case (one line, says what to do)."""


@dataclass(frozen=True)
class DtypePolicy:
    compare_dtype: np.dtype     # both sides are converted to this dtype and compared at its tolerance
    note: str                   # "" when the dump is in the case's dtype


def dtype_policy(dump_dtype, case_dtype, *, strict: bool, key: str = "") -> DtypePolicy:
    """How a tensor of `dump_dtype` is compared in a case of `case_dtype`.

    Same dtype: compared as is. Strict (outside programs were told the dtype in the case): any other
    dtype raises DumpDtypeError. Not strict (a dump handed to the debugger): float32 against float64,
    either way round, is compared at float32's tolerance with a note; anything else raises."""
    dump_dtype, case_dtype = np.dtype(dump_dtype), np.dtype(case_dtype)
    what = f"{key} has dtype {dump_dtype}" if key else f"the dump has dtype {dump_dtype}"
    if dump_dtype == case_dtype:
        return DtypePolicy(case_dtype, "")
    if strict or dump_dtype not in FLOAT_DTYPES:
        raise DumpDtypeError(f"wrong dtype: {what}, the case is {case_dtype}; write {case_dtype} "
                             f"(or export the case with --dtype {dump_dtype} if your implementation computes in it)")
    looser = np.dtype(np.float32)
    return DtypePolicy(looser, f"dump {dump_dtype}, case {case_dtype}: compared at float32's tolerance")


# -- what a dump holds -------------------------------------------------------------------------------

def tap_names(cfg: ModelConfig) -> list[str]:
    return [s.name for s in registry.tap_specs(cfg)]


def missing_tap_grads_warning(keys, cfg: ModelConfig) -> str | None:
    """The warning for a dump that has parameter gradients but no tap gradients (None otherwise)."""
    keys = set(keys)
    has_tap_grads = any(f"grad.{n}" in keys for n in tap_names(cfg))
    has_param_grads = any(f"grad.{n}" in keys for n in registry.param_shapes(cfg))
    if has_tap_grads or not has_param_grads:
        return None
    return ("warning: the dump holds parameter gradients but no tap gradients (grad.<tap>). The first parameter "
            "gradient that differs can belong to a layer before the cause in the forward pass: a wrong backward "
            "hands a wrong gradient to the layer below it, whose parameter gradients are the first to differ. Write "
            "grad.<tap> for the taps you have (at least grad.h.<i>.out and grad.ln_f.out) to locate it.")
