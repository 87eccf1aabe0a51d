"""The bug zoo: gradient bugs, injected one at a time into the MANUAL implementation.

Where they come from (each Fault's `origin` says which):
  * the blog post this project grew from (README.md): its author lost days to a missing zero-grad,
    gradients multiplied instead of accumulated, a layer norm that quietly changed shape and a
    transposed embedding gradient. Those four are here as the blog describes them.
  * a convention or API default that invites the slip, named where we can name it concretely
    (torch.var is unbiased by default while nn.LayerNorm is not; F.cross_entropy ignores only
    ignore_index = -100 unless told otherwise; GPT-2 uses the tanh GELU and torch's default is erf;
    flax's LayerNorm defaults to eps = 1e-6, GPT-2 uses 1e-5; ...).
  * the rest are constructed: a one-line slip of the kind hand-written backward passes make (a
    term of a derivation left out, an index shifted by one), not a bug traced to a specific project.

Nothing here is active unless asked for:

    with inject("ln_gamma_grad_assigned") as sides:      # manual/ is patched inside the block only
        engine.run_case(case, checks, sides)            # the conformance suite now fails
    # ... and everything is restored here, even after an exception

How a fault is injected (so that it survives refactors of manual/layers' internals):
  * layer faults REPLACE a forward/backward PAIR (`layernorm_forward` and `layernorm_backward`,
    ...) by a small buggy copy written below, or WRAP one function around the original
    (call it, then add the bug). Either way they depend on the functions' names and signatures
    and on the caches' field names (manual.layers' NamedTuples: a buggy pair returns manual's
    cache type where it keeps the same things, its own NamedTuple where it does not, and hands
    the original's cache back to the original by type). The replacement is done by identity: every
    module of the `manual` package that holds the original function object (as a global, or
    inside a module-level dict of (forward, backward) pairs such as ACTIVATIONS) gets the
    buggy one, and the original is put back on exit.
  * model / optimizer faults are subclasses handed to the conformance engine through
    `conformance.engine.Sides` (`Sides.manual`, `Sides.manual_optim`).

Each `Fault` says where the bug lives (`expected`: the canonical name of the tensor the
debugger must name first, in its walk order: taps forward, then "loss", then `grad.<tap>`
backward, then `grad.<param>` in reverse registry order, then the optimizer trajectory in
step order as `adamw.<what>.<name>`), which conformance checks expose it, and the case it
needs (config overrides on the tiny preset, always float64 so the tolerance is 1e-9).
`python -m tools.layerdiff --zoo` runs them all; `--list-faults` lists them.
"""
from __future__ import annotations

import math
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

import manual
import manual.layers
import manual.optim
from manual.config import ModelConfig
from manual.layers import AttentionCache, EmbeddingCache, LayerNormCache, LinearCache, LossCache

FWD_CHECKS = ("logits", "loss", "activation", "activation_grad", "param_grad")
OPT_CHECKS = ("optimizer",)


@dataclass(frozen=True, kw_only=True)
class Fault:
    name: str
    description: str          # the bug, with the buggy line as it would read in the code
    origin: str               # where this bug comes from: the blog, a named convention, or "constructed"
    expected: str             # the tensor where the fault lives: what the debugger must name first
    stage: str                # 'forward', 'backward' or 'optimizer': where it first shows
    checks: tuple             # the conformance checks that expose it
    patch: object             # () -> context manager yielding the Sides to run with
    config: dict = field(default_factory=dict)   # ModelConfig overrides on the tiny preset
    batch: int = 2
    seq_len: int = 8
    pad: bool = True          # PAD among the targets (the engine's make_batch)
    opt_steps: int = 0        # optimizer trajectory steps the fault needs (0: one forward/backward)

    def model_config(self) -> ModelConfig:
        return ModelConfig.preset("tiny", **{"dtype": "float64", **self.config})

    def case(self):
        from conformance.engine import Case
        return Case(label=f"zoo.{self.name}", cfg=self.model_config(), seed=0, batch=self.batch,
                    seq_len=self.seq_len, pad=self.pad, opt_steps=max(self.opt_steps, 1), gen_tokens=4)


