"""The whole manual model: finite differences on every parameter tensor, accumulation, the tied
embedding's two contributions, dtypes, debug mode, checkpoints and the memory closed form."""
import numpy as np
import pytest

from manual import checkpoint
from manual.config import ModelConfig
from manual.memory import activation_breakdown, activation_bytes
from manual.model import DebugCheckError, Model
from manual.registry import init_params, param_count_closed_form, param_specs, tap_shapes
from test_layers import central_difference, rel_err, TOL

# Step of the model's finite differences: the loss (~2.5) carries ~5e-16 of rounding, which a step
# of 1e-4 turns into ~5e-12 of noise in a derivative; the h^4 truncation term stays below that.
MODEL_H = 1e-4
SMALL = dict(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_layers=2, max_seq_len=6)


def small_cfg(**overrides):
    return ModelConfig(**{**SMALL, "dtype": "float64", **overrides})


def batch(cfg, B=2, T=6, seed=0, pad=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[targets == cfg.pad_id] = (cfg.pad_id + 1) % cfg.vocab_size
    if pad:
        targets[0, min(2, T - 1)] = targets[-1, T - 1] = cfg.pad_id      # PAD present in the targets
    return ids, targets


def perturbed_model(cfg, seed=1, scale=0.3, **kwargs):
    """A model whose weights are far from the init (larger gradients, biases and LN weights non-trivial)."""
    m = Model(cfg, seed, **kwargs)
    rng = np.random.default_rng(seed)
    for arr in m.params.values():
        arr += rng.normal(0.0, scale, arr.shape).astype(arr.dtype)
    return m


# -- finite differences, whole model ---------------------------------------------------------------------

VARIANTS = [
    dict(),
    dict(norm="post"),
    dict(activation="relu"),
    dict(activation="gelu_tanh"),
    dict(bias=False),
    dict(tie_embeddings=False),
    dict(n_future=3),
    dict(n_future=3, norm="post", tie_embeddings=False),
    dict(loss="brier"),
    dict(loss="brier", n_future=3, temperature=1.7),
    dict(temperature=0.6),
    dict(pad_id=4),
    dict(attention="flash"),
    dict(attention="flash", norm="post", n_future=3, bias=False),
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_model_gradients_match_finite_differences(overrides):
    cfg = small_cfg(**overrides)
    model = perturbed_model(cfg, flash_block=4)         # flash: T = 6 spans two blocks of keys
    ids, targets = batch(cfg)
    model.forward(ids, targets)
    model.zero_grad()
    model.backward()
    rng = np.random.default_rng(2)
    worst = (0.0, "")
    for name, arr in model.params.items():
        idxs = [tuple(int(rng.integers(0, s)) for s in arr.shape) for _ in range(4)]
        fd = [central_difference(lambda: model.forward(ids, targets), arr, idx, h=MODEL_H) for idx in idxs]
        an = [model.grads[name][idx] for idx in idxs]
        err = rel_err(fd, an)
        assert err <= TOL, f"{cfg}: gradient of {name}: max relative error {err:.3e} > {TOL:g}\n fd {fd}\n an {an}"
        worst = max(worst, (err, name))
    print(f"FD worst relative error, model {overrides}: {worst[0]:.2e} ({worst[1]})")


# -- accumulation and the tied embedding ---------------------------------------------------------------

def test_two_backwards_accumulate_like_pytorch():
    cfg = small_cfg(n_future=2)
    model = perturbed_model(cfg)
    ids, targets = batch(cfg)
    model.forward(ids, targets)
    model.zero_grad()
    model.backward()
    once = {k: v.copy() for k, v in model.grads.items()}
    model.backward()                                    # no zero_grad: grads add up
    for name, g in model.grads.items():   # (the tied wte sums three terms per backward: equal up to rounding)
        np.testing.assert_allclose(g, 2 * once[name], rtol=1e-14, atol=1e-300, err_msg=name)
    model.forward(ids, targets)
    model.backward()
    for name, g in model.grads.items():
        np.testing.assert_allclose(g, 3 * once[name], rtol=1e-14, atol=1e-300, err_msg=name)
    model.zero_grad()
    assert all(not g.any() for g in model.grads.values())


@pytest.mark.parametrize("n_future", [1, 3])
def test_tied_embedding_receives_both_contributions(n_future):
    """Tied grad of wte == (untied model, same weights, lm_head = wte): grad of wte + grad of lm_head."""
    tied = perturbed_model(small_cfg(n_future=n_future))
    ucfg = small_cfg(n_future=n_future, tie_embeddings=False)
    params = dict(tied.params)
    params["lm_head.weight"] = tied.params["transformer.wte.weight"]
    untied = Model.from_params(ucfg, {s.name: params[s.name] for s in param_specs(ucfg)})
    ids, targets = batch(tied.cfg)
    for m in (tied, untied):
        m.forward(ids, targets)
        m.backward()
    assert tied.loss == pytest.approx(untied.loss, rel=1e-14)
    emb, head = untied.grads["transformer.wte.weight"], untied.grads["lm_head.weight"]
    assert np.abs(emb).max() > 1e-3 and np.abs(head).max() > 1e-3   # both contributions are substantial
    np.testing.assert_allclose(tied.grads["transformer.wte.weight"], emb + head, rtol=1e-12, atol=1e-15)


def test_repeated_token_gradient_is_summed_over_positions():
    cfg = small_cfg(tie_embeddings=False)
    model = perturbed_model(cfg)
    ids = np.array([[5, 5, 5, 2, 5, 1]])
    targets = np.array([[1, 2, 3, 4, 5, 6]])
    model.forward(ids, targets)
    model.backward()
    d_embed = model.tap_grads["embed.out"][0]
    np.testing.assert_allclose(model.grads["transformer.wte.weight"][5], d_embed[[0, 1, 2, 4]].sum(0), rtol=1e-13)
    np.testing.assert_allclose(model.grads["transformer.wpe.weight"], d_embed, rtol=1e-13)


# -- dtypes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("overrides", [dict(), dict(activation="gelu_tanh", norm="post", n_future=3, loss="brier",
                                                    temperature=0.7), dict(attention="flash", activation="relu",
                                                                           tie_embeddings=False)])
