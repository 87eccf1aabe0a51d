"""python -m tools.layerdiff reads other layouts: --against DUMP --layout nanogpt|llmc (parameter gradients
in nanoGPT's or llm.c's layout, mapped by manual/formats.py's table) and --against STATE.bin (llm.c's debug
state: logits, loss and every parameter gradient on the state's own batch). Each layout: a correct file
agrees, one planted wrong gradient is named at its tensor and layer with the dump blamed, and a file that
does not fit is one line with exit status 2."""
import contextlib
import io
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import manual
from manual import formats
from manual.checkpoint import load_model, save_model
from test_layerdiff import cli      # `python -m tools.layerdiff ARGS` in this process: exit status and output
from tools import convert
from tools.layerdiff.walk import tensors_of

# nanoGPT computes exact GELU, llm.c the tanh one: each layout gets a case its model computes
CASE_FLAGS = {"nanogpt": ["--activation", "gelu"], "llmc": ["--activation", "gelu_tanh"]}
PREFIX = {"nanogpt": "module._orig_mod.", "llmc": ""}   # DDP around torch.compile: both stripped


def one_line_exit_2(p, *needles):
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for fmt, flags in CASE_FLAGS.items():
        p = cli("--export-case", root / fmt, "--batch", 2, "--seq-len", 6, *flags)
        assert p.returncode == 0, p.stderr
        out[fmt] = root / fmt
    p = cli("--export-case", root / "state", "--batch", 2, "--seq-len", 6, "--no-pad", *CASE_FLAGS["llmc"])
    assert p.returncode == 0, p.stderr
    out["state"] = root / "state"
    return out


def port_tensors(case) -> tuple[manual.Model, dict]:
    """A stand-in for a port: every tensor of one forward + backward on the case, our layout."""
    m = manual.Model.load(case / "checkpoint.safetensors")
    m.forward(np.load(case / "ids.npy"), np.load(case / "targets.npy"))
    m.backward()
    return m, {k: np.ascontiguousarray(v) for k, v in tensors_of(m).items()}    # safetensors writes raw buffers


def layout_dump(case, fmt, path, bug=None):
    """The port's dump with its parameter gradients in `fmt`'s layout (formats.to_layout, the table).
    bug = (format key, layer or None, "transpose" | factor): one gradient wrong, in the dump's layout."""
    m, d = port_tensors(case)
    d = {k: v for k, v in d.items() if k[len("grad."):] not in m.grads}
    grads = {k: np.array(v) for k, v in formats.to_layout(m.grads, m.cfg, fmt).items()}
    if bug is not None:
        key, layer, how = bug
        g = grads[key] if layer is None else grads[key][layer]
        g[...] = g.T if how == "transpose" else g * how
    d.update({f"grad.{PREFIX[fmt]}{k}": np.ascontiguousarray(v) for k, v in grads.items()})
    save_file(d, str(path))
    return path


# -- --layout nanogpt | llmc ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["nanogpt", "llmc"])
def test_a_correct_dump_in_each_layout_agrees(cases, tmp_path, fmt):
    dump = layout_dump(cases[fmt], fmt, tmp_path / "ok.safetensors")
    p = cli("--case", cases[fmt], "--against", dump, "--layout", fmt, "--diff-only")
    assert p.returncode == 0, p.stdout + p.stderr
    n = len(formats.layout_shapes(manual.Model.load(cases[fmt] / "checkpoint.safetensors").cfg, fmt)) + (
        fmt == "nanogpt")                            # nanoGPT's state dict holds the tied lm_head.weight too
    assert f"{n} parameter gradient(s) read in the {fmt} layout" in p.stdout
    assert "all 131 tensors agree" in p.stdout


@pytest.mark.parametrize("fmt, bug, tensor, in_dump", [
    # nn.Linear's gradient left in [in, out] (square, so the shape does not give it away)
    ("nanogpt", ("transformer.h.1.attn.c_proj.weight", None, "transpose"),
     "grad.transformer.h.1.attn.c_proj.weight", "grad.transformer.h.1.attn.c_proj.weight (transposed), element"),
    ("nanogpt", ("transformer.h.0.mlp.c_fc.weight", None, 1.001),
     "grad.transformer.h.0.mlp.c_fc.weight", "grad.transformer.h.0.mlp.c_fc.weight (transposed), element"),
    ("llmc", ("attprojw", 2, "transpose"),
     "grad.transformer.h.2.attn.c_proj.weight", "grad.attprojw[2] (transposed, stacked over layers), element"),
    ("llmc", ("fcw", 1, 1.5),
     "grad.transformer.h.1.mlp.c_fc.weight", "grad.fcw[1] (transposed, stacked over layers), element"),
])
def test_one_wrong_gradient_in_each_layout_is_named(cases, tmp_path, fmt, bug, tensor, in_dump):
    dump = layout_dump(cases[fmt], fmt, tmp_path / "bad.safetensors", bug)
    js = tmp_path / "r.json"
    p = cli("--case", cases[fmt], "--against", dump, "--layout", fmt, "--diff-only", "--json", js)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 tensor(s) differ" in p.stdout and f"First divergent tensor: {tensor}" in p.stdout
    layer = ".".join(tensor.split(".")[2:5])         # h.1.attn
    assert f"written by: {layer} " in p.stdout and "wrong side: dump" in p.stdout
    assert f"in the dump's {fmt} layout: {in_dump}" in p.stdout
    first = json.loads(js.read_text())["first_divergent"]
    assert first["tensor"] == tensor
    layer_of, worst = bug[1], first["worst_index"]                            # [in, out] here, [out, in] there
    assert first["note"] == f"in the dump's {fmt} layout: {in_dump} " \
                            f"{([layer_of] if layer_of is not None else []) + worst[::-1]}"
    assert json.loads(js.read_text())["blame"]["verdict"] == "dump"