# ------------------------------------------------------------------------------------------------
# patching machinery

def manual_modules():
    """Every loaded module of the `manual` package (where `replaced` looks for the originals)."""
    return [m for n, m in sorted(sys.modules.items())
            if (n == "manual" or n.startswith("manual.")) and isinstance(m, types.ModuleType)]




@contextmanager
def replaced(replacements: dict):
    """Replace functions by identity in every module of the `manual` package, restore on exit.

    `replacements` maps original function objects to their stand-ins. Module globals that are
    an original are replaced, and so are the items of module-level dicts whose values are an
    original or a tuple holding one (the ACTIVATIONS table of (forward, backward) pairs).
    """
    by_id = {id(k): v for k, v in replacements.items()}
    undo = []
    try:
        for mod in manual_modules():
            for attr, value in list(vars(mod).items()):
                if id(value) in by_id:
                    undo.append((vars(mod), attr, value))
                    vars(mod)[attr] = by_id[id(value)]
                elif isinstance(value, dict):
                    for key, item in list(value.items()):
                        if id(item) in by_id:
                            undo.append((value, key, item))
                            value[key] = by_id[id(item)]
                        elif isinstance(item, tuple) and any(id(x) in by_id for x in item):
                            undo.append((value, key, item))
                            value[key] = tuple(by_id.get(id(x), x) for x in item)
        missing = [getattr(f, "__name__", f) for f in replacements
                   if not any(orig is f for _d, _k, orig in undo)
                   and not any(isinstance(orig, tuple) and f in orig for _d, _k, orig in undo)]
        if missing:
            raise RuntimeError(f"fault injection found no reference to {missing} in the manual package")
        yield
    finally:
        for d, key, value in reversed(undo):
            d[key] = value


def _default_sides(**overrides):
    from conformance.engine import Sides
    sides = Sides.default()
    for k, v in overrides.items():
        setattr(sides, k, v)
    return sides


def _layer_patch(replacements_fn):
    """A fault patch from a function returning {original: replacement} (evaluated at injection time,
    so the originals are whatever manual/layers holds then)."""
    @contextmanager
    def patch():
        with replaced(replacements_fn()):
            yield _default_sides()
    return patch


# ------------------------------------------------------------------------------------------------
# buggy copies of layers. Each is the correct layer with ONE thing changed (marked "BUG").

def layernorm_pair(*, ddof=0, eps=None, axis=-1, dgamma="accumulate", dbeta="accumulate", dx_mean_term=True):
    """A layer norm forward/backward pair with one bug switched on.

    Correct:  mean, biased var over the last axis, rstd = 1/sqrt(var + cfg.ln_eps),
              dgamma += sum_{B,T} dy * xhat,  dbeta += sum_{B,T} dy,
              dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * gamma
    """
    def layernorm_forward(x, w, b, ln_eps):
        e = ln_eps if eps is None else eps                     # BUG if eps is set: a hard-coded epsilon
        mean = x.mean(axis=axis, keepdims=True)                # BUG if axis != -1: normalised over T
        xc = x - mean
        var = np.sum(xc * xc, axis=axis, keepdims=True) / (x.shape[axis] - ddof)   # BUG if ddof=1
        rstd = 1.0 / np.sqrt(var + e)
        xhat = xc * rstd
        y = xhat * w
        if b is not None:
            y = y + b
        return y, LayerNormCache(xhat, rstd, w)

    def layernorm_backward(dy, cache, dw, db=None):
        xhat, rstd, w = cache.xhat, cache.rstd, cache.w
        C = dy.shape[-1]
        per_pos_w = (dy * xhat).reshape(-1, C)                 # (N, C) one row per position
        per_pos_b = dy.reshape(-1, C)
        if dgamma == "accumulate":
            dw += per_pos_w.sum(axis=0)
        elif dgamma == "assign_in_loop":
            dw[...] = per_pos_w[-1]                            # BUG: `dgamma = dy[t] * xhat[t]` in the loop over t
        elif dgamma == "multiply":
            dw *= per_pos_w.sum(axis=0)                        # BUG: `dgamma *= ...` where `+=` belongs
        if db is not None:
            if dbeta == "accumulate":
                db += per_pos_b.sum(axis=0)
            elif dbeta == "multiply":
                db *= per_pos_b.sum(axis=0)                    # BUG: `dbeta *= ...`
        g = dy * w
        dx = g - xhat * np.mean(g * xhat, axis=-1, keepdims=True)
        if dx_mean_term:
            dx = dx - g.mean(axis=-1, keepdims=True)           # (BUG when left out: the path through the mean)
        return dx * rstd
    return layernorm_forward, layernorm_backward


