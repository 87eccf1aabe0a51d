"""Who is wrong: for the layer that wrote the first divergent tensor, each side is judged against
something that is neither of them.

  * forward divergence: each side's output against the float64 oracle (conformance/oracle.py)
    recomputed from the layer's inputs, compared with conformance.compare.compare;
  * backward divergence: a float64 finite-difference check of both sides' backward (manual:
    manual/layers' functions on the captured input; reference: torch autograd on its own
    submodule): each gradient along FD_DIRECTIONS random directions per argument,
    (L(x + h v) - L(x - h v)) / 2h against <grad, v>, L = sum(dout * layer(x)) with the oracle's
    forward, relative error <= compare.FD_REL_TOL;
  * optimizer divergence: the step (or the clipping) redone in float64 from the reference's
    state before it, compare.compare_recomputed.

The verdict is "manual", "reference", "dump", "neither (...)" or "both"; every tolerance comes
from conformance/compare.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from conformance.compare import BLAME_RATIO, FD_REL_TOL, Comparison, compare, compare_recomputed
from conformance.trajectory import OPTIMIZERS, Step
from manual import registry
from manual.config import ModelConfig

from .graph import LAYER_FILES, Node, culprits, nodes
from .layers import manual_layer, oracle_outputs, reference_layer, roles
from .walk import Setup

FD_DIRECTIONS = 3          # random directions per argument in the finite-difference check
FD_STEP = 1e-5             # h = FD_STEP * max(rms of the argument, 1e-2)

FINITE_DIFFERENCES = "finite differences"
RECOMPUTATION = "the float64 recomputation"


@dataclass
class SideCheck:
    """One side judged by one check."""
    agrees: bool
    errors: dict = field(default_factory=dict)   # argument or tensor -> its error
    tol: float | None = None                     # the error each entry of `errors` may have
    badness: float = 0.0                         # worst error / tol (inf: wrong where nothing is allowed)


@dataclass
class LayerCheck:
    """One check of one layer (or optimizer step) on every side it could run."""
    layer: str
    method: str                                  # what the sides were judged against, in words
    sides: dict = field(default_factory=dict)    # side -> SideCheck
    note: str = ""
    error: str = ""                              # the check could not run: why


@dataclass
class Blame:
    checks: list                                 # [LayerCheck]
    verdict: str                                 # "manual", "reference", "dump", "both", "neither (...)", ...
    detail: str = ""                             # what to look at next
    origin: str = ""                             # a dump without tap gradients: the backward inferred wrong

    def as_json(self) -> dict:
        return asdict(self)


def verdict(sides: dict, judge: str) -> str:
    """The side(s) that disagree with `judge`; of two, the one BLAME_RATIO times worse, else both."""
    if not sides:
        return "unknown (no check applies)"
    bad = sorted((s for s, c in sides.items() if not c.agrees), key=lambda s: sides[s].badness, reverse=True)
    if not bad:
        return f"neither (both agree with {judge}; the difference is precision)"
    if len(bad) == 1 or sides[bad[0]].badness > BLAME_RATIO * max(sides[bad[1]].badness, 1e-300):
        return bad[0]
    return "both"


def _float64(d: dict) -> dict:
    return {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}


def _side(c: Comparison) -> SideCheck:
    return SideCheck(c.passed, {c.tensor: c.max_abs}, c.tol, c.badness)


# -- one layer's forward and backward ---------------------------------------------------------------

def blame_backward(node: Node, cfg: ModelConfig, params: dict, ref_taps: dict, ids, targets,
                   manual_available: bool = True) -> LayerCheck:
    """Float64 finite-difference check of one layer's backward on both sides."""
    import reference
    cfg64 = cfg.replace(dtype="float64")
    params64 = _float64(params)
    p = roles(node, params64)
    x = {t: np.asarray(ref_taps[t], dtype=np.float64) for t in node.inputs}
    rng = np.random.default_rng(1234)
    main = node.outputs[-1]
    y0 = oracle_outputs(node, cfg64, x, p, ids, targets)[main]
    dout = np.asarray(1.0) if node.kind == "loss" else rng.standard_normal(np.shape(y0))
    grads = {}
    if manual_available:
        grads["manual"] = manual_layer(node, cfg64, x, p, dout, ids, targets)[1]
    module = reference.Model.from_params(cfg64, params64).module
    grads["reference"] = reference_layer(node, module, cfg64, x, dout, ids, targets)[1]

    def total(xx, pp):
        return float(np.sum(dout * oracle_outputs(node, cfg64, xx, pp, ids, targets)[main]))

    errors = {side: {} for side in grads}
    for arg in list(node.inputs) + list(node.params):
        is_input = arg in x
        base = x[arg] if is_input else p[arg]
        worst = {side: 0.0 for side in grads}
        for _ in range(FD_DIRECTIONS):
            v = rng.standard_normal(base.shape)
            rms = float(np.sqrt(np.mean(base ** 2))) if base.size else 0.0
            h = FD_STEP * max(rms, 1e-2)
            plus, minus = (dict(x), dict(x)) if is_input else (dict(p), dict(p))
            plus[arg], minus[arg] = base + h * v, base - h * v
            fd = ((total(plus, p) - total(minus, p)) if is_input else (total(x, plus) - total(x, minus))) / (2 * h)
            scale = max([abs(fd)] + [float(np.sum(np.abs(g[arg] * v))) for g in grads.values()]) + 1e-300
            for side, g in grads.items():
                worst[side] = max(worst[side], abs(float(np.sum(g[arg] * v)) - fd) / scale)
        label = arg if is_input else node.params[arg]
        for side in grads:
            errors[side][label] = worst[side]
    sides = {side: SideCheck(all(e <= FD_REL_TOL for e in errs.values()), errs, FD_REL_TOL,
                             max(errs.values(), default=0.0) / FD_REL_TOL) for side, errs in errors.items()}
    return LayerCheck(node.name, f"finite differences (float64, {FD_DIRECTIONS} random directions per argument, "
                                 f"tol {FD_REL_TOL:g}); relative error of each gradient", sides)


