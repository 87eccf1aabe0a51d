"""An independent GPT-2-style transformer in NumPy, written against the outside-program protocol.

    python examples/numpy_port/port.py CASE OUT [--bug NAME] [--steps N]

CASE is a folder written by `python -m tools.layerdiff --export-case CASE` (checkpoint.safetensors,
ids.npy, targets.npy); OUT is the dump this program writes: every tap, the loss, every tap gradient
and every parameter gradient, under the canonical names, in the case's dtype.

This file deliberately does NOT share code or style with manual/: modules are small objects in
the PyTorch style (they keep their own cache between forward and backward), weights are
nn.Linear-style [out, in], attention has separate query / key / value matrices, and every
parameter has this port's own name. The single place that knows the canonical (Hugging Face
GPT-2) layout is the LAYOUT table below; loading and dumping both go through it.

Exit status: 0 dump written; 2 bad input (missing file, unreadable case); 3 the case's configuration
is not supported by this port (one line names the field).

--bug NAME plants one bug (see BUGS) so that you can watch the debugger find it.

--steps N (N > 0) trains instead: N steps from the checkpoint on the batches of CASE/train/ (ids.npy,
targets.npy: (N, B, T)) with the optimizer of CASE/train/optimizer.json (sgd or adamw, PyTorch's
semantics, weight decay on the names listed under "decay", optional global-norm clipping), and
writes OUT with "losses" (N,) (each step's loss before its update) and every parameter after the
last step, under the canonical names. --steps 0 is the plain dump.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

EXIT_BAD_INPUT = 2
EXIT_UNSUPPORTED = 3

BUGS = {
    "ln_backward_no_mean": "layer-norm backward without its mean term: dx = (dxhat - xhat mean(dxhat xhat)) / std",
    "wte_grad_transposed": "the output projection's gradient x^T dlogits [C, V] reshaped to [V, C] instead of "
                           "transposed, then added to the tied embedding's gradient",
    "tied_grad_assigned": "the token-embedding backward assigns (=) its gradient to the tied matrix instead of "
                          "adding (+=) it, erasing the output projection's contribution",
    "ln_unbiased_var": "layer-norm forward with the unbiased variance (divides by C - 1)",
    "attn_backward_no_scale": "attention backward forgets the 1/sqrt(D) of the scores in dq and dk",
    "mlp_fc_weight_grad_doubled": "the MLP's first linear layer adds twice its weight gradient (dW = 2 dh^T x); "
                                  "every other gradient is right",
}

# What this port can run. Every field of the case's config must be listed; a value outside the
# allowed set is reported (exit 3) with the field's name.
SUPPORTED = {
    "norm": ("pre", "post"),
    "activation": ("relu", "gelu", "gelu_tanh"),
    "attention": ("standard", "flash"),          # flash is the same function; it only has fewer taps
    "loss": ("cross_entropy", "brier"),
    "dtype": ("float32", "float64"),
    "bias": (True, False),
    "tie_embeddings": (True, False),
    # numeric fields: any value
    "vocab_size": None, "max_seq_len": None, "d_model": None, "n_heads": None, "d_ff": None,
    "n_layers": None, "ln_eps": None, "n_future": None, "pad_id": None, "temperature": None,
}


# ================================================================================================
# The one layout table: this port's parameter names <-> canonical names.
#
#   how = "same"      identical array
#         "T"         transposed: the port stores [out, in], the checkpoint [in, out]
#         "T q|k|v"   one third of the fused c_attn [C, 3C] (columns Q | K | V), transposed
#         "q|k|v"     one third of the fused c_attn bias [3C]
# {i} is a block index, {j} an extra prediction head (2..n_future). A row whose canonical name is
# not in the checkpoint (biases with bias=False, lm_head when tied, ...) is skipped.

LAYOUT = [
    # this port                    canonical                                   how
    ("tok_emb",                    "transformer.wte.weight",                   "same"),
    ("pos_emb",                    "transformer.wpe.weight",                   "same"),
    ("blocks.{i}.norm1.gain",      "transformer.h.{i}.ln_1.weight",            "same"),
    ("blocks.{i}.norm1.shift",     "transformer.h.{i}.ln_1.bias",              "same"),
    ("blocks.{i}.attn.wq",         "transformer.h.{i}.attn.c_attn.weight",     "T q"),
    ("blocks.{i}.attn.wk",         "transformer.h.{i}.attn.c_attn.weight",     "T k"),
    ("blocks.{i}.attn.wv",         "transformer.h.{i}.attn.c_attn.weight",     "T v"),
    ("blocks.{i}.attn.bq",         "transformer.h.{i}.attn.c_attn.bias",       "q"),
    ("blocks.{i}.attn.bk",         "transformer.h.{i}.attn.c_attn.bias",       "k"),
    ("blocks.{i}.attn.bv",         "transformer.h.{i}.attn.c_attn.bias",       "v"),
    ("blocks.{i}.attn.wo",         "transformer.h.{i}.attn.c_proj.weight",     "T"),
    ("blocks.{i}.attn.bo",         "transformer.h.{i}.attn.c_proj.bias",       "same"),
    ("blocks.{i}.norm2.gain",      "transformer.h.{i}.ln_2.weight",            "same"),
    ("blocks.{i}.norm2.shift",     "transformer.h.{i}.ln_2.bias",              "same"),
    ("blocks.{i}.ffn.up.weight",   "transformer.h.{i}.mlp.c_fc.weight",        "T"),
    ("blocks.{i}.ffn.up.bias",     "transformer.h.{i}.mlp.c_fc.bias",          "same"),
    ("blocks.{i}.ffn.down.weight", "transformer.h.{i}.mlp.c_proj.weight",      "T"),
    ("blocks.{i}.ffn.down.bias",   "transformer.h.{i}.mlp.c_proj.bias",        "same"),
    ("final_norm.gain",            "transformer.ln_f.weight",                  "same"),
    ("final_norm.shift",           "transformer.ln_f.bias",                    "same"),
    ("unembed",                    "lm_head.weight",                           "same"),
    ("future.{j}.weight",          "mtp.{j}.weight",                           "T"),
    ("future.{j}.bias",            "mtp.{j}.bias",                             "same"),
]
QKV = ("q", "k", "v")             # the column blocks of c_attn, in order


def layout_rows(cfg: dict, canonical_names) -> list[tuple[str, str, str]]:
    """LAYOUT expanded for this config, keeping the rows whose canonical tensor exists."""
    out = []
    for own, canon, how in LAYOUT:
        if "{i}" in own:
            idx = [dict(i=i) for i in range(cfg["n_layers"])]
        elif "{j}" in own:
            idx = [dict(j=j) for j in range(2, cfg["n_future"] + 1)]
        else:
            idx = [{}]
        for fmt in idx:
            if canon.format(**fmt) in canonical_names:
                out.append((own.format(**fmt), canon.format(**fmt), how))
    return out


def to_own(canonical: dict, cfg: dict) -> dict:
    """{canonical name: array} -> {own name: array} (contiguous copies)."""
    own = {}
    for name, canon, how in layout_rows(cfg, canonical):
        a = canonical[canon]
        if how.startswith("T"):
            a = a.T
        part = how.split()[-1]
        if part in QKV:
            C = a.shape[0] // 3                        # a is [3C, C] (transposed) or [3C]
            k = QKV.index(part)
            a = a[k * C:(k + 1) * C]                   # rows of [3C, C] (transposed) or entries of [3C]
        own[name] = np.ascontiguousarray(a)
    return own


def to_canonical(own: dict, cfg: dict, canonical_names) -> dict:
    """{own name: array} -> {canonical name: array}; the three parts of c_attn are stacked back."""
    out, parts = {}, {}
    for name, canon, how in layout_rows(cfg, canonical_names):
        part = how.split()[-1]
        if part in QKV:
            parts.setdefault(canon, [None] * 3)[QKV.index(part)] = (own[name], how.startswith("T"))
        else:
            out[canon] = own[name].T if how == "T" else own[name]
    for canon, pieces in parts.items():
        a = np.concatenate([p for p, _ in pieces], axis=0)    # [3C, C] or [3C]
        out[canon] = a.T if pieces[0][1] else a
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ================================================================================================
# modules: PyTorch style, each keeps what its backward needs on self

class Param:
    def __init__(self, data):
        self.data = data
        self.grad = np.zeros_like(data)


class Recorder:
    """Collects taps (forward) and tap gradients (backward) under their canonical names."""

    def __init__(self):
        self.taps, self.grads = {}, {}

    def tap(self, name, value):
        self.taps[name] = np.array(value, copy=True)
        return value

    def grad(self, name, value):
        self.grads[name] = np.array(value, copy=True)
        return value


class Linear:
    """y = x W^T + b with W [out, in] (nn.Linear)."""

    def __init__(self, weight: Param, bias: Param | None, transposed_grad_bug=False):
        self.weight, self.bias, self.bug = weight, bias, transposed_grad_bug

    def forward(self, x):
        self.x = x
        y = x @ self.weight.data.T
        return y + self.bias.data if self.bias is not None else y

    def backward(self, dy):
        x2 = self.x.reshape(-1, self.x.shape[-1])           # (N, in)
        dy2 = dy.reshape(-1, dy.shape[-1])                  # (N, out)
        if self.bug:   # planted: [in, out] reshaped (not transposed) into [out, in]
            self.weight.grad += (x2.T @ dy2).reshape(self.weight.data.shape)
        else:
            self.weight.grad += dy2.T @ x2
        if self.bias is not None:
            self.bias.grad += dy2.sum(axis=0)
        return dy @ self.weight.data


class LayerNorm:
    def __init__(self, gain: Param, shift: Param | None, eps: float, bug: str | None):
        self.gain, self.shift, self.eps, self.bug = gain, shift, eps, bug

    def forward(self, x):
        mu = x.mean(axis=-1, keepdims=True)
        n = x.shape[-1]
        denom = n - 1 if self.bug == "ln_unbiased_var" else n
        var = ((x - mu) ** 2).sum(axis=-1, keepdims=True) / denom
        self.rstd = 1.0 / np.sqrt(var + self.eps)
        self.xhat = (x - mu) * self.rstd
        y = self.xhat * self.gain.data
        return y + self.shift.data if self.shift is not None else y

    def backward(self, dy):
        lead = tuple(range(dy.ndim - 1))
        self.gain.grad += (dy * self.xhat).sum(axis=lead)
        if self.shift is not None:
            self.shift.grad += dy.sum(axis=lead)
        dxhat = dy * self.gain.data
        proj = (dxhat * self.xhat).mean(axis=-1, keepdims=True)
        if self.bug == "ln_backward_no_mean":
            return (dxhat - self.xhat * proj) * self.rstd
        return (dxhat - dxhat.mean(axis=-1, keepdims=True) - self.xhat * proj) * self.rstd


class SelfAttention:
    def __init__(self, P, pre, n_heads, rec, name, bug):
        b = (lambda n: P.get(f"{pre}.{n}"))
        self.query = Linear(P[f"{pre}.wq"], b("bq"))
        self.key = Linear(P[f"{pre}.wk"], b("bk"))
        self.value = Linear(P[f"{pre}.wv"], b("bv"))
        self.out = Linear(P[f"{pre}.wo"], b("bo"))
        self.H, self.rec, self.name, self.bug = n_heads, rec, name, bug

    def heads(self, x):                                     # (B, T, C) -> (B, H, T, D)
        B, T, C = x.shape
        return x.reshape(B, T, self.H, C // self.H).transpose(0, 2, 1, 3)

    def forward(self, x, store_scores: bool):
        r, n = self.rec, self.name
        q = r.tap(f"{n}.q", self.heads(self.query.forward(x)))
        k = r.tap(f"{n}.k", self.heads(self.key.forward(x)))
        v = r.tap(f"{n}.v", self.heads(self.value.forward(x)))
        T = x.shape[1]
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(0, 1, 3, 2)) * self.scale          # (B, H, T, T)
        future = np.triu(np.ones((T, T), dtype=bool), k=1)
        e = np.exp(np.where(future, -np.inf, scores) - np.where(future, -np.inf, scores).max(-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)
        if store_scores:
            r.tap(f"{n}.att", scores)
            r.tap(f"{n}.probs", probs)
        self.q, self.k, self.v, self.probs = q, k, v, probs
        y = probs @ v                                                 # (B, H, T, D)
        B, H, _, D = y.shape
        ctx = r.tap(f"{n}.ctx", y.transpose(0, 2, 1, 3).reshape(B, T, H * D))
        return r.tap(f"{n}.out", self.out.forward(ctx))

    def backward(self, dout, store_scores: bool):
        r, n = self.rec, self.name
        r.grad(f"{n}.out", dout)
        dctx = r.grad(f"{n}.ctx", self.out.backward(dout))
        dy = self.heads(dctx)
        dprobs = dy @ self.v.transpose(0, 1, 3, 2)
        dv = self.probs.transpose(0, 1, 3, 2) @ dy
        dscores = self.probs * (dprobs - (dprobs * self.probs).sum(axis=-1, keepdims=True))
        if store_scores:
            r.grad(f"{n}.probs", dprobs)
            r.grad(f"{n}.att", dscores)
        s = 1.0 if self.bug == "attn_backward_no_scale" else self.scale
        dq = (dscores @ self.k) * s
        dk = (dscores.transpose(0, 1, 3, 2) @ self.q) * s
        r.grad(f"{n}.v", dv)
        r.grad(f"{n}.k", dk)
        r.grad(f"{n}.q", dq)
        merge = (lambda g: g.transpose(0, 2, 1, 3).reshape(dctx.shape))
        return (self.query.backward(merge(dq)) + self.key.backward(merge(dk))
                + self.value.backward(merge(dv)))


class FeedForward:
    def __init__(self, P, pre, activation, rec, name, bug=None):
        self.up = Linear(P[f"{pre}.up.weight"], P.get(f"{pre}.up.bias"))
        self.bug = bug
        self.down = Linear(P[f"{pre}.down.weight"], P.get(f"{pre}.down.bias"))
        self.activation, self.rec, self.name = activation, rec, name

    def forward(self, x):
        r, n = self.rec, self.name
        h = self.h = r.tap(f"{n}.fc", self.up.forward(x))
        if self.activation == "relu":
            a = np.maximum(h, 0)
        elif self.activation == "gelu":                    # exact: x Phi(x)
            a = h * self.phi_cdf(h)
        else:                                              # tanh approximation
            self.t = np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))
            a = 0.5 * h * (1 + self.t)
        return r.tap(f"{n}.out", self.down.forward(r.tap(f"{n}.act", a)))

    @staticmethod
    def phi_cdf(h):
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return (0.5 * (1 + erf(h.astype(np.float64) / math.sqrt(2)))).astype(h.dtype)

    def backward(self, dout):
        r, n = self.rec, self.name
        r.grad(f"{n}.out", dout)
        da = r.grad(f"{n}.act", self.down.backward(dout))
        h = self.h
        if self.activation == "relu":
            dh = da * (h > 0)
        elif self.activation == "gelu":
            pdf = np.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
            dh = da * (self.phi_cdf(h) + h * pdf)
        else:
            du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * h * h)
            dh = da * (0.5 * (1 + self.t) + 0.5 * h * (1 - self.t * self.t) * du)
        before = self.up.weight.grad.copy()
        dx = self.up.backward(r.grad(f"{n}.fc", dh))
        if self.bug == "mlp_fc_weight_grad_doubled":    # planted: this call's weight gradient counted twice
            self.up.weight.grad += self.up.weight.grad - before
        return dx


class Block:
    def __init__(self, P, i, cfg, rec, bug):
        pre = f"blocks.{i}"
        self.norm1 = LayerNorm(P[f"{pre}.norm1.gain"], P.get(f"{pre}.norm1.shift"), cfg["ln_eps"], bug)
        self.norm2 = LayerNorm(P[f"{pre}.norm2.gain"], P.get(f"{pre}.norm2.shift"), cfg["ln_eps"], bug)
        self.attn = SelfAttention(P, f"{pre}.attn", cfg["n_heads"], rec, f"h.{i}.attn", bug)
        self.ffn = FeedForward(P, f"{pre}.ffn", cfg["activation"], rec, f"h.{i}.mlp", bug)
        self.pre_ln, self.rec, self.n = cfg["norm"] == "pre", rec, f"h.{i}"
        self.scores = cfg["attention"] == "standard"

    def forward(self, x):
        r, n = self.rec, self.n
        if self.pre_ln:
            r1 = r.tap(f"{n}.resid_1", x + self.attn.forward(r.tap(f"{n}.ln_1.out", self.norm1.forward(x)),
                                                              self.scores))
            return r.tap(f"{n}.out", r1 + self.ffn.forward(r.tap(f"{n}.ln_2.out", self.norm2.forward(r1))))
        r1 = r.tap(f"{n}.resid_1", x + self.attn.forward(x, self.scores))
        a = r.tap(f"{n}.ln_1.out", self.norm1.forward(r1))
        r2 = r.tap(f"{n}.resid_2", a + self.ffn.forward(a))
        return r.tap(f"{n}.out", self.norm2.forward(r2))

    def backward(self, dout):
        r, n = self.rec, self.n
        r.grad(f"{n}.out", dout)
        if self.pre_ln:
            dr1 = dout + self.norm2.backward(r.grad(f"{n}.ln_2.out", self.ffn.backward(dout)))
            r.grad(f"{n}.resid_1", dr1)
            return dr1 + self.norm1.backward(r.grad(f"{n}.ln_1.out", self.attn.backward(dr1, self.scores)))
        dr2 = r.grad(f"{n}.resid_2", self.norm2.backward(dout))
        da = r.grad(f"{n}.ln_1.out", dr2 + self.ffn.backward(dr2))
        dr1 = r.grad(f"{n}.resid_1", self.norm1.backward(da))
        return dr1 + self.attn.backward(dr1, self.scores)


class GPT:
    def __init__(self, own: dict, cfg: dict, bug: str | None = None):
        self.cfg, self.bug, self.rec = cfg, bug, Recorder()
        self.P = {name: Param(a) for name, a in own.items()}
        P = self.P
        self.blocks = [Block(P, i, cfg, self.rec, bug) for i in range(cfg["n_layers"])]
        self.final_norm = LayerNorm(P["final_norm.gain"], P.get("final_norm.shift"), cfg["ln_eps"], bug)
        W = P["tok_emb"] if cfg["tie_embeddings"] else P["unembed"]
        self.heads = [Linear(W, None, transposed_grad_bug=bug == "wte_grad_transposed")]
        self.future = []
        for j in range(2, cfg["n_future"] + 1):
            self.future.append(Linear(P[f"future.{j}.weight"], P.get(f"future.{j}.bias")))
            self.heads.append(Linear(W, None, transposed_grad_bug=bug == "wte_grad_transposed"))

    def forward(self, ids, targets):
        r, cfg = self.rec, self.cfg
        self.ids = ids
        T = ids.shape[1]
        x = r.tap("embed.out", self.P["tok_emb"].data[ids] + self.P["pos_emb"].data[:T])
        for blk in self.blocks:
            x = blk.forward(x)
        x = r.tap("ln_f.out", self.final_norm.forward(x))
        logits = [r.tap("logits", self.heads[0].forward(x))]
        for j, (proj, head) in enumerate(zip(self.future, self.heads[1:]), start=2):
            logits.append(r.tap(f"mtp.{j}.logits", head.forward(r.tap(f"mtp.{j}.out", proj.forward(x)))))
        # one loss per head whose targets are not all PAD; the model's loss is their mean
        self.loss_parts = []
        for j, z in enumerate(logits, start=1):
            tj = np.full_like(targets, cfg["pad_id"])
            tj[:, : max(T - (j - 1), 0)] = targets[:, j - 1:]
            self.loss_parts.append(self.head_loss(z, tj))
        active = [p for p in self.loss_parts if p is not None]
        self.n_active = len(active)
        self.loss = np.asarray(sum(p[0] for p in active) / self.n_active, dtype=x.dtype)
        return self.loss

    def head_loss(self, logits, targets):
        cfg = self.cfg
        keep = targets != cfg["pad_id"]                        # (B, T)
        n = int(keep.sum())
        if n == 0:
            return None
        z = logits / cfg["temperature"]
        z = z - z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
        onehot = np.zeros_like(p)
        np.put_along_axis(onehot, targets[..., None], 1, axis=-1)
        if cfg["loss"] == "cross_entropy":
            per = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
        else:
            per = ((p - onehot) ** 2).sum(axis=-1)
        return per[keep].sum() / n, p, onehot, keep, n

    def head_loss_backward(self, part):
        cfg = self.cfg
        _, p, onehot, keep, n = part
        w = keep[..., None].astype(p.dtype) * (1.0 / (n * self.n_active * cfg["temperature"]))  # (B, T, 1)
        if cfg["loss"] == "cross_entropy":
            dz = p - onehot
        else:
            e = p - onehot
            dz = 2 * p * (e - (e * p).sum(axis=-1, keepdims=True))
        return dz * w

    def backward(self):
        r = self.rec
        dx = 0
        for j, (head, part) in enumerate(zip(self.heads, self.loss_parts), start=1):
            name = "logits" if j == 1 else f"mtp.{j}.logits"
            dz = np.zeros_like(r.taps[name]) if part is None else self.head_loss_backward(part)
            dh = head.backward(r.grad(name, dz))
            if j > 1:
                dh = self.future[j - 2].backward(r.grad(f"mtp.{j}.out", dh))
            dx = dx + dh
        dx = self.final_norm.backward(r.grad("ln_f.out", dx))
        for blk in reversed(self.blocks):
            dx = blk.backward(dx)
        r.grad("embed.out", dx)
        tok = self.P["tok_emb"]
        g = np.zeros_like(tok.grad)
        np.add.at(g, self.ids, dx)
        if self.bug == "tied_grad_assigned":
            tok.grad[...] = g                                  # planted: = instead of +=
        else:
            tok.grad += g
        self.P["pos_emb"].grad[: dx.shape[1]] += dx.sum(axis=0)


# ================================================================================================
# the case and the dump

class Unsupported(Exception):
    pass


def read_case(case: Path):
    for f in ("checkpoint.safetensors", "ids.npy", "targets.npy"):
        if not (case / f).is_file():
            raise FileNotFoundError(f"case folder {case} has no {f} (write one with "
                                    f"python -m tools.layerdiff --export-case {case})")
    with safe_open(str(case / "checkpoint.safetensors"), framework="np") as f:
        meta = f.metadata() or {}
        params = {k: f.get_tensor(k) for k in f.keys()}
    if "config" not in meta:
        raise ValueError(f"{case / 'checkpoint.safetensors'} has no 'config' in its metadata")
    cfg = json.loads(meta["config"])
    for field, value in cfg.items():
        if field not in SUPPORTED:
            raise Unsupported(f"unsupported configuration field {field}={value!r} (this port does not know it)")
        allowed = SUPPORTED[field]
        if allowed is not None and value not in allowed:
            raise Unsupported(f"unsupported configuration field {field}={value!r} (supported: {list(allowed)})")
    ids = np.load(case / "ids.npy", allow_pickle=False).astype(np.int64)
    targets = np.load(case / "targets.npy", allow_pickle=False).astype(np.int64)
    return cfg, params, ids, targets


def run(case: Path, out: Path, bug: str | None = None) -> None:
    cfg, canonical, ids, targets = read_case(case)
    dtype = np.dtype(cfg["dtype"])
    model = GPT(to_own({k: v.astype(dtype) for k, v in canonical.items()}, cfg), cfg, bug)
    model.forward(ids, targets)
    model.backward()
    dump = dict(model.rec.taps)
    dump["loss"] = model.loss
    dump.update({f"grad.{k}": v for k, v in model.rec.grads.items()})
    grads = to_canonical({name: p.grad for name, p in model.P.items()}, cfg, canonical)
    dump.update({f"grad.{k}": v for k, v in grads.items()})
    bad = {k: str(v.dtype) for k, v in dump.items() if v.dtype != dtype}
    if bad:                                                # a float64 promotion in a float32 run is our bug
        raise AssertionError(f"tensors not in {dtype}: {bad}")
    save_file({k: np.ascontiguousarray(v) for k, v in dump.items()}, str(out))


def train(case: Path, out: Path, steps: int, bug: str | None = None) -> None:
    """`steps` optimizer steps on CASE/train/; writes losses and the final parameters."""
    cfg, canonical, _ids, _targets = read_case(case)
    dtype = np.dtype(cfg["dtype"])
    folder = case / "train"
    if not (folder / "optimizer.json").is_file():
        raise FileNotFoundError(f"--steps {steps} needs {folder}/optimizer.json, ids.npy and targets.npy")
    opt = json.loads((folder / "optimizer.json").read_text())
    ids_all = np.load(folder / "ids.npy", allow_pickle=False).astype(np.int64)          # (N, B, T)
    targets_all = np.load(folder / "targets.npy", allow_pickle=False).astype(np.int64)  # (N, B, T)
    if ids_all.ndim != 3 or len(ids_all) < steps:
        raise ValueError(f"{folder}/ids.npy has shape {ids_all.shape}; --steps {steps} needs ({steps}, B, T)")
    if opt["kind"] not in ("sgd", "adamw"):
        raise Unsupported(f"unsupported configuration field optimizer kind={opt['kind']!r} (supported: sgd, adamw)")
    model = GPT(to_own({k: v.astype(dtype) for k, v in canonical.items()}, cfg), cfg, bug)
    decay = set(opt.get("decay", []))
    own_decays = {own: canon in decay for own, canon, _ in layout_rows(cfg, canonical)}
    state = {name: {} for name in model.P}
    losses = []
    for t in range(1, steps + 1):
        for p in model.P.values():
            p.grad[...] = 0
        losses.append(model.forward(ids_all[t - 1], targets_all[t - 1]))
        model.backward()
        clip = opt.get("clip_grad_norm")
        if clip is not None:                       # global L2 norm over every parameter (tied wte once)
            norm = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in model.P.values()))
            if clip / (norm + 1e-6) < 1:
                for p in model.P.values():
                    p.grad *= clip / (norm + 1e-6)
        for name, p in model.P.items():
            wd = opt["weight_decay"] if own_decays[name] else 0.0
            st = state[name]
            if opt["kind"] == "sgd":
                g = p.grad + wd * p.data
                st["buf"] = g.copy() if "buf" not in st else opt["momentum"] * st["buf"] + g
                p.data -= opt["lr"] * st["buf"]
            else:
                b1, b2 = opt["betas"]
                p.data *= 1 - opt["lr"] * wd
                st["m"] = b1 * st.get("m", 0) + (1 - b1) * p.grad
                st["v"] = b2 * st.get("v", 0) + (1 - b2) * p.grad * p.grad
                denom = np.sqrt(st["v"]) / math.sqrt(1 - b2 ** t) + opt["eps"]
                p.data -= opt["lr"] / (1 - b1 ** t) * st["m"] / denom
    result = to_canonical({name: p.data for name, p in model.P.items()}, cfg, canonical)
    result["losses"] = np.asarray(losses, dtype=dtype)
    save_file(result, str(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", type=Path, help="folder written by python -m tools.layerdiff --export-case")
    p.add_argument("out", type=Path, help="the dump to write (.safetensors)")
    p.add_argument("--bug", choices=sorted(BUGS), help="plant one bug: " +
                   "; ".join(f"{k}: {v}" for k, v in BUGS.items()))
    p.add_argument("--steps", type=int, default=0, help="train N steps on CASE/train/ instead (see above)")
    args = p.parse_args(argv)
    try:
        if args.steps > 0:
            train(args.case, args.out, args.steps, args.bug)
        else:
            run(args.case, args.out, args.bug)
    except Unsupported as exc:
        print(exc, file=sys.stderr)
        return EXIT_UNSUPPORTED
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"port.py: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