class BuggyAttentionCache(NamedTuple):
    """What attention_pair's standard forward keeps (its flash forward returns the original AttentionCache)."""
    c_attn: LinearCache        # x = a (B, T, C), W = Wqkv
    q: np.ndarray              # (B, H, T, D)
    k: np.ndarray              # (B, H, T, D)
    v: np.ndarray              # (B, H, T, D)
    probs: np.ndarray          # (B, H, T, T)
    c_proj: LinearCache        # x = ctx (B, T, C), W = Wo
    scale: float               # the (possibly buggy) score scale


def attention_pair(*, scale=True, mask_offset=0, split="transpose", softmax_row_term=True):
    """A causal self-attention forward/backward pair (standard attention) with one bug switched on.

    Same signatures, taps and recorded gradients as manual/layers/attention.py; flash attention
    is passed through to the original functions untouched (its cache is an AttentionCache).
    """
    orig_fwd, orig_bwd = manual.layers.attention_forward, manual.layers.attention_backward
    L = manual.layers

    def heads(t, B, T, H, D):                                  # (B, T, C) -> (B, H, T, D)
        if split == "reshape":
            return t.reshape(B, H, T, D)                       # BUG: reshape where a transpose is needed
        return t.reshape(B, T, H, D).transpose(0, 2, 1, 3)

    def heads_back(d, B, T, H, D):                             # adjoint of heads(): (B, H, T, D) -> (B, T, C)
        if split == "reshape":
            return d.reshape(B, T, H * D)
        return d.transpose(0, 2, 1, 3).reshape(B, T, H * D)

    def attention_forward(a, W_attn, b_attn, W_proj, b_proj, n_heads, flash=False, block=L.FLASH_BLOCK):
        if flash:
            return orig_fwd(a, W_attn, b_attn, W_proj, b_proj, n_heads, flash=flash, block=block)
        B, T, C = a.shape
        H, D = n_heads, C // n_heads
        s = 1.0 / math.sqrt(D) if scale else 1.0               # BUG if scale=False: no 1/sqrt(D)
        qkv, c_attn = L.linear_forward(a, W_attn, b_attn)      # (B, T, 3C)
        q, k, v = (heads(qkv[..., i * C:(i + 1) * C], B, T, H, D) for i in range(3))
        att = (q @ k.transpose(0, 1, 3, 2)) * s                # (B, H, T, T)
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        masked = np.where(j > i + mask_offset, -np.inf, att)   # BUG if mask_offset=1: i sees token i+1
        probs = np.exp(masked - masked.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        y = probs @ v                                          # (B, H, T, D)
        ctx = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        out, c_proj = L.linear_forward(ctx, W_proj, b_proj)
        taps = {"q": q, "k": k, "v": v, "att": att, "probs": probs, "ctx": ctx, "out": out}
        return taps, BuggyAttentionCache(c_attn, q, k, v, probs, c_proj, s)

    def attention_backward(dout, cache, dW_attn, db_attn, dW_proj, db_proj, record=None):
        if isinstance(cache, AttentionCache):                  # flash: the original pair's cache
            return orig_bwd(dout, cache, dW_attn, db_attn, dW_proj, db_proj, record=record)
        q, k, v, probs, s = cache.q, cache.k, cache.v, cache.probs, cache.scale
        B, H, T, D = q.shape
        dctx = L.linear_backward(dout, cache.c_proj, dW_proj, db_proj)    # (B, T, C)
        dy = dctx.reshape(B, T, H, D).transpose(0, 2, 1, 3)              # (B, H, T, D)
        dprobs = dy @ v.transpose(0, 1, 3, 2)                            # (B, H, T, T)
        dv = probs.transpose(0, 1, 3, 2) @ dy
        if softmax_row_term:
            datt = probs * (dprobs - np.sum(dprobs * probs, axis=-1, keepdims=True))
        else:
            datt = probs * dprobs                              # BUG: softmax backward without - sum_k p_k dp_k
        dq = (datt @ k) * s
        dk = (datt.transpose(0, 1, 3, 2) @ q) * s
        dqkv = np.concatenate([heads_back(t, B, T, H, D) for t in (dq, dk, dv)], axis=-1)  # (B, T, 3C)
        da = L.linear_backward(dqkv, cache.c_attn, dW_attn, db_attn)
        if record is not None:
            record.update(out=dout, ctx=dctx, probs=dprobs, att=datt, q=dq, k=dk, v=dv)
        return da
    return attention_forward, attention_backward


class BuggyLossCache(NamedTuple):
    """What loss_pair's cross-entropy forward keeps (brier passes through with the original LossCache)."""
    p: np.ndarray              # (B, T, V) softmax
    targets: np.ndarray        # (B, T)
    weight: np.ndarray         # (B, T) 1 on the positions that count (buggy: PAD too)
    count: float               # sum of weight
    temperature: float
    n: int                     # number of non-PAD targets


def loss_pair(*, subtract_max=True, count_pad=False):
    """A cross-entropy forward/backward pair with one bug switched on (brier passes through)."""
    orig_fwd, orig_bwd = manual.layers.loss_forward, manual.layers.loss_backward

    def loss_forward(logits, targets, pad_id, temperature, kind="cross_entropy"):
        if kind != "cross_entropy":
            return orig_fwd(logits, targets, pad_id, temperature, kind)
        dtype = logits.dtype
        z = logits / temperature                               # (B, T, V)
        if subtract_max:
            z = z - z.max(axis=-1, keepdims=True)
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(z)                                      # BUG without the max: exp(1000) = inf
            sumexp = e.sum(axis=-1, keepdims=True)
            p = e / sumexp                                     # inf / inf = nan
            z_t = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
            per_pos = np.log(sumexp[..., 0]) - z_t             # (B, T)
        valid = targets != pad_id
        n = int(valid.sum())
        if count_pad:
            weight = np.ones(targets.shape, dtype=dtype)       # BUG: PAD positions summed and counted
        else:
            weight = valid.astype(dtype)
        count = weight.sum()
        with np.errstate(over="ignore", invalid="ignore"):
            loss = np.asarray(np.sum(per_pos * weight) / count if n else np.nan, dtype=dtype)
        return (loss, n), BuggyLossCache(p, targets, weight, count, temperature, n)

    def loss_backward(dloss, cache):
        if isinstance(cache, LossCache):                       # brier: the original pair's cache
            return orig_bwd(dloss, cache)
        p = cache.p
        if cache.n == 0:
            return np.zeros_like(p)
        w = cache.weight * (dloss / (cache.count * cache.temperature))   # (B, T)
        dz = p * w[..., None]
        idx = cache.targets[..., None]
        np.put_along_axis(dz, idx, np.take_along_axis(dz, idx, axis=-1) - w[..., None], axis=-1)
        return dz
    return loss_forward, loss_backward


def embedding_pair(*, lookup_grad=True, wpe_shift=0):
    """Token + position embedding with one bug in its backward switched on."""
    def embedding_forward(ids, wte, wpe):
        return wte[ids] + wpe[: ids.shape[1]], EmbeddingCache(ids)

    def embedding_backward(dx, cache, dwte, dwpe):
        ids = cache.ids
        T, C = ids.shape[1], dx.shape[-1]
        if lookup_grad:                                        # BUG when off: the tied wte loses this use
            np.add.at(dwte, ids.reshape(-1), dx.reshape(-1, C))
        n = min(T, dwpe.shape[0] - wpe_shift)
        dwpe[wpe_shift:wpe_shift + n] += dx.sum(axis=0)[:n]    # BUG if wpe_shift=1: row t gets t-1's gradient
    return embedding_forward, embedding_backward


# -- wrappers: the original function, then the bug ---------------------------------------------------

def unembed_backward_transposed():
    orig = manual.layers.unembed_backward

    def unembed_backward(dy, cache, dW):
        correct = np.zeros_like(dW)
        dx = orig(dy, cache, correct)
        # BUG: dW computed as x^T dy, which is [C, V], then stored into the [V, C] buffer with a
        # reshape (what a flat memcpy into the wrong-shaped buffer does) instead of a transpose
        dW += correct.T.reshape(dW.shape)
        return dx
    return unembed_backward


def mlp_backward_b2_one_row():
    orig = manual.layers.mlp_backward

    def mlp_backward(dout, cache, dW1, db1, dW2, db2, record=None):
        dropped = None if db2 is None else np.zeros_like(db2)
        dm = orig(dout, cache, dW1, db1, dW2, dropped, record=record)
        if db2 is not None:
            # BUG: B2 declared [1, d_ff] instead of [1, d_model]; the fix-up that made it fit
            # copied ONE row of dout into it instead of summing dout over every position
            db2 += dout.reshape(-1, dout.shape[-1])[0]
        return dm
    return mlp_backward


# -- model and optimizer faults (subclasses handed to the engine through Sides) --------------------

class ModelNoZeroGrad(manual.Model):
    """zero_grad that zeroes nothing: every backward adds to the previous step's gradients."""
    def zero_grad(self):
        pass                                                   # BUG: `for g in grads: g.fill(0)` forgotten


def _optim_namespace(**overrides):
    ns = types.SimpleNamespace(AdamW=manual.optim.AdamW, SGD=manual.optim.SGD,
                               clip_grad_norm_=manual.optim.clip_grad_norm_)
    for k, v in overrides.items():
        setattr(ns, k, v)
    return ns


class AdamWNoZeroGrad(manual.optim.AdamW):
    def zero_grad(self):
        pass                                                   # BUG: the optimizer's zero_grad does nothing


class SGDNoZeroGrad(manual.optim.SGD):
    def zero_grad(self):
        pass


class AdamWNoBiasCorrection(manual.optim.AdamW):
    """AdamW whose update forgets the bias corrections 1 - beta1^t and 1 - beta2^t."""
    def _update(self, name, p, g, group):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        st["step"] += 1
        m, v = st["exp_avg"], st["exp_avg_sq"]
        p *= p.dtype.type(1 - lr * wd)
        m *= m.dtype.type(beta1)
        m += m.dtype.type(1 - beta1) * g
        v *= v.dtype.type(beta2)
        v += v.dtype.type(1 - beta2) * g * g
        p -= p.dtype.type(lr) * m / (np.sqrt(v) + p.dtype.type(eps))   # BUG: m / (1 - b1^t), v / (1 - b2^t) missing


class AdamWDecayEverything(manual.optim.AdamW):
    """AdamW whose decay group holds the biases and layer norms too (only embeddings escape)."""
    def __init__(self, params, grads, *args, groups=None, **kwargs):
        wd = max([g.get("weight_decay", 0.0) for g in groups or []] + [kwargs.get("weight_decay", 0.0)])
        # BUG: `decay = [p for p in params if "wte" not in n and "wpe" not in n]`: biases and norms decay
        names = list(params)
        emb = [n for n in names if n.startswith(("transformer.wte", "transformer.wpe"))]
        groups = [{"names": [n for n in names if n not in emb], "weight_decay": wd},
                  {"names": emb, "weight_decay": 0.0}]
        super().__init__(params, grads, *args, groups=groups, **kwargs)


def clip_grad_norm_per_tensor(grads, max_norm, norm_type=2.0, error_if_nonfinite=True):
    """Clipping each tensor to max_norm on its own (returns the global norm, as the correct one)."""
    items = list(grads.values()) if isinstance(grads, dict) else list(grads)
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in items))
    for g in items:
        n = float(np.sqrt(np.sum(np.square(g, dtype=np.float64))))
        g *= g.dtype.type(min(1.0, max_norm / (n + 1e-6)))    # BUG: per tensor, not by the global norm
    return total