def blame_forward(node: Node, cfg: ModelConfig, params: dict, ref_taps: dict, side_tensors: dict, ids, targets,
                  tensor: str) -> LayerCheck:
    """Each side's output of one layer against the float64 oracle, recomputed from the layer's inputs."""
    cfg64 = cfg.replace(dtype="float64")
    p = roles(node, _float64(params))
    x = {t: np.asarray(ref_taps[t], dtype=np.float64) for t in node.inputs}
    want = oracle_outputs(node, cfg64, x, p, ids, targets)[tensor]
    sides = {}
    for side, tensors in side_tensors.items():
        got = np.asarray(tensors[tensor])
        sides[side] = _side(compare(got, want.astype(got.dtype), tensor=tensor, check="oracle",
                                    expect_dtype=got.dtype))
    return LayerCheck(node.name, "float64 recomputation from the layer's inputs (conformance/oracle.py)", sides)


def blame_layer(setup: Setup, tensor: str, ref: dict, under: dict, other: str) -> Blame:
    """Judge every layer that wrote `tensor` (two for the tied embedding); `other` is the side under
    test ("manual" or "dump"), `under` its tensors, `ref` the reference's."""
    cfg = setup.cfg
    checks: list[LayerCheck] = []
    for node in culprits(cfg, tensor):
        if node.kind == "add":
            checks.append(LayerCheck(node.name, "residual add (its backward copies the gradient)"))
            continue
        try:
            if not tensor.startswith("grad."):
                res = blame_forward(node, cfg, setup.params, ref, {other: under, "reference": ref}, setup.ids,
                                    setup.targets, tensor)
            else:
                res = blame_backward(node, cfg, setup.params, ref, setup.ids, setup.targets,
                                     manual_available=other == "manual")
                if other != "manual":
                    res.note = ("the dump's layer cannot be run here: the reference's backward is checked; "
                                "if it agrees with finite differences, the dump is wrong")
                    res.sides[other] = SideCheck(not res.sides["reference"].agrees)
        except Exception as exc:   # the check is a diagnosis aid: report, never crash the walk
            res = LayerCheck(node.name, "check failed", error=f"{type(exc).__name__}: {exc}")
        checks.append(res)
    combined: dict[str, SideCheck] = {}
    for res in checks:
        for side, sc in res.sides.items():
            old = combined.get(side, SideCheck(True))
            combined[side] = SideCheck(old.agrees and sc.agrees, badness=max(old.badness, sc.badness))
    judge = FINITE_DIFFERENCES if tensor.startswith("grad.") else RECOMPUTATION
    return Blame(checks, verdict(combined, judge))


# -- one optimizer step -----------------------------------------------------------------------------

def opt_where(tensor: str, kind: str, step: int) -> str:
    """Which code wrote an optimizer-trajectory tensor."""
    what = tensor[len(kind) + 1:]
    if what == "loss" or what.startswith("grad."):
        return (f"step {step}'s forward/backward (manual/model.py: Model.forward / Model.backward, after "
                f"the optimizer's zero_grad)")
    if what == "grad_norm" or what.startswith("clipped_grad."):
        return f"step {step}'s gradient clipping (manual/optim.py: clip_grad_norm_)"
    return f"step {step}'s update (manual/optim.py: {'AdamW' if kind == 'adamw' else 'SGD'}.step)"


