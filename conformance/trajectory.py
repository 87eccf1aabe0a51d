"""The optimizer trajectory: N optimizer steps on both sides from the same weights and batches,
compared step by step. One generator serves the conformance engine (which keeps the worst step
of every tensor) and the debugger (which stops at the first step that disagrees and judges it).

Each step, in this order (the order the debugger reports the first divergence in):

    (resume               SETUP "resume": both sides' optimizers rebuilt from their state_dict first)

    loss                  the forward's loss
    grad.<p>              every parameter gradient, registry order
    grad_norm             clipping (OPTIMIZERS; AdamW: global 2-norm 1.0), then clipped_grad.<p>
    param.<p>             every parameter after the step
    optim.<state>.<p>     the optimizer state (exp_avg, exp_avg_sq / momentum_buffer), registry order

Teacher forcing (FORCED_NOTE): in float32 AdamW the manual optimizer steps on the reference's
gradients, after both gradients have been compared. Every other trajectory runs free.
Comparisons are named `<kind>.<what>`, e.g. `adamw.param.transformer.wte.weight`, check "optimizer".
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import numpy as np

from manual import registry

from .compare import Comparison, compare, missing

# kind -> (hyperparameters, clipping or None). Clipping: a number is global 2-norm clipping to it (the
# two default kinds; conformance/external.py and the debugger read it so); ("norm", max_norm, norm_type)
# clips by another norm (clip_grad_norm_), ("value", v) clamps every element to [-v, v] (clip_grad_value_).
# lr 1e-3 is the tiny preset's (the blog's) rate. At 1e-2 this tiny model on random tokens
# trains unstably (gradient norm jumping 1.6 -> 9.2) and any 1e-16 difference grows ~10x per
# step in both dtypes: chaos, not a disagreement (measured; see README).
# Every option of manual/optim.py is set away from its default by some kind (issue 16): the two
# defaults run in every case; the others in the matrix's "optim_*" variants (conformance/matrix.py).
OPTIMIZERS = {
    "adamw": (dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8), 1.0),
    "sgd": (dict(lr=0.1, momentum=0.9, weight_decay=0.01), None),
    # betas, eps and weight decay all away from the others; clipping by value (elements of the
    # tiny model's gradients reach ~0.05, so 0.004 clamps a good share of them)
    # beta1 0.4, and 0.9 in the no-decay group (SETUP): lerp's weight 1 - beta1 >= 0.5 and < 0.5, both
    # branches of optim._lerp_ (torch's too); exact=True: the manual AdamW's operation-for-operation torch
    # mirror (a manual-only option)
    "adamw_opts": (dict(lr=3e-3, weight_decay=0.3, betas=(0.4, 0.99), eps=1e-3, exact=True), ("value", 0.004)),
    # on the fused (default, exact=False) path: beta1 0.3 (lerp's weight >= 0.5: its other branch); the
    # no-decay group with its own lr, betas and eps, the token embedding a third group (SETUP); resumed
    # from a state_dict after step 1
    "adamw_groups": (dict(lr=2e-3, weight_decay=0.05, betas=(0.3, 0.9), eps=1e-6), 0.5),
    # the embeddings frozen (SETUP): an optimizer over the other parameters only
    # (weight decay 1.0, as grokking recipes use: the per-tensor path with the decay factor at wd exactly 1)
    "adamw_frozen": (dict(lr=1e-3, weight_decay=1.0, betas=(0.8, 0.99), eps=1e-7), None),
    # Nesterov momentum (needs dampening 0), max-norm clipping by the inf-norm, no weight decay (so no
    # groups either: the optimizer's default of one group over every parameter)
    "sgd_nesterov": (dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.0), ("norm", 0.02, float("inf"))),
    # dampening; clipping by the 1-norm
    "sgd_dampening": (dict(lr=0.1, momentum=0.7, dampening=0.3, weight_decay=0.02), ("norm", 2.0, 1.0)),
    # no momentum: the plain step (no state), clipping by a 3-norm
    "sgd_plain": (dict(lr=0.2, weight_decay=0.05), ("norm", 0.5, 3.0)),
}
DEFAULT_OPTIMIZERS = ("adamw", "sgd")

# kind -> how the trajectory sets its optimizers up beyond OPTIMIZERS' hyperparameters, the same on both
# sides (a kind not listed: none of it). Real recipes do all three. The keys:
#   no_decay   hyperparameters of the no-decay group (biases, layer norms, embeddings) over the kind's
#   frozen     parameters left out of the optimizer: neither side updates them (their gradients are
#              still computed and compared; both sides zero them with the model's zero_grad)
#   resume     after this step, each side's optimizer is replaced by a fresh one that loads the old
#              one's state_dict (a run resumed from a checkpoint); the next steps compare as before
# What they reach in manual/optim.py (issue 16's coverage): the no-decay group's own lr, betas and eps cut
# the fused AdamW's chunks into runs; the no-decay groups' beta1 0.85 and 0.9 (lerp weight < 0.5) take one
# lerp branch of the fused and the exact path, the decay groups' beta1 0.3 and 0.4 (weight >= 0.5) the
# other; frozen embeddings leave the gradients short of the flat buffer, so AdamW takes its per-tensor
# path; a resume moves the loaded state into the fused path's flat buffers.
SETUP = {
    "adamw_opts": dict(no_decay=dict(betas=(0.9, 0.999))),
    # the token embedding in a third group of its own lr (as recipes with an embedding learning rate do):
    # the first two parameters (wte, wpe) then differ, so the fused AdamW's plan must cut a run there
    "adamw_groups": dict(no_decay=dict(lr=5e-3, betas=(0.85, 0.99), eps=1e-8), resume=1,
                         own=dict(group=dict(lr=1e-3), names=("transformer.wte.weight",))),
    "adamw_frozen": dict(frozen=("transformer.wte.weight", "transformer.wpe.weight")),
}

STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")   # the order state tensors are compared in

FORCED_NOTE = (
    "teacher-forced: float32 AdamW steps on the reference's gradients. AdamW divides each "
    "gradient element by its own running rms: for an element with |g| near eps (1e-8) the update "
    "g/(|g|+eps) moves by up to lr * dg/eps for a rounding difference dg, so float32 gradient "
    "rounding (~1e-7 of scale, compared separately each step) becomes lr-sized parameter "
    "differences within one step (measured 3e-5 at lr 1e-3). Free-running float64 AdamW and "
    "float32 SGD are not forced.")


def teacher_forced(kind: str, dtype) -> bool:
    """Is this trajectory teacher-forced (see FORCED_NOTE)?"""
    return optimizer_family(kind) == "adamw" and np.dtype(dtype) == np.float32


def make_optimizers(manual_optim, m, r, kind: str):
    """The trajectory's optimizers over the decay groups (with the kind's SETUP): (manual optimizer,
    torch optimizer). `manual_optim` is a module with SGD, AdamW and clip_grad_norm_ (Sides.manual_optim)."""
    from reference import optim as ropt

    hp, _clip = OPTIMIZERS[kind]
    setup = SETUP.get(kind, {})
    frozen = set(setup.get("frozen", ()))
    groups = registry.decay_groups(m.cfg, hp["weight_decay"])
    groups[1].update(setup.get("no_decay", {}))
    if "own" in setup:          # some names moved out of their group into one with its own settings
        own = setup["own"]
        source = next(g for g in groups if set(own["names"]) <= set(g["names"]))
        source_names = source["names"]
        source["names"] = [n for n in source_names if n not in own["names"]]
        groups.append({**source, **own["group"], "names": [n for n in source_names if n in own["names"]]})
    groups = [{**g, "names": [n for n in g["names"] if n not in frozen]} for g in groups]
    family = optimizer_family(kind)
    cls = manual_optim.AdamW if family == "adamw" else manual_optim.SGD
    params, grads = m.params, m.grads            # the model's live dicts, or the part the optimizer trains
    if frozen:
        params, grads = ({n: d[n] for n in d if n not in frozen} for d in (m.params, m.grads))
    # without weight decay (and SETUP) every decay group has 0: one default group is the same optimizer
    mo = cls(params, grads, groups=groups if hp["weight_decay"] or setup else None, **hp)
    torch_hp = {k: v for k, v in hp.items() if k not in MANUAL_ONLY}
    return mo, ropt.make_optimizer(r, kind=family, groups=groups, **torch_hp)


def resume(manual_optim, m, r, kind: str, mo, ro):
    """Fresh optimizers of `kind` that load the state_dict of `mo` and `ro` (the manual one's metadata
    through JSON, the torch one's deep-copied, as if both came from a checkpoint)."""
    tensors, meta = mo.state_dict()
    saved = copy.deepcopy(ro.state_dict())
    mo, ro = make_optimizers(manual_optim, m, r, kind)
    mo.load_state_dict(tensors, json.loads(json.dumps(meta)))
    ro.load_state_dict(saved)
    return mo, ro


MANUAL_ONLY = ("exact",)     # options of manual/optim.py that torch's optimizers do not have


def optimizer_family(kind: str) -> str:
    """'adamw' or 'sgd': the optimizer class of an OPTIMIZERS kind."""
    return kind.split("_")[0]


def clip(manual_optim, m, r, spec):
    """Clip both sides' gradients by `spec` (see OPTIMIZERS); returns (manual, reference) norms, or
    None for clipping by value (no norm to compare)."""
    import torch
    from reference import optim as ropt

    if isinstance(spec, (int, float)):
        spec = ("norm", float(spec), 2.0)
    if spec[0] == "value":      # (gradients as a list: the other input form of the clipping functions)
        manual_optim.clip_grad_value_(list(m.grads.values()), spec[1])
        ropt.clip_grad_value(r, spec[1])
        return None
    _, max_norm, norm_type = spec
    if norm_type == 2.0:
        return manual_optim.clip_grad_norm_(m.grads, max_norm), ropt.clip_grad_norm(r, max_norm)
    # other norm types: torch's own clip_grad_norm_ (reference.optim.clip_grad_norm is the 2-norm)
    norm_reference = torch.nn.utils.clip_grad_norm_(list(r._params.values()), max_norm, norm_type=norm_type,
                                                    error_if_nonfinite=True, foreach=False)
    return manual_optim.clip_grad_norm_(m.grads, max_norm, norm_type=norm_type), float(norm_reference)


@dataclass
class Before:
    """The reference's side of one step, kept for a judge that redoes the step in float64."""
    params: dict                 # parameters before the step
    state: dict                  # optimizer state before the step (optim.<key>.<name>)
    grads: dict = field(default_factory=dict)     # gradients of the step's batch, unclipped
    clipped: dict = field(default_factory=dict)   # ... after clipping (= grads without a clip)


@dataclass
class Step:
    """One step of the trajectory: its comparisons, in the order above."""
    step: int                    # 1-based
    batch: tuple                 # (ids, targets)
    rows: list[Comparison]
    before: Before | None        # with snapshots=True
    manual_state: dict           # optim.<key>.<name> after the step
    reference_state: dict
    manual: object               # the two models after the step (live: the next step changes them)
    reference: object

    @property
    def first_failure(self) -> Comparison | None:
        return next((c for c in self.rows if not c.passed), None)


def _state_order(names: list[str]):
    order = {f"optim.{key}.{n}": i for i, (key, n) in
             enumerate((key, n) for key in STATE_KEYS for n in names)}
    return lambda k: (order.get(k, len(order)), k)


def run(manual_optim, m, r, kind: str, batches, label: str = "", snapshots: bool = False):
    """Yield one `Step` per batch: `m` (manual side) and `r` (reference.Model) step with the
    `kind` optimizer of OPTIMIZERS from their current weights. With snapshots=True every
    Step carries the reference's parameters, state and gradients from before the step."""
    from reference import optim as ropt

    cfg = m.cfg
    dt = np.dtype(cfg.dtype)
    _hp, clip_spec = OPTIMIZERS[kind]
    setup = SETUP.get(kind, {})
    mo, ro = make_optimizers(manual_optim, m, r, kind)
    forced = FORCED_NOTE if teacher_forced(kind, dt) else ""
    names = [s.name for s in registry.param_specs(cfg)]
    state_order = _state_order(names)

    for step, (ids, targets) in enumerate(batches, start=1):
        rows: list[Comparison] = []

        def cmp(a, b, what, note=""):
            rows.append(compare(a, b, tensor=f"{kind}.{what}", check="optimizer", config=label, step=step,
                                expect_dtype=dt, note=note))

        def cmp_params(mine: dict, theirs: dict, what: str, note=""):   # every parameter, registry order
            for n in names:
                cmp(mine.get(n, missing()), theirs[n], f"{what}.{n}", note)

        if step - 1 == setup.get("resume"):
            mo, ro = resume(manual_optim, m, r, kind, mo, ro)
        mo.zero_grad()
        if setup.get("frozen"):
            m.zero_grad()                # the frozen parameters' gradients too, as r.zero_grad() does
        r.zero_grad()
        before = Before({n: v.copy() for n, v in r.params.items()}, ropt.optimizer_state(r, ro)) \
            if snapshots else None
        loss_manual = m.forward(ids, targets)
        loss_reference = r.forward(ids, targets)
        cmp(np.asarray(loss_manual, dt), np.asarray(loss_reference, dt), "loss")
        m.backward()
        r.backward()
        rg = r.grads
        cmp_params(m.grads, rg, "grad")
        if before is not None:
            before.grads = before.clipped = rg
        if forced:
            for n, g in rg.items():
                m.grads[n][...] = g
        if clip_spec is not None:
            norms = clip(manual_optim, m, r, clip_spec)
            if norms is not None:
                cmp(np.asarray(norms[0], dt), np.asarray(norms[1], dt), "grad_norm")
            rg = r.grads
            cmp_params(m.grads, rg, "clipped_grad", forced)
            if before is not None:
                before.clipped = rg
        mo.step()
        ro.step()
        cmp_params(m.params, r.params, "param", forced)
        mstate, _meta = mo.state_dict()
        rstate = ropt.optimizer_state(r, ro)
        for key in sorted(set(mstate) | set(rstate), key=state_order):
            cmp(mstate.get(key, missing()), rstate.get(key, missing()), key, forced)
        yield Step(step, (ids, targets), rows, before, mstate, rstate, m, r)
