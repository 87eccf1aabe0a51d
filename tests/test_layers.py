"""Every layer's hand-written backward against float64 central finite differences.

Each check drives the layer with a random upstream gradient G: the scalar objective is
f = sum(out * G), so df/dinput is exactly what backward returns for dout = G. Parameter
gradients are accumulated into buffers that start at a random non-zero value, so a backward
that assigns (=) instead of accumulating (+=) fails too.
"""
import math

import numpy as np
import pytest

from manual.layers import (ACTIVATIONS, AttentionCache, attention_backward, attention_forward, block_backward, block_forward,
                           embedding_backward, embedding_forward, erf, layernorm_backward, layernorm_forward,
                           linear_backward, linear_forward, loss_backward, loss_forward, mlp_backward,
                           mlp_forward, unembed_backward, unembed_forward)
from manual.config import ModelConfig

EPS = 1e-5   # step of the finite differences (float64 only)
TOL = 1e-6   # max relative error allowed
B, T, C, H, F, V = 2, 5, 8, 2, 12, 11


def rel_err(fd, an):
    """max_i |fd_i - an_i| / max(|fd_i| + |an_i|, 1e-3 * scale, 1e-8), scale = max_i (|fd_i| + |an_i|).

    Per entry relative error, except that an entry far below its tensor's scale is measured
    against 1/1000 of that scale: some gradients are exactly zero (the key bias: softmax does not
    see a per-row shift), where finite differences only return their rounding noise
    (~1e-16 |f| / eps).
    """
    fd, an = np.asarray(fd, np.float64), np.asarray(an, np.float64)
    mag = np.abs(fd) + np.abs(an)
    floor = max(1e-3 * float(mag.max(initial=0.0)), 1e-8)
    return float(np.max(np.abs(fd - an) / np.maximum(mag, floor)))


def central_difference(objective, arr, idx, h=EPS):
    """df/darr[idx] by the fourth-order central difference
        (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h,
    truncation error ~h^4 f^(5) / 30, rounding error ~1e-16 |f| / h. The two-point
    (f(x+h) - f(x-h)) / 2h with h = 1e-6 leaves ~1e-10 of rounding noise on a loss of ~2,
    which is 1e-5 relative on a gradient entry of 1e-5: too coarse to check 1e-6.
    """
    old = arr[idx]
    f = {}
    for k in (-2, -1, 1, 2):
        arr[idx] = old + k * h
        f[k] = objective()
    arr[idx] = old
    return (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)