def test_every_output_has_the_config_dtype(dtype, overrides):
    cfg = small_cfg(dtype=dtype, **overrides)
    model = Model(cfg, 0, flash_block=4)
    ids, targets = batch(cfg)
    loss = model.forward(ids, targets)
    assert isinstance(loss, float) and isinstance(model.loss, float)
    model.backward()
    want = np.dtype(dtype)
    shapes = tap_shapes(cfg, *ids.shape)
    for group, tensors in (("param", model.params), ("grad", model.grads), ("tap", model.taps),
                           ("tap grad", model.tap_grads)):
        for name, arr in tensors.items():
            assert arr.dtype == want, f"{group} {name}: dtype {arr.dtype}, config {dtype}"
    assert list(model.taps) == list(shapes) == list(model.tap_grads)
    for name, shape in shapes.items():
        assert model.taps[name].shape == shape and model.tap_grads[name].shape == shape, name
    assert model.logits.dtype == want and model.logits.shape == (2, 6, cfg.vocab_size)


def test_float32_model_agrees_with_float64_model():
    c64 = small_cfg(n_future=2)
    c32 = c64.replace(dtype="float32")
    m64 = perturbed_model(c64)
    m32 = Model.from_params(c32, {k: v.astype(np.float32) for k, v in m64.params.items()})
    m64 = Model.from_params(c64, {k: v.astype(np.float32).astype(np.float64) for k, v in m64.params.items()})
    ids, targets = batch(c64)
    for m in (m32, m64):
        m.forward(ids, targets)
        m.backward()
    # float32 rounding through the model: measured 1.2e-8 (loss) and 5.4e-7 of scale (worst gradient)
    assert m32.loss == pytest.approx(m64.loss, rel=1e-6)
    for name in m64.grads:
        scale = np.abs(m64.grads[name]).max()
        assert np.abs(m32.grads[name] - m64.grads[name]).max() <= 1e-5 * scale, name


# -- the params dict is live ----------------------------------------------------------------------------------

