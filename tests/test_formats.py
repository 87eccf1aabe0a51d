"""manual/formats.py: the mapping table, every format in both directions, and every malformed file.

The llm.c and nanoGPT files here are also written by hand in the test (from llm.c's and nanoGPT's
documented layouts, not from our table), so the reader is checked against the formats, not only
against our own writer.
"""
import json

import numpy as np
import pytest

from manual import formats
from manual.config import ModelConfig
from manual.formats import FormatError
from manual.registry import init_params, param_specs

# GPT-2-shaped, small: V not a multiple of 128 so llm.c pads it
CFG = ModelConfig(vocab_size=50, max_seq_len=8, d_model=16, n_heads=2, d_ff=64, n_layers=2,
                  activation="gelu_tanh", pad_id=49)
NANO = CFG.replace(activation="gelu")
LLMC_NAMES = ("wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
              "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb")            # llm.c's fill_in_parameter_sizes
LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def params_of(cfg, seed=0):
    """Random parameters with non-trivial biases and layer norms."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in init_params(cfg, seed).items()}


def same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


def hand_written_llmc(params, cfg, Vp, version=3):
    """An llm.c gpt2_*.bin laid out as llm.c's write_model does it, written without our table."""
    L = cfg.n_layers
    header = np.zeros(256, "<i4")
    header[:8] = (20240326, version, cfg.max_seq_len, cfg.vocab_size, L, cfg.n_heads, cfg.d_model, Vp)
    wte = np.zeros((Vp, cfg.d_model), np.float32)
    wte[: cfg.vocab_size] = params["transformer.wte.weight"]
    parts = [wte, params["transformer.wpe.weight"]]
    for suffix in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                   "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                   "mlp.c_proj.weight", "mlp.c_proj.bias"):
        for i in range(L):           # nn.Linear (out, in): the Conv1D weights transposed
            w = params[f"transformer.h.{i}.{suffix}"]
            parts.append(w.T if suffix in LINEAR else w)
    parts += [params["transformer.ln_f.weight"], params["transformer.ln_f.bias"]]
    body = b"".join(np.ascontiguousarray(p, "<f4").tobytes() for p in parts)
    if version == 5:                 # bfloat16: the top 16 bits (our values are exact in bf16 here)
        body = (np.frombuffer(body, "<u4") >> 16).astype("<u2").tobytes()
    return header.tobytes() + body


# -- the table -------------------------------------------------------------------------------------

def test_table_covers_every_canonical_tensor_and_reads_on_one_line():
    for cfg in (CFG, CFG.replace(tie_embeddings=False)):
        for spec in param_specs(cfg):
            assert formats.place(spec.name, "hf") is not None
            assert formats.place(spec.name, "nanogpt") is not None
    assert formats.place("lm_head.weight", "llmc") is None
    assert formats.LLMC_ORDER == LLMC_NAMES
    assert formats.TRANSPOSED["hf"] == ()
    assert formats.TRANSPOSED["nanogpt"] == tuple(f"transformer.h.{{i}}.{s}" for s in LINEAR)
    assert formats.describe("transformer.h.3.attn.c_attn.weight") == {
        "hf": "transformer.h.3.attn.c_attn.weight",
        "nanogpt": "transformer.h.3.attn.c_attn.weight (transposed)",
        "llmc": "qkvw[3] (transposed, stacked over layers)"}
    assert formats.describe("transformer.wte.weight")["llmc"] == "wte (rows padded V -> Vp)"
    with pytest.raises(FormatError, match="unknown format 'onnx'"):
        formats.place("transformer.wte.weight", "onnx")


def test_llmc_shapes_of_gpt2_small_match_llm_c():
    cfg = ModelConfig.preset("gpt2-small")
    Vp = formats.llmc_padded_vocab(cfg.vocab_size)
    shapes = formats.llmc_shapes(cfg, Vp)
    assert Vp == 50304
    assert list(shapes) == list(LLMC_NAMES)
    assert shapes["wte"] == (50304, 768) and shapes["wpe"] == (1024, 768)
    assert shapes["qkvw"] == (12, 2304, 768) and shapes["fcw"] == (12, 3072, 768) and shapes["fcprojw"] == (12, 768, 3072)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_475_904   # llm.c prints num_parameters: 124475904