def fd_check(name, objective, arrays, analytic, n=6, seed=0):
    """Compare analytic[k] with central differences of objective() w.r.t. arrays[k] at n random entries."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for key, arr in arrays.items():
        fd, an = [], []
        for _ in range(n):
            idx = tuple(int(rng.integers(0, s)) for s in arr.shape)
            fd.append(central_difference(objective, arr, idx))
            an.append(analytic[key][idx])
        err = rel_err(fd, an)
        assert err <= TOL, f"{name}: gradient of {key}: max relative error {err:.3e} > {TOL:g} (fd {fd}, an {an})"
        worst = max(worst, err)
    print(f"FD worst relative error  {name:24s} {worst:.2e}")   # visible with pytest -s
    return worst


def rand(rng, *shape, scale=1.0):
    return rng.normal(0.0, scale, size=shape)


def buffers(rng, params):
    """Gradient buffers starting at a random value (start), to check accumulation."""
    start = {k: rand(rng, *v.shape) for k, v in params.items() if v is not None}
    return start, {k: v.copy() for k, v in start.items()}


# -- erf ----------------------------------------------------------------------------------------
# manual.layers.erf (manual/layers/special.py) is the one erf of the project: GELU computes 1 + erf(x / sqrt 2)
# with it, so these tests check the function the model runs. Most inputs span several chunks (CHUNK entries).

def ulps32(got, ref):
    """|got - ref| in units in the last place of float32 (both float32 arrays of one sign per entry)."""
    return np.abs(got.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))


def test_gelu_uses_this_erf():
    from manual.layers import activations, special
    assert activations.erf is erf is special.erf
    x = np.linspace(-5, 5, 101)
    np.testing.assert_array_equal(activations.gelu_forward(x)[0], 0.5 * x * erf(x, scale=1 / math.sqrt(2), offset=1))


def test_erf_matches_math_erf_to_float64_precision():
    xs = np.concatenate([np.linspace(-7, 7, 100001), np.geomspace(1e-300, 30, 5000), -np.geomspace(1e-300, 30, 5000),
                         [0.0, -0.0, 0.84375, 1.25, 1 / 0.35, 6.0, -6.0, 1e308, -1e308, np.nextafter(0.84375, 0)]])
    assert xs.size > 3 * erf_chunk()
    ref = np.array([math.erf(v) for v in xs])
    got = erf(xs)
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    assert rel.max() <= 1e-15, f"erf: max relative error {rel.max():.3e} at x = {xs[rel.argmax()]!r}"
    assert got.dtype == np.float64


def erf_chunk():
    from manual.layers.special import CHUNK
    return CHUNK


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_special_values_scale_offset_and_bad_dtype(dtype):
    got = erf(np.array([np.inf, -np.inf, np.nan, 0.0], dtype=dtype))
    assert got.dtype == dtype and got[0] == 1.0 and got[1] == -1.0 and np.isnan(got[2]) and got[3] == 0.0
    got = erf(np.array([np.inf, -np.inf, 0.0], dtype=dtype), scale=0.5, offset=1.0)
    assert got.dtype == dtype and list(got) == [2.0, 0.0, 1.0]
    x = np.linspace(-4, 4, 1001).astype(dtype).reshape(7, 11, 13)
    got = erf(x, scale=0.7, offset=1.0)
    assert got.shape == x.shape and got.dtype == dtype
    ref = np.array([math.erfc(-0.7 * float(v)) for v in x.reshape(-1)]).reshape(x.shape)   # 1 + erf(0.7 x)
    eps = np.finfo(dtype).eps    # float64: 1 + erf is rounded in float64 (absolute error ~eps), as GELU's
    np.testing.assert_allclose(got, ref, rtol=4 * eps, atol=2 * eps)
    with pytest.raises(TypeError, match="float32 or float64 .* got dtype int64"):
        erf(np.arange(3))
    empty = erf(np.zeros((2, 0, 3), dtype=dtype), offset=1.0)     # an empty tensor: no chunk, no tail
    assert empty.shape == (2, 0, 3) and empty.dtype == dtype


def test_float32_erf_within_one_ulp_and_tails_correctly_rounded():
    """float32: float32 arithmetic where |x| < 0.84375, within 1 ulp of float32(math.erf(x)); elsewhere
    the float64 value rounded once, i.e. correctly rounded."""
    rng = np.random.default_rng(0)
    below = float(np.nextafter(np.float32(0.84375), np.float32(0)))   # the largest float32 below 0.84375
    x = np.concatenate([rng.uniform(-below, below, 200000), np.geomspace(1e-30, below, 2000),
                        -np.geomspace(1e-30, below, 2000), [0.0, below, -below]]).astype(np.float32)
    got = erf(x)
    assert got.dtype == np.float32
    ref = np.array([math.erf(float(v)) for v in x], dtype=np.float32)
    ulps = ulps32(got, ref)
    assert ulps.max() <= 1, f"float32 erf: {ulps.max()} ulp at x = {x[ulps.argmax()]!r}"
    tails = np.concatenate([np.linspace(0.84375, 7, 50001), -np.linspace(0.84375, 7, 50001)]).astype(np.float32)
    ref = np.array([math.erf(float(v)) for v in tails], dtype=np.float32)   # correctly rounded float64 -> float32
    assert np.array_equal(erf(tails), ref)


def test_float32_one_plus_erf_near_minus_one_is_rounded_once():
    """GELU's 1 + erf(x / sqrt 2) for x << 0 is tiny (erfc): float32 keeps its relative accuracy because
    the offset is added in float64 before the one rounding (adding 1 to a rounded float32 erf would
    leave errors up to ~5e-4 relative at x = -4). Below x = -5 the float64 1 + erf itself cancels
    (erfc(5 / sqrt 2) = 6e-7, so 1e-16 / 6e-7 ~ 2e-10 relative there, still far below float32's)."""
    x = np.linspace(-5, -1.2, 20001).astype(np.float32)
    got = erf(x, scale=1 / math.sqrt(2), offset=1.0)
    assert got.dtype == np.float32
    ref = np.array([math.erfc(-float(v) / math.sqrt(2)) for v in x])
    rel = np.abs(got - ref) / ref
    assert rel.max() <= np.finfo(np.float32).eps, \
        f"1 + erf(x / sqrt 2) float32: relative error {rel.max():.2e} at x = {x[rel.argmax()]}"


def test_gelu_float32_close_to_float64():
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.normal(0, 3, 100000), [0.0, 1e-30, -40.0, 40.0, 1.19, -1.2]])
    y32 = ACTIVATIONS["gelu"][0](xs.astype(np.float32))[0]
    y64 = ACTIVATIONS["gelu"][0](xs.astype(np.float32).astype(np.float64))[0]
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=4e-7, atol=1e-30)