def textbook_step(kind: str, hp: dict, p, g, state: dict, step: int, wd: float):
    """One optimizer step in float64, torch's documented formulas. Returns (param, {state})."""
    p, g = p.astype(np.float64), g.astype(np.float64)
    if kind == "adamw":
        b1, b2 = hp["betas"]
        m0 = state.get("exp_avg", np.zeros_like(p)).astype(np.float64)
        v0 = state.get("exp_avg_sq", np.zeros_like(p)).astype(np.float64)
        p = p * (1 - hp["lr"] * wd)
        m = b1 * m0 + (1 - b1) * g
        v = b2 * v0 + (1 - b2) * g * g
        p = p - hp["lr"] / (1 - b1 ** step) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** step) + hp["eps"])
        return p, {"exp_avg": m, "exp_avg_sq": v}
    d = g + wd * p
    buf = d if "momentum_buffer" not in state else hp["momentum"] * state["momentum_buffer"] + d
    return p - hp["lr"] * buf, {"momentum_buffer": buf}


def _recomputed(got, want, tensor: str) -> SideCheck:
    if got is None:
        return SideCheck(False, {tensor: math.inf}, badness=math.inf)   # the side has no such tensor
    return _side(compare_recomputed(got, want, tensor=tensor, check="recomputation"))


def blame_optimizer(bad: Comparison, sides, kind: str, step: Step, cfg: ModelConfig) -> Blame:
    """Who is wrong at the first disagreeing comparison `bad` of a trajectory step (with snapshots)."""
    hp, clip = OPTIMIZERS[kind]
    before, m, r = step.before, step.manual, step.reference
    what = bad.tensor[len(kind) + 1:]
    layer = f"{kind} step {step.step}"
    if what.startswith("grad.") or what == "loss":
        # one forward/backward of a FRESH manual model at these weights
        fresh = sides.manual.from_params(cfg, before.params)
        fresh.zero_grad()
        fresh.forward(*step.batch)
        fresh.backward()
        ok = all(compare(fresh.grads[n], before.grads[n], tensor=n, check="fresh").passed for n in fresh.grads)
        check = LayerCheck(layer, "a fresh manual model's forward/backward at the same weights and batch",
                           {"manual (fresh model)": SideCheck(ok), "manual (after earlier steps)": SideCheck(False)})
        detail = ("a fresh model computes the right gradient, so something carried over from earlier steps leaks "
                  "into it: is zero_grad zeroing every gradient buffer?") if ok else \
            "the gradient of this batch is wrong: run the forward/backward walk on it"
        return Blame([check], "manual", detail)
    if what == "grad_norm" or what.startswith("clipped_grad."):
        g = before.grads
        total = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g.values()))
        if what == "grad_norm":
            want = np.asarray(total)
            got = {"manual": np.asarray(bad.a_value, bad.dtype), "reference": np.asarray(bad.b_value, bad.dtype)}
        else:
            name = what[len("clipped_grad."):]
            want = g[name].astype(np.float64) * min(clip / (total + 1e-6), 1.0)
            got = {"manual": m.grads[name], "reference": before.clipped[name]}
        judged = {side: _recomputed(v, want, what) for side, v in got.items()}
        return Blame([LayerCheck(layer, "global-norm clipping redone in float64 from the reference's unclipped "
                                        "gradients", judged)], verdict(judged, RECOMPUTATION))
    # param.<p> or optim.<state>.<p>: redo the step in float64 from the reference's state before it
    name = what.split(".", 1)[1] if what.startswith("param.") else what.split(".", 2)[2]
    wd = next(gr["weight_decay"] for gr in registry.decay_groups(cfg, hp["weight_decay"]) if name in gr["names"])
    st = {k.split(".")[1]: v for k, v in before.state.items() if k.split(".", 2)[2] == name}
    p_new, s_new = textbook_step(kind, hp, before.params[name], before.clipped[name], st, step.step, wd)
    if what.startswith("param."):
        want, got = p_new, {"manual": m.params[name], "reference": r.params[name]}
    else:
        want = s_new[what.split(".")[1]]
        got = {"manual": step.manual_state.get(what), "reference": step.reference_state.get(what)}
    judged = {side: _recomputed(v, want, what) for side, v in got.items()}
    return Blame([LayerCheck(layer, f"the {kind} step redone in float64 from the reference's parameters, clipped "
                                    f"gradients and state", judged)], verdict(judged, RECOMPUTATION))


# -- a dump without tap gradients: where did the backward first go wrong? ---------------------------