def test_to_layout_places_every_tensor_where_the_table_says():
    p = params_of(CFG)
    nano = formats.to_layout(p, NANO, "nanogpt")
    assert np.array_equal(nano["transformer.h.1.attn.c_attn.weight"], p["transformer.h.1.attn.c_attn.weight"].T)
    assert np.array_equal(nano["lm_head.weight"], p["transformer.wte.weight"])        # tied: both keys
    ll = formats.to_layout(p, CFG, "llmc")
    assert ll["wte"].shape == (128, 16) and not ll["wte"][50:].any()
    assert np.array_equal(ll["qkvw"][1], p["transformer.h.1.attn.c_attn.weight"].T)
    assert np.array_equal(ll["fcprojb"][0], p["transformer.h.0.mlp.c_proj.bias"])


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", [{}, dict(tie_embeddings=False), dict(activation="relu", d_ff=24),
                                     dict(activation="gelu", ln_eps=1e-6)])
def test_hf_round_trips_both_ways(tmp_path, dtype, variant):
    cfg = CFG.replace(dtype=dtype, **variant)
    p = params_of(cfg)
    formats.write_hf(tmp_path / "a", cfg, p)
    cfg2, p2, notes = formats.read_hf(tmp_path / "a", dtype=dtype)
    assert cfg2 == cfg and notes == []
    same(p, p2)
    formats.write_hf(tmp_path / "b", cfg2, p2)                            # X -> ours -> X
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_round_trips_both_ways(tmp_path, dtype, bias):
    cfg = NANO.replace(dtype=dtype, bias=bias)
    p = params_of(cfg)
    formats.write_nanogpt(tmp_path / "a.safetensors", cfg, p)
    cfg2, p2, _ = formats.read_nanogpt(tmp_path / "a.safetensors", dtype=dtype)
    assert cfg2 == cfg
    same(p, p2)
    formats.write_nanogpt(tmp_path / "b.safetensors", cfg2, p2)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_llmc_round_trips_both_ways_and_matches_llm_c_layout(tmp_path):
    p = params_of(CFG)
    formats.write_llmc(tmp_path / "a.bin", CFG, p)
    assert (tmp_path / "a.bin").read_bytes() == hand_written_llmc(p, CFG, Vp=128)     # llm.c's layout, byte for byte
    cfg2, p2, notes = formats.read_llmc(tmp_path / "a.bin")
    assert cfg2 == CFG and notes == []
    same(p, p2)
    formats.write_llmc(tmp_path / "b.bin", cfg2, p2)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    cfg64, p64, notes = formats.read_llmc(tmp_path / "a.bin", dtype="float64")       # exact widening, reported
    assert cfg64.dtype == "float64" and all(np.array_equal(p64[k], p[k].astype(np.float64)) for k in p)
    assert any("widened exactly to float64" in n for n in notes)


def test_llmc_reader_takes_a_file_with_another_vp(tmp_path):
    p = params_of(CFG)
    (tmp_path / "v.bin").write_bytes(hand_written_llmc(p, CFG, Vp=64))
    cfg, p2, _ = formats.read_llmc(tmp_path / "v.bin")
    same(p, p2)


def test_llmc_bfloat16_is_widened_exactly_and_said(tmp_path):
    rng = np.random.default_rng(0)
    p = {k: (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)    # values exact in bfloat16
         for k, v in params_of(CFG).items()}
    (tmp_path / "b.bin").write_bytes(hand_written_llmc(p, CFG, Vp=128, version=5))
    cfg, p2, notes = formats.read_llmc(tmp_path / "b.bin")
    same(p, p2)
    assert notes == [f"{tmp_path / 'b.bin'}: version 5 holds bfloat16; widened exactly to float32"]
    formats.write_llmc(tmp_path / "c.bin", cfg, p2, dtype="bfloat16")         # bf16 -> f32 -> bf16: identical
    assert (tmp_path / "c.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    x = rng.normal(size=1000).astype(np.float32)
    bits = formats._f32_to_bf16(x)
    back = formats._bf16_to_f32(bits)
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8)                  # nearest: half an ulp (2^-7)
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)              # exactly halfway: to even
    assert list(formats._bf16_to_f32(formats._f32_to_bf16(ties))) == [1.0, 1 + 2 ** -6]