# -- embedding ------------------------------------------------------------------------------------

def test_embedding_backward_fd_with_repeated_ids():
    rng = np.random.default_rng(1)
    S = 7
    wte, wpe = rand(rng, V, C), rand(rng, S, C)
    ids = np.array([[3, 3, 1, 3, 0], [1, 3, 10, 10, 2]])          # repeats within and across rows
    G = rand(rng, B, T, C)
    out, cache = embedding_forward(ids, wte, wpe)
    start, g = buffers(rng, {"wte": wte, "wpe": wpe})
    assert embedding_backward(G, cache, g["wte"], g["wpe"]) is None
    analytic = {k: g[k] - start[k] for k in g}
    fd_check("embedding", lambda: np.sum(embedding_forward(ids, wte, wpe)[0] * G), {"wte": wte, "wpe": wpe}, analytic,
             n=12)
    # the repeated id 3 gets the sum over its four positions, checked exactly
    expected3 = G[0, 0] + G[0, 1] + G[0, 3] + G[1, 1]
    np.testing.assert_allclose(analytic["wte"][3], expected3, rtol=1e-13)
    assert np.all(analytic["wpe"][T:] == 0)


# -- linear, unembed --------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_fd(bias):
    rng = np.random.default_rng(2)
    x, W = rand(rng, B, T, C), rand(rng, C, F)
    b = rand(rng, F) if bias else None
    G = rand(rng, B, T, F)
    out, cache = linear_forward(x, W, b)
    np.testing.assert_allclose(out, np.einsum("btc,cf->btf", x, W) + (b if bias else 0), rtol=1e-12)
    start, g = buffers(rng, {"W": W, "b": b})
    dx = linear_backward(G, cache, g["W"], g.get("b"))
    analytic = {"x": dx, **{k: g[k] - start[k] for k in g}}
    arrays = {"x": x, "W": W, **({"b": b} if bias else {})}
    fd_check("linear", lambda: np.sum(linear_forward(x, W, b)[0] * G), arrays, analytic)


def test_unembed_backward_fd():
    rng = np.random.default_rng(3)
    x, W, G = rand(rng, B, T, C), rand(rng, V, C), rand(rng, B, T, V)
    out, cache = unembed_forward(x, W)
    start, g = buffers(rng, {"W": W})
    dx = unembed_backward(G, cache, g["W"])
    fd_check("unembed", lambda: np.sum(unembed_forward(x, W)[0] * G), {"x": x, "W": W},
             {"x": dx, "W": g["W"] - start["W"]})