@contextmanager
def _sides_patch(**sides):
    yield _default_sides(**sides)


def _sides(**sides):
    return lambda: _sides_patch(**sides)


# ------------------------------------------------------------------------------------------------
# the zoo

def _pair(layer: str, make_pair):
    """A patch swapping manual.layers.<layer>_forward/_backward for the buggy pair make_pair(**bug)."""
    def factory(**bug):
        return _layer_patch(lambda: dict(zip((getattr(manual.layers, f"{layer}_forward"),
                                              getattr(manual.layers, f"{layer}_backward")),
                                             make_pair(**bug))))
    return factory


_ln = _pair("layernorm", layernorm_pair)
_attn = _pair("attention", attention_pair)
_loss = _pair("loss", loss_pair)
_embed = _pair("embedding", embedding_pair)


def _gelu_swap():
    from manual.layers import activations as A
    return {A.gelu_forward: A.gelu_tanh_forward, A.gelu_backward: A.gelu_tanh_backward}


BLOG = "the blog post (README.md, the story)"
CONSTRUCTED = "constructed"

FAULTS: list[Fault] = [
    Fault(name="grads_not_zeroed",
          description="zero_grad does nothing (model and optimizer): step 2's gradients are step 1's plus step 2's",
          origin=f"{BLOG}: the missing zero-grad",
          expected="adamw.grad.transformer.wte.weight", stage="optimizer", checks=OPT_CHECKS,
          patch=_sides(manual=ModelNoZeroGrad,
                       manual_optim=_optim_namespace(AdamW=AdamWNoZeroGrad, SGD=SGDNoZeroGrad)),
          opt_steps=2),
    Fault(name="ln_gamma_grad_assigned",
          description="layer norm: `dgamma = dy[t] * xhat[t]` inside the loop over positions, `=` where `+=` "
                      "belongs: only the last position's contribution survives",
          origin=f"{CONSTRUCTED}: the `=` variant of the blog's accumulation bug (see ln_grads_multiplied)",
          expected="grad.transformer.ln_f.weight", stage="backward", checks=FWD_CHECKS,
          patch=_ln(dgamma="assign_in_loop")),
    Fault(name="ln_grads_multiplied",
          description="layer norm: `dgamma *= ...; dbeta *= ...` where `+=` belongs: after zero_grad both stay 0",
          origin=f"{BLOG}: gradients multiplied instead of accumulated",
          expected="grad.transformer.ln_f.bias", stage="backward", checks=FWD_CHECKS,
          patch=_ln(dgamma="multiply", dbeta="multiply")),
    Fault(name="ln_dx_missing_mean_term",
          description="layer norm backward: dx = rstd (g - xhat mean(g xhat)), the gradient through the mean "
                      "left out",
          origin=f"{CONSTRUCTED}: one of the two terms of the derivation (llm.c doc/layernorm derives both)",
          expected="grad.h.2.out", stage="backward", checks=FWD_CHECKS, patch=_ln(dx_mean_term=False)),
    Fault(name="ln_unbiased_variance",
          description="layer norm: var = sum((x - mean)^2) / (C - 1), the unbiased variance",
          origin="a layer norm written with torch.var, whose default is the unbiased variance, where "
                 "nn.LayerNorm uses the biased one",
          expected="h.0.ln_1.out", stage="forward", checks=FWD_CHECKS, patch=_ln(ddof=1),
          config=dict(norm="post")),
    Fault(name="ln_eps_1e-6",
          description="layer norm: eps hard-coded to 1e-6 while the config says ln_eps = 1e-5",
          origin="a framework default taken over the model's config: flax.linen.LayerNorm defaults to "
                 "eps = 1e-6, GPT-2's layer_norm_epsilon is 1e-5",
          expected="h.0.ln_1.out", stage="forward", checks=FWD_CHECKS, patch=_ln(eps=1e-6)),
    Fault(name="ln_wrong_axis",
          description="layer norm: mean and variance over axis 1 (time) instead of the last axis (channels); "
                      "the shapes still fit",
          origin=f"{BLOG}: a layer norm that quietly changed shape",
          expected="h.0.ln_1.out", stage="forward", checks=FWD_CHECKS, patch=_ln(axis=1)),
    Fault(name="attention_no_scale",
          description="attention: att = q @ k^T without the 1/sqrt(D) scale",
          origin=f"{CONSTRUCTED}: the scale of scaled dot-product attention left out",
          expected="h.0.attn.att", stage="forward", checks=FWD_CHECKS, patch=_attn(scale=False)),
    Fault(name="causal_mask_off_by_one",
          description="attention: mask j > i + 1 instead of j > i: each position sees the next token",
          origin="a causal mask built with torch.triu(..., diagonal=2) where diagonal=1 is needed",
          expected="h.0.attn.probs", stage="forward", checks=FWD_CHECKS, patch=_attn(mask_offset=1)),
    Fault(name="heads_split_with_reshape",
          description="attention: q.reshape(B, H, T, D) where q.reshape(B, T, H, D).transpose(1, 2) is needed",
          origin="splitting heads with one view(B, H, T, D) where nanoGPT writes view(B, T, H, D).transpose(1, 2)",
          expected="h.0.attn.q", stage="forward", checks=FWD_CHECKS, patch=_attn(split="reshape")),
    Fault(name="softmax_backward_missing_row_term",
          description="attention softmax backward: datt = p * dp, the - sum_k p_k dp_k term left out",
          origin=f"{CONSTRUCTED}: half of the softmax Jacobian",
          expected="grad.h.2.attn.att", stage="backward", checks=FWD_CHECKS, patch=_attn(softmax_row_term=False)),
    Fault(name="softmax_no_max_subtraction",
          description="loss: softmax without subtracting the row max: exp(z) overflows on large logits (this "
                      "case: temperature 1e-4, so z = logits / 1e-4 reaches ~1e3 and exp(z) = inf)",
          origin=f"{CONSTRUCTED}: the textbook softmax exp(z) / sum exp(z), without the stability shift",
          expected="loss", stage="forward", checks=FWD_CHECKS, patch=_loss(subtract_max=False),
          config=dict(temperature=1e-4)),
    Fault(name="pad_counted_in_mean",
          description="loss: the mean over ALL positions, PAD targets included",
          origin="F.cross_entropy called without ignore_index=pad_id: its default ignores only the label -100",
          expected="loss", stage="forward", checks=FWD_CHECKS, patch=_loss(count_pad=True)),
    Fault(name="gelu_erf_tanh_swapped",
          description="activation 'gelu' (exact, erf) computed with the tanh approximation",
          origin="GPT-2 uses the tanh approximation (Hugging Face's 'gelu_new'), torch's F.gelu defaults to "
                 "the exact erf: a port that takes one for the other",
          expected="h.0.mlp.act", stage="forward", checks=FWD_CHECKS, patch=_layer_patch(_gelu_swap)),
    Fault(name="ffn_b2_grad_one_row",
          description="FFN output bias: B2 (the blog's name for it) declared [1, d_ff] instead of [1, d_model]; "
                      "the fix-up copied one row of dout into dB2 instead of summing over positions",
          origin=f"{CONSTRUCTED}: a bias gradient reduced over one position instead of all of them",
          expected="grad.transformer.h.2.mlp.c_proj.bias", stage="backward", checks=FWD_CHECKS,
          patch=_layer_patch(lambda: {manual.layers.mlp_backward: mlp_backward_b2_one_row()})),
    Fault(name="tied_embedding_one_contribution",
          description="tied embedding: the lookup's gradient is never added to wte, which keeps only the "
                      "output projection's contribution",
          origin=f"{CONSTRUCTED}: one of the two uses of the blog's tied token_embeddings_ forgotten",
          expected="grad.transformer.wte.weight", stage="backward", checks=FWD_CHECKS,
          patch=_embed(lookup_grad=False)),
    Fault(name="wte_grad_transposed",
          description="output projection: dW = x^T dy ([C, V]) stored into the [V, C] token-embedding gradient "
                      "with a reshape instead of a transpose",
          origin=f"{BLOG}: the transposed embedding gradient",
          expected="grad.transformer.wte.weight", stage="backward", checks=FWD_CHECKS,
          patch=_layer_patch(lambda: {manual.layers.unembed_backward: unembed_backward_transposed()})),
    Fault(name="wpe_grad_shifted",
          description="position embedding: dwpe[t + 1] += dx[:, t], the gradient of position t lands on row t + 1",
          origin=f"{CONSTRUCTED}: an off-by-one in position indexing",
          expected="grad.transformer.wpe.weight", stage="backward", checks=FWD_CHECKS,
          patch=_embed(wpe_shift=1)),
    Fault(name="adamw_no_bias_correction",
          description="AdamW: p -= lr m / (sqrt(v) + eps), without dividing m by 1 - beta1^t and v by 1 - beta2^t",
          origin=f"{CONSTRUCTED}: Adam written from its update rule without the bias corrections",
          expected="adamw.param.transformer.wte.weight", stage="optimizer", checks=OPT_CHECKS,
          patch=_sides(manual_optim=_optim_namespace(AdamW=AdamWNoBiasCorrection)), opt_steps=1),
    Fault(name="weight_decay_on_biases_and_norms",
          description="AdamW: every parameter but the embeddings in the decay group, biases and layer norms "
                      "included",
          origin="torch.optim.AdamW(model.parameters(), weight_decay=...) decays every tensor; nanoGPT's "
                 "configure_optimizers decays only tensors with dim >= 2",
          expected="adamw.param.transformer.h.0.ln_1.weight", stage="optimizer", checks=OPT_CHECKS,
          patch=_sides(manual_optim=_optim_namespace(AdamW=AdamWDecayEverything)), opt_steps=1),
    Fault(name="clip_per_tensor",
          description="gradient clipping: each tensor scaled to norm <= 1 on its own instead of all of them by "
                      "the global norm",
          origin="clip_grad_norm_ called once per parameter in a loop, where torch.nn.utils.clip_grad_norm_ "
                 "takes them all and clips by their global norm",
          expected="adamw.clipped_grad.transformer.wte.weight", stage="optimizer", checks=OPT_CHECKS,
          patch=_sides(manual_optim=_optim_namespace(clip_grad_norm_=clip_grad_norm_per_tensor)), opt_steps=1),
]

BY_NAME = {f.name: f for f in FAULTS}
assert len(BY_NAME) == len(FAULTS), "duplicate fault names"


def get(name: str) -> Fault:
    if name not in BY_NAME:
        raise KeyError(f"unknown fault {name!r}; known faults: {', '.join(BY_NAME)}")
    return BY_NAME[name]


@contextmanager
def inject(name: str):
    """Activate fault `name` inside the block; yields the conformance Sides to run with."""
    with get(name).patch() as sides:
        yield sides


def describe() -> str:
    lines = []
    for f in FAULTS:
        lines.append(f"{f.name:<34} {f.stage:<9} expected first: {f.expected}")
        lines.append(f"    {f.description}")
        lines.append(f"    origin: {f.origin}; case: tiny float64 {f.config or ''} batch {f.batch}x{f.seq_len}"
                     + (f", {f.opt_steps} optimizer step(s)" if f.opt_steps else ""))
    return "\n".join(lines)