# node kind -> the parameter roles whose gradient needs only the layer's forward inputs (taps, which
# agree when the first difference is a gradient) and the gradient of its OUTPUT: a bias gradient is
# that gradient summed over (B, T); an output projection's weight gradient is x^T @ dout; a layer
# norm's weight gradient is sum(dout * xhat). If one differs, the gradient reaching the layer's
# output differs; if all agree, it (very likely) agrees.
OUTPUT_SIDE = {"mlp": ("b2", "W2"), "attention": ("b_proj", "W_proj"), "layernorm": ("b", "w"),
               "linear": ("b", "W"), "unembed": ("W",)}


def output_grad_agrees(node: Node, passed: dict, shared: set) -> bool | None:
    """Does the gradient reaching `node`'s output agree, judged from its output-side parameter
    gradients (`passed`: grad.<param> -> the walk's verdict)? None: no such parameter to judge by
    (none in the dump, or shared with another layer like the tied embedding)."""
    names = [node.params[r] for r in OUTPUT_SIDE.get(node.kind, ()) if r in node.params]
    seen = [passed[f"grad.{n}"] for n in names if n not in shared and f"grad.{n}" in passed]
    return None if not seen else all(seen)


def backward_origin(cfg: ModelConfig, tensor: str, rows: list) -> LayerCheck | None:
    """For a dump without tap gradients whose first divergent tensor is the parameter gradient
    `tensor`: the layer whose backward first went wrong, inferred from the parameter gradients.

    Walking the layers in backward order (from the loss), each layer's output gradient is judged by
    output_grad_agrees. If the first divergent layer's output gradient already disagrees, the error
    entered upstream in backward order: between the last layer whose output gradient agrees (its
    input gradient is suspect) and this one. None when `tensor` is not a parameter gradient."""
    name = tensor[len("grad."):]
    if not tensor.startswith("grad.") or name not in registry.param_shapes(cfg):
        return None
    passed = {c.tensor: c.passed for c in rows}
    order = list(reversed(nodes(cfg)))
    uses: dict = {}
    for n in order:
        for p in n.params.values():
            uses[p] = uses.get(p, 0) + 1
    shared = {p for p, k in uses.items() if k > 1}
    first = next(i for i, n in enumerate(order) if name in n.params.values())
    target = order[first]
    own = output_grad_agrees(target, passed, shared)
    method = ("inferred from parameter gradients (the dump holds no tap gradients): a bias gradient is the sum over "
              "(B, T) of the layer's output gradient, an output weight gradient x^T dout with x a tap that agrees")
    if own is not False:
        why = ("its output-side parameter gradients agree, so the gradient reaching it agrees: its own backward "
               "is wrong") if own else "nothing tells whether the gradient reaching it agrees"
        return LayerCheck(target.name, method, note=why)
    # the walk lists parameter gradients in its own order: the first layer, in backward order, whose
    # output gradient differs may come before the one that wrote the first divergent tensor
    first = next(i for i in range(first + 1) if output_grad_agrees(order[i], passed, shared) is False)
    target = order[first]
    last_ok = next((i for i in range(first - 1, -1, -1) if output_grad_agrees(order[i], passed, shared)), None)
    start = 0 if last_ok is None else last_ok          # the loss's output gradient is 1 on both sides
    suspects = [n for n in order[start:first] if n.kind != "add"]
    good = order[start].name
    if len(suspects) == 1:
        note = (f"the gradient reaching {target.name}'s output already differs while the one reaching {good}'s "
                f"output agrees: the error entered in {good}'s backward (its input gradient)")
        return LayerCheck(suspects[0].name, method, note=note)
    if not suspects:                                   # nothing between: the layer's own bias accumulation
        return LayerCheck(target.name, method, note="its bias gradient differs with nothing between it and an "
                                                    "agreeing output gradient: its own backward is wrong")
    return LayerCheck(f"between {good} and {target.name}", method,
                      note=f"the gradient reaching {target.name}'s output already differs while the one reaching "
                           f"{good}'s output agrees: the error entered in the backward of one of "
                           f"{', '.join(n.name for n in suspects)}")


def add_origin(b: Blame, cfg: ModelConfig, tensor: str, rows: list) -> None:
    """Add to `b` (a dump without tap gradients) the layer whose backward first went wrong."""
    check = backward_origin(cfg, tensor, rows)
    if check is None:
        return
    b.checks.append(check)
    if check.layer.startswith("between "):
        b.origin = f"{check.layer} (the evidence does not settle which backward)"
    else:
        kind = next(n.kind for n in nodes(cfg) if n.name == check.layer)
        file, fn = LAYER_FILES[kind]
        b.origin = f"{check.layer} (manual/layers/{file}: {fn}_backward)"