# -- layer norm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_backward_fd(bias):
    rng = np.random.default_rng(4)
    x = rand(rng, B, T, C, scale=3.0) + 1.5
    w = rand(rng, C) + 1.0
    b = rand(rng, C) if bias else None
    G = rand(rng, B, T, C)
    y, cache = layernorm_forward(x, w, b, 1e-5)
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)   # biased var, eps inside
    np.testing.assert_allclose(y, xhat * w + (b if bias else 0), rtol=1e-12, atol=1e-12)
    start, g = buffers(rng, {"w": w, "b": b})
    dx = layernorm_backward(G, cache, g["w"], g.get("b"))
    arrays = {"x": x, "w": w, **({"b": b} if bias else {})}
    fd_check("layernorm", lambda: np.sum(layernorm_forward(x, w, b, 1e-5)[0] * G), arrays,
             {"x": dx, **{k: g[k] - start[k] for k in g}})


# -- activations -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh"])
def test_activation_backward_fd(name):
    rng = np.random.default_rng(5)
    fwd, bwd = ACTIVATIONS[name]
    x = rand(rng, B, T, F, scale=2.0)
    x[np.abs(x) < 1e-3] = 0.5                                      # relu: stay away from the kink
    G = rand(rng, B, T, F)
    y, cache = fwd(x)
    dx = bwd(G, cache)
    fd_check(name, lambda: np.sum(fwd(x)[0] * G), {"x": x}, {"x": dx}, n=20)


def test_activation_values():
    x = np.array([-3.0, -0.5, 0.0, 0.7, 2.5])
    np.testing.assert_allclose(ACTIVATIONS["gelu"][0](x)[0], [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x],
                               rtol=1e-15, atol=1e-300)
    k = math.sqrt(2 / math.pi)
    np.testing.assert_allclose(ACTIVATIONS["gelu_tanh"][0](x)[0],
                               [0.5 * v * (1 + math.tanh(k * (v + 0.044715 * v ** 3))) for v in x], rtol=1e-14)
    assert list(ACTIVATIONS["relu"][1](np.ones(3), ACTIVATIONS["relu"][0](np.array([-1.0, 0.0, 2.0]))[1])) == [0, 0, 1]


@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh"])
def test_activation_float32_stays_float32(name):
    fwd, bwd = ACTIVATIONS[name]
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    y, cache = fwd(x)
    assert y.dtype == np.float32 and bwd(np.ones_like(x), cache).dtype == np.float32


# -- attention ---------------------------------------------------------------------------------------