def test_params_are_the_live_arrays():
    cfg = small_cfg()
    model = Model(cfg, 3)
    assert all(np.array_equal(model.params[k], v) for k, v in init_params(cfg, 3).items())
    ids, targets = batch(cfg)
    before = model.forward(ids, targets)
    model.params["transformer.ln_f.weight"] *= 2.0                  # in place
    after = model.forward(ids, targets)
    assert after != before
    model.params["transformer.ln_f.weight"] = np.ones(cfg.d_model)   # replaced by a new array of the same shape
    assert model.forward(ids, targets) == before
    model.params["transformer.ln_f.weight"] = np.ones(cfg.d_model + 1)
    with pytest.raises(ValueError, match=r"transformer.ln_f.weight: shape \(9,\), expected \(8,\)"):
        model.forward(ids, targets)


def test_num_params():
    for cfg in (small_cfg(), small_cfg(bias=False, tie_embeddings=False, n_future=3)):
        m = Model(cfg)
        assert m.num_params() == param_count_closed_form(cfg) == sum(v.size for v in m.params.values())


# -- debug mode --------------------------------------------------------------------------------------

def test_debug_names_the_tap_that_turned_nan():
    cfg = small_cfg()
    model = Model(cfg, 0, debug=True)
    model.params["transformer.h.1.mlp.c_fc.weight"][:, 3] = np.nan
    ids, targets = batch(cfg)
    with pytest.raises(DebugCheckError, match=r"tap h\.1\.mlp\.fc contains 12 non-finite values \(first at \(0, 0, 3\)"):
        model.forward(ids, targets)
    model.debug = False
    model.forward(ids, targets)                                    # without debug, the NaN goes through silently
    assert np.isnan(model.loss)


def test_debug_names_a_non_finite_parameter_gradient():
    cfg = small_cfg()
    model = Model(cfg, 0, debug=True)
    ids, targets = batch(cfg)
    model.forward(ids, targets)
    model.grads["transformer.h.0.ln_2.bias"][5] = np.inf          # e.g. a buffer never zeroed
    with pytest.raises(DebugCheckError, match=r"gradient of transformer\.h\.0\.ln_2\.bias contains 1 non-finite"):
        model.backward()


def test_debug_catches_a_parameter_that_gets_no_gradient(monkeypatch):
    import manual.model as mm
    cfg = small_cfg()
    model = Model(cfg, 0, debug=True)
    ids, targets = batch(cfg)
    model.forward(ids, targets)
    monkeypatch.setattr(mm, "embedding_backward", lambda dx, ids, dwte, dwpe: None)   # "forgot" the embedding
    with pytest.raises(DebugCheckError, match=r"transformer\.wpe\.weight is all zero"):
        model.backward()


@pytest.mark.parametrize("debug", [False, True])
def test_backward_before_forward_raises(debug):
    model = Model(small_cfg(), 0, debug=debug)
    with pytest.raises(ValueError, match="before forward"):
        model.backward()


def test_debug_passes_on_a_healthy_model_including_an_idle_head():
    cfg = small_cfg(n_future=3, attention="flash")
    model = Model(cfg, 0, debug=True)
    ids, targets = batch(cfg, T=2, pad=False)                     # T = 2: head 3 has no target at all
    model.forward(ids, targets)
    model.zero_grad()
    model.backward()
    assert not model.grads["mtp.3.weight"].any() and model.grads["mtp.2.weight"].any()


def idle_batch(cfg, B=2, T=6, seed=0):
    """Targets only at position 0 of each row: heads 2..n_future have no target at all."""
    ids, targets = batch(cfg, B=B, T=T, seed=seed, pad=False)
    targets[:, 1:] = cfg.pad_id
    return ids, targets


@pytest.mark.parametrize("kw", [dict(), dict(workspace=True), dict(recompute="blocks"), dict(debug=True)],
                         ids=lambda kw: ",".join(kw) or "plain")