def test_a_dump_in_the_wrong_layout_is_one_line_with_the_right_flag(cases, tmp_path):
    llmc = layout_dump(cases["llmc"], "llmc", tmp_path / "llmc.safetensors")
    nano = layout_dump(cases["nanogpt"], "nanogpt", tmp_path / "nano.safetensors")
    ours = tmp_path / "ours.safetensors"
    save_file(port_tensors(cases["nanogpt"])[1], str(ours))
    one_line_exit_2(cli("--case", cases["llmc"], "--against", llmc), "unknown key(s) (16): grad.attprojb",
                    "add --layout llmc")
    one_line_exit_2(cli("--case", cases["nanogpt"], "--against", nano), "add --layout nanogpt")
    one_line_exit_2(cli("--case", cases["nanogpt"], "--against", ours, "--layout", "nanogpt"),
                    "transformer.h.0.attn.c_attn.weight has shape (64, 192), expected (192, 64)", "drop --layout")
    one_line_exit_2(cli("--case", cases["nanogpt"], "--against", nano, "--layout", "llmc"),
                    "the llmc format cannot hold this config: activation = 'gelu'")
    ours_llmc = tmp_path / "ours_llmc.safetensors"       # our names where llm.c's are expected
    d = port_tensors(cases["llmc"])[1]
    save_file(d, str(ours_llmc))
    one_line_exit_2(cli("--case", cases["llmc"], "--against", ours_llmc, "--layout", "llmc"),
                    "grad.transformer.wte.weight is our name; in the llmc layout it is grad.wte (rows padded V -> Vp)")


def test_bad_layout_name_is_one_line(cases):
    one_line_exit_2(cli("--case", cases["llmc"], "--against", cases["llmc"] / "ids.npy", "--layout", "jax"),
                    "--layout 'jax': unknown layout; expected one of ours, nanogpt, llmc")
    one_line_exit_2(cli("--layout", "llmc"), "give the dump with --against")


# -- --against STATE.bin (llm.c's debug state) ---------------------------------------------------------

def write_state(case, out, checkpoint=None):
    """tools/convert.py --to llmc-state on the case's batch (`checkpoint`: another one, same weights)."""
    with contextlib.redirect_stdout(io.StringIO()):
        rc = convert.main(["--to", "llmc-state", "--checkpoint", str(checkpoint or case / "checkpoint.safetensors"),
                           "--ids", str(case / "ids.npy"), "--targets", str(case / "targets.npy"), "--out", str(out)])
    assert rc == 0
    return out


def test_a_correct_llmc_state_agrees(cases, tmp_path):
    state = write_state(cases["state"], tmp_path / "gpt2_debug_state.bin")
    p = cli("--case", cases["state"], "--against", state)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "llm.c debug state, B 2, T 6, Vp 128: compared on its own x and y" in p.stdout
    assert "all 42 tensors agree" in p.stdout              # logits, loss, 40 parameter gradients
    for row in ("logits", "loss", "grad.transformer.wte.weight", "grad.transformer.h.2.mlp.c_fc.weight"):
        assert f" {row} " in p.stdout