def attention_reference(a, Wa, ba, Wp, bp, H):
    """The architecture's equations written plainly with loops over heads (a test oracle)."""
    Bn, Tn, Cn = a.shape
    D = Cn // H
    qkv = a @ Wa + (ba if ba is not None else 0)
    out = np.zeros((Bn, Tn, Cn))
    for h in range(H):
        q, k, v = (qkv[:, :, i * Cn + h * D: i * Cn + (h + 1) * D] for i in range(3))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(D)
        s = np.where(np.tril(np.ones((Tn, Tn), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, h * D:(h + 1) * D] = p @ v
    return out @ Wp + (bp if bp is not None else 0)


@pytest.mark.parametrize("flash", [False, True])
def test_attention_cache_names_its_softmax_statistics(flash):
    """Standard attention keeps probs (B, H, T, T), flash keeps lse (B, H, T); the other field is None."""
    rng = np.random.default_rng(6)
    a = rand(rng, B, T, C)
    taps, cache = attention_forward(a, rand(rng, C, 3 * C), None, rand(rng, C, C), None, H, flash=flash, block=2)
    assert isinstance(cache, AttentionCache)
    if flash:
        assert cache.probs is None and cache.lse.shape == (B, H, T)
        np.testing.assert_allclose(cache.lse, np.log(np.exp(taps["q"] @ taps["k"].transpose(0, 1, 3, 2) / math.sqrt(C // H)
                                                            + np.triu(np.full((T, T), -np.inf), 1)).sum(-1)),
                                   rtol=1e-13)
    else:
        assert cache.lse is None and cache.probs is taps["probs"] and cache.probs.shape == (B, H, T, T)
    assert cache.ctx is taps["ctx"] and cache.c_attn.x is a and cache.qkv.shape == (B, T, 3 * C)


@pytest.mark.parametrize("flash,block,bias", [(False, 64, True), (False, 64, False), (True, 2, True), (True, 3, False),
                                              (True, 64, True)])
def test_attention_backward_fd(flash, block, bias):
    rng = np.random.default_rng(6)
    a = rand(rng, B, T, C)
    Wa, Wp = rand(rng, C, 3 * C, scale=0.7), rand(rng, C, C)
    ba, bp = (rand(rng, 3 * C), rand(rng, C)) if bias else (None, None)
    G = rand(rng, B, T, C)

    def fwd():
        return attention_forward(a, Wa, ba, Wp, bp, H, flash=flash, block=block)[0]["out"]

    np.testing.assert_allclose(fwd(), attention_reference(a, Wa, ba, Wp, bp, H), rtol=1e-12, atol=1e-12)
    taps, cache = attention_forward(a, Wa, ba, Wp, bp, H, flash=flash, block=block)
    start, g = buffers(rng, {"Wa": Wa, "ba": ba, "Wp": Wp, "bp": bp})
    rec = {}
    da = attention_backward(G, cache, g["Wa"], g.get("ba"), g["Wp"], g.get("bp"), record=rec)
    arrays = {"a": a, "Wa": Wa, "Wp": Wp, **({"ba": ba, "bp": bp} if bias else {})}
    fd_check("attention (flash)" if flash else "attention", lambda: np.sum(fwd() * G), arrays,
             {"a": da, **{k: g[k] - start[k] for k in g}}, n=8)
    assert set(rec) == ({"out", "ctx", "q", "k", "v"} | (set() if flash else {"att", "probs"}))
    if not flash:  # gradient w.r.t. att is zero at masked entries; w.r.t. probs it is the full dctx v^T
        upper = np.triu(np.ones((T, T), bool), 1)
        assert np.all(rec["att"][..., upper] == 0)
        assert np.all(rec["probs"][..., upper] != 0)
        assert np.all(taps["probs"][..., upper] == 0) and np.all(taps["att"][..., upper] != 0)


def test_flash_matches_standard_taps_and_grads():
    rng = np.random.default_rng(7)
    Tn = 7
    a, Wa, Wp, ba, bp = rand(rng, B, Tn, C), rand(rng, C, 3 * C), rand(rng, C, C), rand(rng, 3 * C), rand(rng, C)
    G = rand(rng, B, Tn, C)
    res = {}
    for flash in (False, True):
        taps, cache = attention_forward(a, Wa, ba, Wp, bp, H, flash=flash, block=3)
        g = {k: np.zeros_like(v) for k, v in (("Wa", Wa), ("ba", ba), ("Wp", Wp), ("bp", bp))}
        rec = {}
        da = attention_backward(G, cache, g["Wa"], g["ba"], g["Wp"], g["bp"], record=rec)
        res[flash] = (taps, rec, da, g)
    for name in ("q", "k", "v", "ctx", "out"):
        np.testing.assert_allclose(res[True][0][name], res[False][0][name], rtol=1e-12, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(res[True][1][name], res[False][1][name], rtol=1e-11, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(res[True][2], res[False][2], rtol=1e-11, atol=1e-13)
    for k in res[False][3]:                                    # and the four parameter gradients
        np.testing.assert_allclose(res[True][3][k], res[False][3][k], rtol=1e-11, atol=1e-13, err_msg=k)


# -- mlp, block ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation,bias", [("relu", True), ("gelu", True), ("gelu_tanh", True), ("gelu", False)])
def test_mlp_backward_fd(activation, bias):
    rng = np.random.default_rng(8)
    m, W1, W2 = rand(rng, B, T, C), rand(rng, C, F), rand(rng, F, C)
    b1, b2 = (rand(rng, F), rand(rng, C)) if bias else (None, None)
    G = rand(rng, B, T, C)

    def fwd():
        return mlp_forward(m, W1, b1, W2, b2, activation)[0][2]

    _, cache = mlp_forward(m, W1, b1, W2, b2, activation)
    start, g = buffers(rng, {"W1": W1, "b1": b1, "W2": W2, "b2": b2})
    dm = mlp_backward(G, cache, g["W1"], g.get("b1"), g["W2"], g.get("b2"))
    arrays = {"m": m, "W1": W1, "W2": W2, **({"b1": b1, "b2": b2} if bias else {})}
    fd_check("mlp", lambda: np.sum(fwd() * G), arrays, {"m": dm, **{k: g[k] - start[k] for k in g}}, n=8)


@pytest.mark.parametrize("norm,attention", [("pre", "standard"), ("post", "standard"), ("pre", "flash"),
                                            ("post", "flash")])
def test_block_backward_fd(norm, attention):
    cfg = ModelConfig(vocab_size=V, d_model=C, n_heads=H, d_ff=F, n_layers=1, max_seq_len=T, norm=norm,
                      attention=attention, dtype="float64")
    rng = np.random.default_rng(9)
    names = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (C, F), "mlp.c_fc.bias": (F,), "mlp.c_proj.weight": (F, C), "mlp.c_proj.bias": (C,)}
    p = {k: rand(rng, *s, scale=0.5) + (1.0 if k.endswith("ln_1.weight") or k.endswith("ln_2.weight") else 0.0)
         for k, s in names.items()}
    x, G = rand(rng, B, T, C), rand(rng, B, T, C)
    _, _, cache = block_forward(x, p, cfg, flash_block=2)
    start, g = buffers(rng, p)
    dx = block_backward(G, cache, g)
    fd_check(f"block ({norm})", lambda: np.sum(block_forward(x, p, cfg, flash_block=2)[0] * G), {"x": x, **p},
             {"x": dx, **{k: g[k] - start[k] for k in g}}, n=4)


# -- loss ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,temperature", [("cross_entropy", 1.0), ("cross_entropy", 0.6), ("brier", 1.0),
                                              ("brier", 2.5)])
def test_loss_backward_fd(kind, temperature):
    rng = np.random.default_rng(10)
    logits = rand(rng, B, T, V, scale=2.0)
    targets = rng.integers(0, V, (B, T))
    targets[0, 1] = targets[1, 4] = 0                              # PAD (pad_id 0) present
    targets[0, 0] = 3
    (loss, n), cache = loss_forward(logits, targets, 0, temperature, kind)
    valid = targets != 0
    assert n == valid.sum()
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(V)[targets]
    per = -np.log(np.sum(p * onehot, -1)) if kind == "cross_entropy" else np.sum((p - onehot) ** 2, -1)
    np.testing.assert_allclose(loss, per[valid].mean(), rtol=1e-13)
    up = 0.37                                                      # random-ish upstream scalar
    dlogits = loss_backward(up, cache)
    assert np.all(dlogits[~valid] == 0)
    fd_check(f"loss ({kind})", lambda: up * float(loss_forward(logits, targets, 0, temperature, kind)[0][0]),
             {"logits": logits}, {"logits": dlogits}, n=20)


@pytest.mark.parametrize("kind", ["cross_entropy", "brier"])
def test_loss_of_a_head_without_targets_is_nan_and_has_no_backward(kind):
    """n = 0: the loss is nan (no mean over no positions); backward refuses it with a clear error
    (the model skips such a head instead: tests/test_model.py test_idle_heads_*)."""
    rng = np.random.default_rng(11)
    (loss, n), cache = loss_forward(rand(rng, B, T, V), np.zeros((B, T), dtype=np.int64), 0, 1.0, kind)
    assert n == 0 and np.isnan(loss)
    with pytest.raises(ValueError, match=r"no non-PAD target \(n = 0\).*skip the head"):
        loss_backward(1.0, cache)