def test_idle_heads_keep_nothing_and_add_nothing(kw):
    """A head without targets: no cache (mtp.j and loss.j rows 0, as manual.memory states), zero tap
    gradients of the registered shapes, zero mtp.j gradients, and every other gradient bit for bit
    that of the same model with n_future = 1 (the idle heads are not part of the loss)."""
    from manual.memory import heads_with_targets
    cfg = small_cfg(n_future=3)
    B, T = 2, 6
    ids, targets = idle_batch(cfg, B, T)
    active = heads_with_targets(cfg, targets)
    assert active == (True, False, False)
    model = perturbed_model(cfg, **kw)
    one = Model.from_params(small_cfg(), {k: v for k, v in model.params.items() if not k.startswith("mtp.")}, **kw)
    loss = model.forward(ids, targets)
    assert loss == one.forward(ids, targets)
    c = model.forward_cache
    assert c.mtp == [None, None] and c.loss[1:] == [None, None] and c.n_valid == [B, 0, 0]
    rows = model.cache_breakdown()
    assert rows == activation_breakdown(cfg, B, T, recompute=model.recompute, active=active)
    assert all(rows[name] == 0 for name in ("mtp.2", "mtp.3", "loss.2", "loss.3"))
    s, C, V = 8, cfg.d_model, cfg.vocab_size
    assert activation_bytes(cfg, B, T, recompute=model.recompute) - model.cache_bytes() \
        == 2 * (s * B * T * C + s * B * T * V + 8 * B * T)
    model.zero_grad()
    one.zero_grad()
    model.backward()
    one.backward()
    shapes = tap_shapes(cfg, B, T)
    for j in (2, 3):
        for name in (f"mtp.{j}.logits", f"mtp.{j}.out"):
            g = model.tap_grads[name]
            assert g.shape == shapes[name] and g.dtype == np.float64 and not g.any(), name
        assert not model.grads[f"mtp.{j}.weight"].any() and not model.grads[f"mtp.{j}.bias"].any()
    for name, g in one.grads.items():
        assert np.array_equal(model.grads[name], g), name
    for name, g in one.tap_grads.items():
        assert np.array_equal(model.tap_grads[name], g), name


def test_idle_heads_memory_closed_forms():
    """The per-head closed forms: activation bytes and the tracemalloc peak (within 10%) with idle heads,
    and `active` checked (one flag per head)."""
    from manual.memory import heads_with_targets, measured_peak_bytes, peak_bytes
    cfg = ModelConfig.preset("tiny", n_future=3)
    B, T = 4, 20
    ids, targets = idle_batch(cfg, B, T)
    active = heads_with_targets(cfg, targets)
    assert active == (True, False, False)
    assert heads_with_targets(cfg, batch(cfg, B, T)[1]) == (True, True, True)
    model = Model(cfg, 0)
    model.forward(ids, targets)
    assert model.cache_bytes() == activation_bytes(cfg, B, T, active=active) < activation_bytes(cfg, B, T)
    got, predicted = measured_peak_bytes(model, ids, targets), peak_bytes(cfg, B, T, active)
    assert abs(got - predicted) <= 0.10 * predicted, f"tracemalloc peak {got} B vs predicted {predicted} B"
    assert predicted < peak_bytes(cfg, B, T)
    with pytest.raises(ValueError, match=r"one flag per prediction head \(n_future = 3\), got 2"):
        activation_bytes(cfg, B, T, active=(True, False))


# -- checkpoints ---------------------------------------------------------------------------------------

def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    cfg = small_cfg(dtype="float32", n_future=2, tie_embeddings=False)
    model = perturbed_model(cfg)
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = Model.load(path)
    assert loaded.cfg == cfg
    assert list(loaded.params) == list(model.params)
    for name, arr in model.params.items():
        assert loaded.params[name].dtype == arr.dtype and np.array_equal(loaded.params[name], arr), name
        assert loaded.params[name].flags.writeable
    ids, targets = batch(cfg)
    assert loaded.forward(ids, targets) == model.forward(ids, targets)
    assert np.array_equal(loaded.logits, model.logits)


def test_loading_a_wrong_checkpoint_lists_every_problem(tmp_path):
    cfg = small_cfg()
    params = dict(Model(cfg).params)
    del params["transformer.h.1.ln_2.bias"]
    params["transformer.h.0.attn.c_proj.weight"] = np.zeros((8, 9))
    params["transformer.wpe.weight"] = params["transformer.wpe.weight"].astype(np.float32)
    params["lm_head.weight"] = np.zeros((11, 8))
    path = tmp_path / "bad.safetensors"
    checkpoint.save_tensors(path, params, checkpoint.model_metadata(cfg))
    with pytest.raises(checkpoint.CheckpointError) as info:
        Model.load(path)
    msg = str(info.value)
    for needle in ("1 missing", "1 unexpected", "2 mismatched", "missing:    transformer.h.1.ln_2.bias (8,)",
                   "transformer.h.0.attn.c_proj.weight: shape (8, 9), expected (8, 8)",
                   "transformer.wpe.weight: dtype float32", "unexpected: lm_head.weight"):
        assert needle in msg, f"{needle!r} not in:\n{msg}"