def test_a_corrupted_gradient_in_an_llmc_state_is_named(cases, tmp_path):
    state = write_state(cases["state"], tmp_path / "state.dat")     # found by its magic, whatever the suffix
    cfg = load_model(cases["state"] / "checkpoint.safetensors")[0]
    B, T = np.load(cases["state"] / "ids.npy").shape
    data = bytearray(state.read_bytes())
    at = 1024 + 8 * B * T + 4 * B * T * cfg.vocab_size + 4           # header, x, y, logits, loss
    shapes = formats.llmc_shapes(cfg, formats.llmc_padded_vocab(cfg.vocab_size))
    for key in formats.LLMC_ORDER[:formats.LLMC_ORDER.index("fcw")]:
        at += 4 * int(np.prod(shapes[key]))
    layer = int(np.prod(shapes["fcw"][1:]))
    fcw1 = np.frombuffer(data, "<f4", layer, at + 4 * layer)       # fcw[1]: llm.c's (4C, C) slice of layer 1
    data[at + 4 * layer: at + 8 * layer] = (fcw1 * np.float32(1.25)).astype("<f4").tobytes()
    state.write_bytes(bytes(data))
    js = tmp_path / "r.json"
    p = cli("--case", cases["state"], "--against", state, "--json", js)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 tensor(s) differ. First divergent tensor: grad.transformer.h.1.mlp.c_fc.weight" in p.stdout
    assert "written by: h.1.mlp " in p.stdout and "wrong side: dump" in p.stdout
    assert "in the dump's llmc layout: grad.fcw[1] (transposed, stacked over layers)" in p.stdout
    rep = json.loads(js.read_text())
    assert "in the dump's llmc layout: grad.fcw[1]" in rep["first_divergent"]["note"]
    assert rep["blame"]["verdict"] == "dump"


def test_an_llmc_state_whose_targets_hold_pad_counts_every_target(cases, tmp_path):
    case = cases["llmc"]                                  # its targets end in PAD (pad_id 0)
    cfg, params, _, _ = load_model(case / "checkpoint.safetensors")
    targets = np.load(case / "targets.npy")
    assert (targets == cfg.pad_id).any()
    free = int(np.setdiff1d(np.arange(cfg.vocab_size), targets)[0])
    counting = tmp_path / "counting.safetensors"          # the same weights, a pad_id absent from the targets:
    save_model(counting, cfg.replace(pad_id=free), params)   # every target counts, as in llm.c
    state = write_state(case, tmp_path / "state.bin", counting)
    p = cli("--case", case, "--against", state, "--diff-only")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (f"PAD: y holds pad_id {cfg.pad_id} at {int((targets == cfg.pad_id).sum())} position(s). llm.c counts "
            f"every target, ours ignores PAD; the reference runs with pad_id = {free}") in p.stdout
    assert "all 42 tensors agree" in p.stdout


def test_a_state_that_does_not_fit_is_one_line(cases, tmp_path):
    state = write_state(cases["state"], tmp_path / "state.bin")
    small = tmp_path / "small.safetensors"               # the state's T = 6 > this model's max_seq_len 4
    cfg, params, _, _ = load_model(cases["state"] / "checkpoint.safetensors")
    save_model(small, cfg.replace(max_seq_len=4), {**params, "transformer.wpe.weight": params["transformer.wpe.weight"][:4]})
    one_line_exit_2(cli("--checkpoint", small, "--against", state), "offset 12 (T): found 6, expected <= max_seq_len 4")
    other = tmp_path / "other.safetensors"               # another width: the sizes do not add up
    manual.Model(cfg.replace(d_model=32, d_ff=128), seed=1).save(other)
    one_line_exit_2(cli("--checkpoint", other, "--against", state), "Vp = ", "written for another config")
    cut = tmp_path / "cut.bin"                             # a state cut short: no Vp makes the sizes add up
    cut.write_bytes(state.read_bytes()[:-6])
    size = state.stat().st_size
    one_line_exit_2(cli("--case", cases["state"], "--against", cut), f"truncated: file has {size - 6} bytes, expected {size}")
    one_line_exit_2(cli("--case", cases["nanogpt"], "--against", state), "activation = 'gelu'")
    one_line_exit_2(cli("--case", cases["state"], "--against", state, "--layout", "nanogpt"),
                    "is an llm.c debug state, in llm.c's layout")
    model_file = tmp_path / "gpt2_tiny.bin"
    formats.write_llmc(model_file, cfg, params)
    one_line_exit_2(cli("--case", cases["state"], "--against", model_file), "magic 20240326 is llm.c's model file")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x07\x00\x00\x00" + bytes(100))
    one_line_exit_2(cli("--case", cases["state"], "--against", junk), "offset 0 (magic): found 7, expected 20240327")


def test_llmc_padded_vocabulary_rows_are_not_compared_but_reported(cases, tmp_path):
    m, d = port_tensors(cases["llmc"])
    d = {k: v for k, v in d.items() if k[len("grad."):] not in m.grads}
    grads = formats.to_layout(m.grads, m.cfg, "llmc")
    grads["wte"][m.cfg.vocab_size:] = 0.5                   # a port that leaves junk in the padded rows
    d.update({f"grad.{k}": np.ascontiguousarray(v) for k, v in grads.items()})
    save_file(d, str(tmp_path / "pad.safetensors"))
    p = cli("--case", cases["llmc"], "--against", tmp_path / "pad.safetensors", "--layout", "llmc", "--diff-only")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "grad.wte's 28 padded rows are not zero (max |x| 0.5)" in p.stdout