def test_llmc_nonzero_padding_is_reported(tmp_path):
    data = bytearray(hand_written_llmc(params_of(CFG), CFG, Vp=128))
    row = 1024 + 4 * 16 * 60                                                  # wte row 60 >= V
    data[row: row + 4] = np.float32(3.0).tobytes()
    (tmp_path / "p.bin").write_bytes(bytes(data))
    _, _, notes = formats.read_llmc(tmp_path / "p.bin")
    assert any("78 padded rows of wte are not zero (max |x| 3)" in n for n in notes)


# -- nanoGPT and HF file facts ---------------------------------------------------------------------------

def nano_file(path, tensors, args=None):
    from safetensors.numpy import save_file
    args = args if args is not None else dict(n_layer=2, n_head=2, n_embd=16, block_size=8, bias=True,
                                               vocab_size=50, dropout=0.0)
    save_file(tensors, str(path), metadata={"model_args": json.dumps(args)} if args else None)


def test_nanogpt_prefixes_and_mask_buffers_are_stripped(tmp_path):
    p = params_of(NANO)
    sd = formats.to_layout(p, NANO, "nanogpt")
    sd = {("module._orig_mod." if i % 2 else "_orig_mod.") + k: np.array(v) for i, (k, v) in enumerate(sd.items())}
    sd["_orig_mod.transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    nano_file(tmp_path / "n.safetensors", sd)
    cfg, p2, _ = formats.read_nanogpt(tmp_path / "n.safetensors")
    assert cfg == NANO
    same(p, p2)


def test_nanogpt_key_problems_are_listed_together(tmp_path):
    sd = {k: np.array(v) for k, v in formats.to_layout(params_of(NANO), NANO, "nanogpt").items()}
    del sd["transformer.h.1.ln_2.bias"]
    sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"].T.copy()   # not transposed
    sd["transformer.h.0.attn.rotary"] = np.zeros(3, np.float32)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    nano_file(tmp_path / "n.safetensors", sd)
    with pytest.raises(FormatError) as err:
        formats.read_nanogpt(tmp_path / "n.safetensors")
    msg = str(err.value)
    assert "(4 problem(s))" in msg and "\n" not in msg
    assert "missing transformer.h.1.ln_2.bias" in msg
    assert "transformer.h.0.mlp.c_fc.weight has shape (16, 64), expected (64, 16)" in msg
    assert "unexpected transformer.h.0.attn.rotary (3,)" in msg
    assert "lm_head.weight differs from transformer.wte.weight" in msg


def test_nanogpt_needs_model_args(tmp_path):
    nano_file(tmp_path / "n.safetensors", {"transformer.wte.weight": np.zeros((50, 16), np.float32)}, args={})
    with pytest.raises(FormatError, match="metadata field 'model_args' missing"):
        formats.read_nanogpt(tmp_path / "n.safetensors")
    nano_file(tmp_path / "m.safetensors", {"x": np.zeros(1, np.float32)}, args=dict(n_layer=2))
    with pytest.raises(FormatError, match=r"model_args lacks \['n_head'"):
        formats.read_nanogpt(tmp_path / "m.safetensors")


def hf_folder(path, tensors, conf):
    from safetensors.numpy import save_file
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(conf))


HF_CONF = dict(model_type="gpt2", vocab_size=50, n_positions=8, n_embd=16, n_layer=2, n_head=2, n_inner=None,
               activation_function="gelu_new", layer_norm_epsilon=1e-5, eos_token_id=49)


def test_hf_folder_saved_from_gpt2model_without_prefix_and_with_buffers(tmp_path):
    p = params_of(CFG)
    tensors = {k[len("transformer."):]: v for k, v in p.items()}               # GPT2Model's keys
    tensors["h.0.attn.bias"] = np.ones((1, 1, 8, 8), np.float32)
    tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    hf_folder(tmp_path / "g", tensors, HF_CONF)
    cfg, p2, _ = formats.read_hf(tmp_path / "g")
    assert cfg == CFG                                                          # pad_id = eos_token_id
    same(p, p2)


def test_hf_half_precision_is_widened_and_said(tmp_path):
    p = {k: v.astype(np.float16) for k, v in params_of(CFG).items()}
    hf_folder(tmp_path / "h", p, HF_CONF)
    _, p2, notes = formats.read_hf(tmp_path / "h")
    assert all(np.array_equal(p2[k], p[k].astype(np.float32)) for k in p)
    assert notes == [f"{tmp_path / 'h' / 'model.safetensors'}: float16 widened exactly to float32"]