# -- memory ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,B,T", [
    (dict(), 2, 6),
    (dict(dtype="float32", activation="relu", n_future=3), 3, 5),
    (dict(attention="flash", norm="post", bias=False, tie_embeddings=False), 2, 6),
    (dict(dtype="float32", attention="flash", activation="gelu_tanh", n_future=2, loss="brier"), 1, 4),
])
def test_cache_bytes_equal_the_closed_form(overrides, B, T):
    cfg = small_cfg(**overrides)
    model = Model(cfg, 0, flash_block=4)
    ids, targets = batch(cfg, B=B, T=T)
    model.forward(ids, targets)
    assert model.cache_breakdown() == activation_breakdown(cfg, B, T)
    assert model.cache_bytes() == activation_bytes(cfg, B, T)
    model.forward(ids)
    assert model.cache_bytes() == activation_bytes(cfg, B, T, with_targets=False)


@pytest.mark.parametrize("overrides,names", [
    (dict(), {"embed": ["ids"], "h.0.ln_1": ["xhat", "rstd"], "h.0.attn": ["c_attn.x", "qkv", "probs", "c_proj.x"],
              "h.0.mlp": ["c_fc.x", "f.x", "f.y"], "lm_head": ["x"], "loss.1": ["p", "targets"]}),
    (dict(attention="flash", activation="relu", n_future=2),
     {"h.1.attn": ["c_attn.x", "qkv", "lse", "c_proj.x"], "h.1.mlp": ["c_fc.x", "f.y"], "mtp.2": ["unembed.x"],
      "loss.2": ["p", "targets"]}),
])
def test_cache_tensors_are_named_by_their_cache_fields(overrides, names):
    from manual.memory import cache_tensors
    cfg = small_cfg(**overrides)
    model = Model(cfg, 0, flash_block=4)
    assert cache_tensors(model) == [] and model.forward_cache is None
    ids, targets = batch(cfg)
    model.forward(ids, targets)
    rows = cache_tensors(model)
    for layer, want in names.items():
        assert [r["name"] for r in rows if r["layer"] == layer] == want, layer
    by_layer = {}
    for r in rows:
        by_layer[r["layer"]] = by_layer.get(r["layer"], 0) + r["bytes"]
    assert by_layer == {k: v for k, v in model.cache_breakdown().items() if v}


def test_cache_bytes_closed_form_by_hand():
    """The tiny preset, float32, B=4, T=20, written out (a check of the closed form itself)."""
    cfg = ModelConfig.preset("tiny")                  # V 100, C 64, H 4, F 256, L 3, gelu
    B, T, s = 4, 20, 4
    BT = B * T
    per_layer = s * (2 * (BT * 64 + BT) + 5 * BT * 64 + B * 4 * T * T + BT * 64 + 2 * BT * 256)
    expected = 8 * BT + 3 * per_layer + s * (BT * 64 + BT) + s * BT * 64 + s * BT * 100 + 8 * BT
    assert activation_bytes(cfg, B, T) == expected == 1136320


@pytest.mark.parametrize("overrides,B,T", [
    (dict(), 4, 20),
    (dict(attention="flash", n_future=2, temperature=0.5), 4, 20),
    (dict(norm="post", activation="relu", n_future=3, loss="brier"), 2, 16),
    (dict(dtype="float64", activation="gelu_tanh", tie_embeddings=False, bias=False), 1, 20),
])
def test_peak_bytes_match_tracemalloc_within_10_percent(overrides, B, T):
    from manual.memory import measured_peak_bytes, param_bytes, peak_bytes, peak_bytes_closed_form
    cfg = ModelConfig.preset("tiny", **overrides)
    model = Model(cfg, 0)
    ids, targets = batch(cfg, B=B, T=T)
    got, predicted = measured_peak_bytes(model, ids, targets), peak_bytes(cfg, B, T)
    assert abs(got - predicted) <= 0.10 * predicted, f"tracemalloc peak {got} B vs predicted {predicted} B"
    assert peak_bytes_closed_form(cfg, B, T) == predicted + 2 * param_bytes(cfg)
    assert param_bytes(cfg) == sum(v.nbytes for v in model.params.values())