@pytest.mark.parametrize("change, message", [
    (dict(activation_function="silu"), "field activation_function is 'silu', expected one of"),
    (dict(scale_attn_by_inverse_layer_idx=True), "field scale_attn_by_inverse_layer_idx is True, expected False"),
    (dict(model_type="llama"), "field model_type is 'llama', expected 'gpt2'"),
    (dict(n_head=3), "d_model 16 is not divisible by n_heads 3"),
    (dict(n_embd=None), "field(s) ['n_embd'] missing"),
])
def test_hf_configs_we_cannot_compute_are_refused(tmp_path, change, message):
    conf = {k: v for k, v in {**HF_CONF, **change}.items() if v is not None or k == "n_inner"}
    hf_folder(tmp_path / "c", {}, conf)
    with pytest.raises(FormatError) as err:
        formats.read_hf(tmp_path / "c")
    assert message in str(err.value) and "config.json" in str(err.value)


# -- refusals: configs a format cannot hold -------------------------------------------------------------

@pytest.mark.parametrize("fmt, change, text", [
    ("llmc", dict(norm="post"), "norm = 'post'"),
    ("llmc", dict(d_ff=32), "d_ff = 32 (llm.c's MLP is 4 * d_model = 64 wide)"),
    ("llmc", dict(tie_embeddings=False), "tie_embeddings = False"),
    ("llmc", dict(bias=False), "bias = False"),
    ("llmc", dict(activation="gelu"), "activation = 'gelu'"),
    ("llmc", dict(ln_eps=1e-6), "ln_eps = 1e-06"),
    ("llmc", dict(n_future=2), "n_future = 2"),
    ("hf", dict(n_future=3), "n_future = 3"),
    ("hf", dict(norm="post"), "norm = 'post'"),
    ("hf", dict(bias=False), "bias = False"),
    ("nanogpt", dict(n_future=2), "n_future = 2"),
    ("nanogpt", dict(norm="post"), "norm = 'post'"),
    ("nanogpt", dict(activation="gelu_tanh"), "activation = 'gelu_tanh'"),
    ("nanogpt", dict(tie_embeddings=False), "tie_embeddings = False"),
    ("nanogpt", dict(d_ff=32), "d_ff = 32"),
])
def test_a_config_the_format_cannot_hold_is_refused(tmp_path, fmt, change, text):
    base = NANO if fmt == "nanogpt" else CFG
    cfg = base.replace(**change)
    with pytest.raises(FormatError) as err:
        formats.WRITERS[fmt](tmp_path / "out", cfg, params_of(cfg))
    assert f"the {fmt} format cannot hold this config" in str(err.value) and text in str(err.value)
    assert not (tmp_path / "out").exists()


# -- malformed llm.c files --------------------------------------------------------------------------------

def llmc_bytes():
    return hand_written_llmc(params_of(CFG), CFG, Vp=128)


@pytest.mark.parametrize("edit, message", [
    (lambda b: np.int32(7).tobytes() + b[4:], "offset 0 (magic): found 7, expected 20240326"),
    (lambda b: b[:4] + np.int32(4).tobytes() + b[8:], "offset 4 (version): found 4, expected 3 or 5"),
    (lambda b: b[:100], "truncated: 100 bytes, the llm.c gpt2_*.bin header alone needs 1024"),
    (lambda b: b[:-4], "truncated: file has 36092 bytes, expected 36096"),
    (lambda b: b + b"\0" * 8, "size mismatch: file has 36104 bytes, expected 36096"),
    (lambda b: b[:28] + np.int32(40).tobytes() + b[32:], "offset 28 (Vp): found 40, expected >= 50"),
    (lambda b: b[:20] + np.int32(3).tobytes() + b[24:], "header: invalid ModelConfig: d_model 16 is not divisible"),
])
def test_malformed_llmc_files_are_named(tmp_path, edit, message):
    (tmp_path / "bad.bin").write_bytes(edit(llmc_bytes()))
    with pytest.raises(FormatError) as err:
        formats.read_llmc(tmp_path / "bad.bin")
    assert str(err.value).startswith(f"{tmp_path / 'bad.bin'}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FormatError, match="no such llm.c model file"):
        formats.read_llmc(tmp_path / "none.bin")
    with pytest.raises(FormatError, match="no such directory"):
        formats.read_hf(tmp_path / "none")
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        (tmp_path / "junk.safetensors").write_bytes(b"\x05junk")
        formats.read_nanogpt(tmp_path / "junk.safetensors")


# -- the llm.c debug state and gradient layouts ---------------------------------------------------------------

def state_parts(seed=0, B=2, T=5):
    rng = np.random.default_rng(seed)
    grads = params_of(CFG, seed + 1)
    x = rng.integers(0, 50, (B, T)).astype(np.int32)
    y = rng.integers(0, 49, (B, T)).astype(np.int32)
    logits = rng.normal(size=(B, T, 50)).astype(np.float32)
    return x, y, logits, np.float32(3.25), grads


def test_llmc_state_round_trip_and_layout(tmp_path):
    x, y, logits, loss, grads = state_parts()
    formats.write_llmc_state(tmp_path / "s.bin", CFG, x, y, logits, loss, grads)
    data = (tmp_path / "s.bin").read_bytes()
    header = np.frombuffer(data[:1024], "<i4")
    assert list(header[:4]) == [20240327, 2, 2, 5] and not header[4:].any()
    at = 1024 + 4 * 10 + 4 * 10                                           # logits follow x and y, unpadded
    assert np.array_equal(np.frombuffer(data, "<f4", 500, at), logits.reshape(-1))
    state = formats.read_llmc_state(tmp_path / "s.bin", CFG)
    assert state.Vp == 128 and state.loss == 3.25
    assert np.array_equal(state.x, x) and np.array_equal(state.y, y) and np.array_equal(state.logits, logits)
    same(grads, state.grads)
    formats.write_llmc_state(tmp_path / "v.bin", CFG, x, y, logits, loss, grads, Vp=64)   # Vp found from the size
    assert formats.read_llmc_state(tmp_path / "v.bin", CFG).Vp == 64


@pytest.mark.parametrize("edit, message", [
    (lambda b: np.int32(20240326).tobytes() + b[4:], "offset 0 (magic): found 20240326, expected 20240327"),
    (lambda b: b[:4] + np.int32(1).tobytes() + b[8:], "offset 4 (version): found 1, expected 2"),
    (lambda b: b[:12] + np.int32(9).tobytes() + b[16:], "offset 12 (T): found 9, expected <= max_seq_len 8"),
    (lambda b: b[:-2], "truncated"),
])
def test_malformed_states_are_named(tmp_path, edit, message):
    x, y, logits, loss, grads = state_parts()
    formats.write_llmc_state(tmp_path / "s.bin", CFG, x, y, logits, loss, grads)
    (tmp_path / "s.bin").write_bytes(edit((tmp_path / "s.bin").read_bytes()))
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        formats.read_llmc_state(tmp_path / "s.bin", CFG)


@pytest.mark.parametrize("fmt", ["nanogpt", "llmc", "hf"])
def test_one_wrong_gradient_in_a_layout_lands_on_its_canonical_name(fmt):
    cfg = NANO if fmt == "nanogpt" else CFG
    grads = params_of(cfg, 5)
    layout = {k: np.array(v) for k, v in formats.to_layout(grads, cfg, fmt).items()}
    key = {"nanogpt": "transformer.h.1.attn.c_attn.weight", "hf": "transformer.h.1.attn.c_attn.weight",
           "llmc": "qkvw"}[fmt]
    if fmt == "llmc":
        layout[key][1, 7, 3] += 1.0          # qkvw[1] is (3C, C): row 7 = output feature 7 (a query), input 3
    else:
        layout[key][(7, 3) if fmt == "nanogpt" else (3, 7)] += 1.0
    back = formats.grads_from_layout(layout, fmt, cfg)
    wrong = [k for k in grads if not np.array_equal(back[k], grads[k])]
    assert wrong == ["transformer.h.1.attn.c_attn.weight"]
    diff = np.argwhere(back[wrong[0]] != grads[wrong[0]])
    assert diff.tolist() == [[3, 7]]         # canonical [in, out]


def test_the_docs_table_says_what_the_code_says():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "interop.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[0].split("`")[1] in formats.TABLE:
            rows[cells[0].split("`")[1]] = cells[1:]
    assert list(rows) == list(formats.TABLE)
    for name, cells in rows.items():
        d = formats.describe(name)
        assert cells == [d[f].replace(name, "same") for f in formats.FORMATS], name
