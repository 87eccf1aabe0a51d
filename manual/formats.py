"""Outside weight formats: Hugging Face GPT-2, nanoGPT and llm.c, in and out (NumPy + safetensors only).

One table, TABLE below, says for every canonical tensor (manual/registry.py) where it lives in
each format; the readers, the writers, tools/convert.py, the debugger's `--layout` and the tests
all read it and nothing else. For example `transformer.h.3.attn.c_attn.weight` (C, 3C) is

    hf        transformer.h.3.attn.c_attn.weight           (C, 3C)  as is (Conv1D is [in, out])
    nanogpt   transformer.h.3.attn.c_attn.weight           (3C, C)  transposed (nn.Linear is [out, in])
    llmc      qkvw[3]  of qkvw (L, 3C, C)                   (3C, C)  transposed, slice 3 of a stacked tensor

Facts honoured (each checked against the format's own code, not copied from it):
  hf       model.safetensors + config.json. Keys may lack the `transformer.` prefix (files saved
           from GPT2Model). `.attn.bias` / `.attn.masked_bias` buffers are ignored. lm_head.weight
           is tied unless config.json says tie_word_embeddings: false. activation_function
           gelu_new / gelu_pytorch_tanh = gelu_tanh, gelu = exact gelu, relu; n_inner null = 4C.
           No post-LN and no bias-free variant exist in GPT2LMHeadModel.
  nanogpt  a state dict saved as safetensors, with nanoGPT's `model_args` (JSON) in the metadata:
           n_head cannot be read from shapes. Prefixes `_orig_mod.` (torch.compile) and
           `module.` (DDP) are stripped; `.attn.bias` mask buffers are ignored. nn.Linear is
           [out, in]: c_attn, attn.c_proj, c_fc, mlp.c_proj weights are transposed (TRANSPOSED).
           nanoGPT always ties lm_head to wte (the state dict holds both keys, equal), its MLP is
           4C wide with nn.GELU() (exact erf) and its LayerNorm eps is 1e-5; `bias` is optional.
  llmc     gpt2_*.bin: 256 int32 header (magic 20240326, version 3 = float32 / 5 = bfloat16,
           maxT, V, L, NH, C, Vp), then the 16 stacked tensors in LLMC_ORDER, float32 or
           bfloat16, weights (out, in), wte padded to Vp rows (zeros). Always pre-LN, biases,
           tied, 4C, GELU tanh, LayerNorm eps 1e-5. bfloat16 is widened to float32 exactly
           (bits << 16), and the reader says so.
  llmc state  gpt2_*_debug_state.bin: 256 int32 header (magic 20240327, version 2, B, T), x and y
           (B*T int32), logits (B*T*V float32, unpadded), the loss (float32), then every
           parameter gradient in LLMC_ORDER with wte's rows padded to Vp (float32). llm.c's loss
           is the mean over every target: a state is written only for targets without PAD.

Config fields an outside format has no place for (dtype, pad_id, attention, loss, temperature)
get defaults on reading: dtype from the caller, pad_id = the format's end-of-text id if it names
one (hf: pad_token_id, else eos_token_id) else V - 1 (GPT-2's <|endoftext|> is the last id).
Fields that change what the model computes and that a format cannot hold are refused on writing
(`check_can_hold`), with the field and the value in the message.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import check_params, save_tensors, write_atomic
from .config import ModelConfig
from .registry import param_shapes, param_specs

FORMATS = ("hf", "nanogpt", "llmc")


class FormatError(ValueError):
    """A file that is not what its format says, or a config the format cannot hold (one line)."""


# -- the mapping table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Place:
    """Where one canonical tensor lives in one format."""
    key: str = ""             # the format's name; "" = the canonical name itself ({i} = layer index)
    transpose: bool = False   # stored as the transpose of the canonical [in, out] matrix
    stacked: bool = False     # llmc: slice [i] of one tensor stacked over the L layers
    pad_vocab: bool = False   # llmc: rows padded from V to Vp with zeros


SAME, SAME_T = Place(), Place(transpose=True)


# canonical name ({i} = layer)              hf      nanogpt   llmc (stacked over layers where {i})
TABLE: dict[str, tuple[Place, Place, Place | None]] = {
    "transformer.wte.weight":               (SAME,  SAME,     Place("wte", pad_vocab=True)),
    "transformer.wpe.weight":               (SAME,  SAME,     Place("wpe")),
    "transformer.h.{i}.ln_1.weight":        (SAME,  SAME,     Place("ln1w", stacked=True)),
    "transformer.h.{i}.ln_1.bias":          (SAME,  SAME,     Place("ln1b", stacked=True)),
    "transformer.h.{i}.attn.c_attn.weight": (SAME,  SAME_T,   Place("qkvw", stacked=True, transpose=True)),
    "transformer.h.{i}.attn.c_attn.bias":   (SAME,  SAME,     Place("qkvb", stacked=True)),
    "transformer.h.{i}.attn.c_proj.weight": (SAME,  SAME_T,   Place("attprojw", stacked=True, transpose=True)),
    "transformer.h.{i}.attn.c_proj.bias":   (SAME,  SAME,     Place("attprojb", stacked=True)),
    "transformer.h.{i}.ln_2.weight":        (SAME,  SAME,     Place("ln2w", stacked=True)),
    "transformer.h.{i}.ln_2.bias":          (SAME,  SAME,     Place("ln2b", stacked=True)),
    "transformer.h.{i}.mlp.c_fc.weight":    (SAME,  SAME_T,   Place("fcw", stacked=True, transpose=True)),
    "transformer.h.{i}.mlp.c_fc.bias":      (SAME,  SAME,     Place("fcb", stacked=True)),
    "transformer.h.{i}.mlp.c_proj.weight":  (SAME,  SAME_T,   Place("fcprojw", stacked=True, transpose=True)),
    "transformer.h.{i}.mlp.c_proj.bias":    (SAME,  SAME,     Place("fcprojb", stacked=True)),
    "transformer.ln_f.weight":              (SAME,  SAME,     Place("lnfw")),
    "transformer.ln_f.bias":                (SAME,  SAME,     Place("lnfb")),
    "lm_head.weight":                       (SAME,  SAME,     None),   # untied only; llm.c always ties
}

COLUMN = {fmt: k for k, fmt in enumerate(FORMATS)}
# llm.c's 16 tensors in file order: the llmc column read top to bottom (it is llm.c's order)
LLMC_ORDER = tuple(row[2].key for row in TABLE.values() if row[2] is not None)
# nanoGPT's nn.Linear weights, stored [out, in]: the transposed rows of the nanogpt column
TRANSPOSED = {fmt: tuple(name for name, row in TABLE.items() if row[COLUMN[fmt]] and row[COLUMN[fmt]].transpose)
              for fmt in FORMATS}
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")   # causal-mask buffers of HF / nanoGPT, not parameters
NANOGPT_PREFIXES = ("_orig_mod.", "module.")

LLMC_MAGIC, LLMC_VERSIONS = 20240326, {3: "float32", 5: "bfloat16"}
LLMC_STATE_MAGIC, LLMC_STATE_VERSION = 20240327, 2
LLMC_HEADER_INTS = 256
LLMC_VOCAB_MULTIPLE = 128          # llm.c's pad_vocab(multiple=128)


def pattern_of(name: str) -> tuple[str, int | None]:
    """Canonical name -> (TABLE row key, layer index or None)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "transformer" and parts[1] == "h" and parts[2].isdigit():
        return ".".join(parts[:2] + ["{i}"] + parts[3:]), int(parts[2])
    return name, None


def place(name: str, fmt: str) -> Place | None:
    """Where canonical tensor `name` lives in `fmt` (None: the format has no place for it)."""
    if fmt not in COLUMN:
        raise FormatError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    pattern, _ = pattern_of(name)
    row = TABLE.get(pattern)
    return None if row is None else row[COLUMN[fmt]]


def describe(name: str) -> dict[str, str]:
    """One line per format saying where `name` lives (what the module docstring shows by hand).
    `name` may be a table row itself ("transformer.h.{i}...."): stacked slices then read [i]."""
    pattern, i = pattern_of(name)
    out = {}
    for fmt in FORMATS:
        p = place(name, fmt)
        if p is None:
            out[fmt] = "not held"
            continue
        key = (p.key or name) + (f"[{'i' if i is None else i}]" if p.stacked else "")
        notes = [s for s, on in (("transposed", p.transpose), ("stacked over layers", p.stacked),
                                 ("rows padded V -> Vp", p.pad_vocab)) if on]
        out[fmt] = key + (f" ({', '.join(notes)})" if notes else "")
    return out


# -- what each format can hold -----------------------------------------------------------------------

HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
HF_ACTIVATION_OF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def check_can_hold(cfg: ModelConfig, fmt: str) -> None:
    """Raise FormatError naming every field whose value `fmt` cannot hold (the model would compute
    something else there)."""
    C = cfg.d_model
    rules = [("n_future", cfg.n_future == 1, "only our own checkpoints hold extra prediction heads")]
    if fmt == "hf":
        rules += [("norm", cfg.norm == "pre", "GPT2LMHeadModel is pre-LN"),
                  ("bias", cfg.bias, "GPT2LMHeadModel has biases in every linear layer and layer norm")]
    elif fmt == "nanogpt":
        rules += [("norm", cfg.norm == "pre", "nanoGPT is pre-LN"),
                  ("d_ff", cfg.d_ff == 4 * C, f"nanoGPT's MLP is 4 * d_model = {4 * C} wide"),
                  ("tie_embeddings", cfg.tie_embeddings, "nanoGPT ties lm_head to wte"),
                  ("activation", cfg.activation == "gelu", "nanoGPT's MLP is nn.GELU(), exact erf 'gelu'"),
                  ("ln_eps", cfg.ln_eps == 1e-5, "nanoGPT's LayerNorm eps is 1e-5")]
    elif fmt == "llmc":
        rules += [("norm", cfg.norm == "pre", "llm.c is pre-LN"),
                  ("d_ff", cfg.d_ff == 4 * C, f"llm.c's MLP is 4 * d_model = {4 * C} wide"),
                  ("tie_embeddings", cfg.tie_embeddings, "llm.c ties lm_head to wte"),
                  ("bias", cfg.bias, "llm.c has biases everywhere"),
                  ("activation", cfg.activation == "gelu_tanh", "llm.c's GELU is the tanh approximation"),
                  ("ln_eps", cfg.ln_eps == 1e-5, "llm.c's LayerNorm eps is 1e-5")]
    else:
        raise FormatError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    bad = [f"{field} = {getattr(cfg, field)!r} ({why})" for field, ok, why in rules if not ok]
    if bad:
        raise FormatError(f"the {fmt} format cannot hold this config: " + "; ".join(bad))


# -- canonical <-> a format's layout (the table, applied) -----------------------------------------------

def llmc_padded_vocab(V: int) -> int:
    """llm.c's Vp: V rounded up to a multiple of 128 (50257 -> 50304)."""
    return -(-V // LLMC_VOCAB_MULTIPLE) * LLMC_VOCAB_MULTIPLE


def layout_shapes(cfg: ModelConfig, fmt: str, Vp: int | None = None) -> dict[str, tuple]:
    """Every tensor of `fmt` for this config, in the format's order, with its stored shape (from the
    table and the registry). llmc: the 16 stacked tensors; wte has Vp rows (None: any Vp >= V)."""
    out = {}
    for name, shape in param_shapes(cfg).items():
        p = place(name, fmt)
        if p is None:
            continue
        shape = shape[::-1] if p.transpose else shape
        if p.pad_vocab:
            shape = (Vp,) + shape[1:]
        if p.stacked:
            shape = (cfg.n_layers,) + shape
        out[p.key or name] = shape           # a stacked key is met once per layer, with the same shape
    return out


def llmc_shapes(cfg: ModelConfig, Vp: int) -> dict[str, tuple]:
    """The 16 llm.c tensors in file order with their shapes."""
    return layout_shapes(cfg, "llmc", Vp)


def to_layout(params: dict[str, np.ndarray], cfg: ModelConfig, fmt: str, Vp: int | None = None) -> dict:
    """Canonical tensors (parameters or their gradients) -> the tensors of `fmt`, by the table.

    nanogpt writes lm_head.weight as well when tied (nanoGPT's state dict holds both keys).
    llmc stacks the layers and pads wte to Vp rows of zeros (default llmc_padded_vocab(V))."""
    check_can_hold(cfg, fmt)
    check_params(cfg, params, where="tensors to convert", allow_prefixes=())
    out: dict[str, np.ndarray] = {}
    if fmt == "llmc":
        Vp = llmc_padded_vocab(cfg.vocab_size) if Vp is None else Vp
        shapes = llmc_shapes(cfg, Vp)
        for key in LLMC_ORDER:
            out[key] = np.zeros(shapes[key], dtype=params["transformer.wte.weight"].dtype)
    for spec in param_specs(cfg):
        p = place(spec.name, fmt)
        arr = params[spec.name].T if p.transpose else params[spec.name]
        if fmt != "llmc":
            out[p.key or spec.name] = np.ascontiguousarray(arr)
        elif p.stacked:
            out[p.key][pattern_of(spec.name)[1]] = arr
        else:
            out[p.key][: arr.shape[0]] = arr
    if fmt == "nanogpt" and cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def from_layout(tensors: dict[str, np.ndarray], cfg: ModelConfig, fmt: str, what: str = "file",
                dtype=None) -> dict[str, np.ndarray]:
    """The tensors of `fmt` -> canonical tensors in registry order, by the table (strict).

    Raises one FormatError listing every missing, unexpected and mis-shaped key. The tied
    lm_head.weight may be present (it must then equal wte) or absent. llmc: wte may have any
    Vp >= V rows; the padded rows are dropped. `dtype`: cast to it (exact when widening)."""
    check_can_hold(cfg, fmt)
    V = cfg.vocab_size
    expected = layout_shapes(cfg, fmt)                          # llmc wte: (None, C)
    problems = []
    for key, shape in expected.items():
        if key not in tensors:
            problems.append(f"missing {key}")
            continue
        found = tuple(np.shape(tensors[key]))
        if shape[0] is None:                                    # padded vocabulary rows
            if not (len(found) == 2 and found[1] == shape[1] and found[0] >= V):
                problems.append(f"{key} has shape {found}, expected (Vp >= {V}, {shape[1]})")
        elif found != shape:
            problems.append(f"{key} has shape {found}, expected {shape}")
    tied_copy = "lm_head.weight" if fmt != "llmc" and cfg.tie_embeddings else None
    problems += [f"unexpected {k} {tuple(np.shape(v))}" for k, v in sorted(tensors.items())
                 if k not in expected and k != tied_copy]
    if tied_copy in tensors and "transformer.wte.weight" in tensors and not np.array_equal(
            np.asarray(tensors[tied_copy]), np.asarray(tensors["transformer.wte.weight"])):
        problems.append("lm_head.weight differs from transformer.wte.weight although the config ties them")
    if problems:
        raise FormatError(f"{what} does not match the {fmt} layout of its config "
                          f"({len(problems)} problem(s)): " + "; ".join(problems))
    out = {}
    for name in param_shapes(cfg):
        p = place(name, fmt)
        arr = np.asarray(tensors[p.key or name])
        if p.stacked:
            arr = arr[pattern_of(name)[1]]                      # layer i of (L, ...)
        if p.pad_vocab:
            arr = arr[:V]                                       # (Vp, C) -> (V, C)
        if p.transpose:
            arr = arr.T                                         # (out, in) -> (in, out)
        out[name] = np.ascontiguousarray(arr, dtype=dtype or arr.dtype)
    return out


def grads_from_layout(tensors: dict[str, np.ndarray], fmt: str, cfg: ModelConfig, what: str = "dump") -> dict:
    """Parameter gradients in `fmt`'s layout (keys as that format names them; llmc: the 16 stacked
    names, wte with V or Vp rows) -> canonical gradients. The debugger's `--layout` reads this."""
    return from_layout(tensors, cfg, fmt, what=f"{what} (parameter gradients)")


# -- writing files ---------------------------------------------------------------------------------

def _atomic_write_bytes(path: Path, chunks) -> None:
    """Write `chunks` to `path` atomically (manual.checkpoint.write_atomic: temp file, fsync, os.replace,
    the umask's mode), after checking the folder exists (a FormatError naming it)."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FormatError(f"cannot write {path}: folder {folder} does not exist")
    write_atomic(path, chunks)


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FormatError(f"{path}: no such {what} file")
    return path.read_bytes()


# -- Hugging Face ---------------------------------------------------------------------------------------

def hf_config_to_ours(conf: dict, dtype: str = "float32", where: str = "config.json") -> ModelConfig:
    """A GPT-2 config.json (dict) -> ModelConfig. Refuses settings GPT2LMHeadModel computes differently."""
    need = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
    missing = [k for k in need if k not in conf]
    if missing:
        raise FormatError(f"{where}: field(s) {missing} missing; a GPT-2 config.json has {list(need)}")
    if conf.get("model_type", "gpt2") != "gpt2":
        raise FormatError(f"{where}: field model_type is {conf['model_type']!r}, expected 'gpt2'")
    act = conf.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise FormatError(f"{where}: field activation_function is {act!r}, expected one of {sorted(HF_ACTIVATIONS)}")
    for field, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
        if conf.get(field, want) != want:
            raise FormatError(f"{where}: field {field} is {conf[field]!r}, expected {want!r} (GPT-2 attention)")
    V, C = int(conf["vocab_size"]), int(conf["n_embd"])
    pad = next((conf[k] for k in ("pad_token_id", "eos_token_id") if isinstance(conf.get(k), int)
                and 0 <= conf[k] < V), V - 1)
    try:
        return ModelConfig(vocab_size=V, max_seq_len=int(conf["n_positions"]), d_model=C,
                           n_heads=int(conf["n_head"]), n_layers=int(conf["n_layer"]),
                           d_ff=int(conf.get("n_inner") or 4 * C), activation=HF_ACTIVATIONS[act],
                           ln_eps=float(conf.get("layer_norm_epsilon", 1e-5)),
                           tie_embeddings=bool(conf.get("tie_word_embeddings", True)),
                           norm="pre", bias=True, pad_id=pad, dtype=dtype)
    except ValueError as exc:
        raise FormatError(f"{where}: {exc}") from None


def ours_to_hf_config(cfg: ModelConfig) -> dict:
    check_can_hold(cfg, "hf")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
            "activation_function": HF_ACTIVATION_OF[cfg.activation], "layer_norm_epsilon": cfg.ln_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "bos_token_id": cfg.pad_id, "eos_token_id": cfg.pad_id,
            "pad_token_id": cfg.pad_id, "torch_dtype": cfg.dtype}


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load

    data = _read(path, "safetensors")
    try:
        tensors = load(data)
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, ValueError, OSError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: not a readable safetensors file ({len(data)} bytes): {first}") from None
    return tensors, meta


def _cast(tensors: dict, dtype: str, notes: list, what: str) -> dict:
    found = sorted({str(a.dtype) for a in tensors.values()})
    bad = [d for d in found if np.dtype(d).kind != "f"]
    if bad:
        raise FormatError(f"{what}: tensors of dtype {bad}, expected floating point")
    if found != [dtype]:
        narrowing = any(np.dtype(d).itemsize > np.dtype(dtype).itemsize for d in found)
        notes.append(f"{what}: {'/'.join(found)} {'narrowed (rounded)' if narrowing else 'widened exactly'} "
                     f"to {dtype}")
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}


def read_hf(path, dtype: str = "float32") -> tuple[ModelConfig, dict, list[str]]:
    """A Hugging Face GPT-2 directory (or its model.safetensors) -> (cfg, canonical params, notes)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "model.safetensors"
    conf_path = folder / "config.json"
    if not path.exists():
        raise FormatError(f"{path}: no such directory (expected a Hugging Face GPT-2 folder with model.safetensors "
                          f"and config.json)")
    try:
        conf = json.loads(_read(conf_path, "config.json").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{conf_path}: not valid JSON: {exc}") from None
    if not isinstance(conf, dict):
        raise FormatError(f"{conf_path}: expected a JSON object, found {type(conf).__name__}")
    cfg = hf_config_to_ours(conf, dtype, where=str(conf_path))
    tensors, _meta = _load_safetensors(weights)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_BUFFERS)}
    if not any(k.startswith("transformer.") for k in tensors):   # saved from GPT2Model: no prefix
        tensors = {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in tensors.items()}
    notes: list[str] = []
    tensors = _cast(tensors, dtype, notes, str(weights))
    return cfg, from_layout(tensors, cfg, "hf", what=str(weights)), notes


def write_hf(folder, cfg: ModelConfig, params: dict) -> None:
    """Write model.safetensors + config.json into `folder` (created if absent; each file atomic)."""
    folder = Path(folder)
    tensors = to_layout(params, cfg, "hf")
    conf = json.dumps(ours_to_hf_config(cfg), indent=2, sort_keys=True) + "\n"
    if folder.exists() and not folder.is_dir():
        raise FormatError(f"{folder}: exists and is not a directory (--to hf writes a folder)")
    if not folder.parent.is_dir():
        raise FormatError(f"cannot write {folder}: folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    save_tensors(folder / "model.safetensors", tensors, {"format": "pt"})   # transformers reads "pt" files
    _atomic_write_bytes(folder / "config.json", [conf.encode()])


# -- nanoGPT ---------------------------------------------------------------------------------------

NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def read_nanogpt(path, dtype: str = "float32") -> tuple[ModelConfig, dict, list[str]]:
    """A nanoGPT state dict saved as safetensors (with `model_args` metadata) -> (cfg, params, notes)."""
    path = Path(path)
    tensors, meta = _load_safetensors(path)
    if "model_args" not in meta:
        raise FormatError(f"{path}: metadata field 'model_args' missing (found {sorted(meta)}); nanoGPT's "
                          f"n_head cannot be read from shapes: save with metadata={{'model_args': "
                          f"json.dumps(ckpt['model_args'])}}")
    try:
        args = json.loads(meta["model_args"])
        missing = [k for k in NANOGPT_ARGS if k not in args]
    except (json.JSONDecodeError, TypeError):
        raise FormatError(f"{path}: metadata 'model_args' is not a JSON object: {meta['model_args'][:80]!r}") from None
    if missing:
        raise FormatError(f"{path}: metadata model_args lacks {missing}; nanoGPT's model_args has {list(NANOGPT_ARGS)}")
    stripped = {}
    for key, arr in tensors.items():
        bare = key
        while bare.startswith(NANOGPT_PREFIXES):
            bare = bare[len(next(p for p in NANOGPT_PREFIXES if bare.startswith(p))):]
        if not bare.endswith(IGNORED_BUFFERS):
            stripped[bare] = arr
    C = int(args["n_embd"])
    V = int(args["vocab_size"])
    try:
        cfg = ModelConfig(vocab_size=V, max_seq_len=int(args["block_size"]), d_model=C,
                          n_heads=int(args["n_head"]), n_layers=int(args["n_layer"]), d_ff=4 * C,
                          bias=bool(args["bias"]), activation="gelu", pad_id=V - 1, dtype=dtype)
    except ValueError as exc:
        raise FormatError(f"{path}: metadata model_args: {exc}") from None
    notes: list[str] = []
    stripped = _cast(stripped, dtype, notes, str(path))
    return cfg, from_layout(stripped, cfg, "nanogpt", what=str(path)), notes


def write_nanogpt(path, cfg: ModelConfig, params: dict) -> None:
    """A nanoGPT-layout state dict (lm_head.weight included, tied) as safetensors, with model_args."""
    tensors = to_layout(params, cfg, "nanogpt")
    args = {"n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_embd": cfg.d_model, "block_size": cfg.max_seq_len,
            "bias": cfg.bias, "vocab_size": cfg.vocab_size, "dropout": 0.0}
    tensors = {k: np.array(v) if k == "lm_head.weight" else v for k, v in tensors.items()}  # no shared buffers
    save_tensors(path, tensors, {"model_args": json.dumps(args)})


# -- llm.c model file ----------------------------------------------------------------------------------

def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly: a bfloat16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _header(data: bytes, path: Path, magic: int, versions, what: str) -> np.ndarray:
    n = LLMC_HEADER_INTS * 4
    if len(data) < n:
        raise FormatError(f"{path}: truncated: {len(data)} bytes, the {what} header alone needs {n}")
    h = np.frombuffer(data[:n], dtype="<i4")
    if h[0] != magic:
        raise FormatError(f"{path}: offset 0 (magic): found {int(h[0])}, expected {magic} ({what})")
    if int(h[1]) not in versions:
        raise FormatError(f"{path}: offset 4 (version): found {int(h[1])}, expected {' or '.join(map(str, versions))}")
    return h


def _check_size(path: Path, found: int, expected: int, why: str) -> None:
    if found != expected:
        kind = "truncated" if found < expected else "size mismatch"
        raise FormatError(f"{path}: {kind}: file has {found} bytes, expected {expected} ({why})")


def read_llmc(path, dtype: str = "float32") -> tuple[ModelConfig, dict, list[str]]:
    """llm.c's gpt2_*.bin -> (cfg, canonical params, notes). bfloat16 (version 5) is widened exactly."""
    path = Path(path)
    data = _read(path, "llm.c model")
    h = _header(data, path, LLMC_MAGIC, LLMC_VERSIONS, "llm.c gpt2_*.bin")
    version = int(h[1])
    maxT, V, L, NH, C, Vp = (int(v) for v in h[2:8])
    for off, name, value, low in ((8, "maxT", maxT, 1), (12, "V", V, 1), (16, "L", L, 1), (20, "NH", NH, 1),
                                  (24, "C", C, 1), (28, "Vp", Vp, V)):
        if value < low:
            raise FormatError(f"{path}: offset {off} ({name}): found {value}, expected >= {low}")
    try:
        cfg = ModelConfig(vocab_size=V, max_seq_len=maxT, d_model=C, n_heads=NH, n_layers=L, d_ff=4 * C,
                          activation="gelu_tanh", pad_id=V - 1, dtype=dtype)
    except ValueError as exc:
        raise FormatError(f"{path}: header: {exc}") from None
    shapes = llmc_shapes(cfg, Vp)
    item = 4 if version == 3 else 2
    n = sum(int(np.prod(s)) for s in shapes.values())
    _check_size(path, len(data), 1024 + n * item, f"header: 1024 + {n} parameters x {item} bytes "
                                                  f"({LLMC_VERSIONS[version]}, Vp {Vp})")
    if version == 3:
        flat = np.frombuffer(data, dtype="<f4", offset=1024)
    else:
        flat = _bf16_to_f32(np.frombuffer(data, dtype="<u2", offset=1024))
    tensors, at = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        tensors[key] = flat[at: at + size].reshape(shape)
        at += size
    notes = []
    if version == 5:
        notes.append(f"{path}: version 5 holds bfloat16; widened exactly to float32")
    pad = tensors["wte"][V:]
    if pad.size and np.any(pad != 0):
        notes.append(f"{path}: the {Vp - V} padded rows of wte are not zero (max |x| {float(np.abs(pad).max()):.3g}); "
                     f"dropped (no token id reaches them)")
    if dtype != "float32":
        notes.append(f"{path}: float32 widened exactly to {dtype}")
    return cfg, from_layout(tensors, cfg, "llmc", what=str(path), dtype=dtype), notes


def write_llmc(path, cfg: ModelConfig, params: dict, dtype: str = "float32", Vp: int | None = None) -> list[str]:
    """Write llm.c's gpt2_*.bin (version 3 float32, or 5 bfloat16, rounded). Returns notes."""
    if dtype not in ("float32", "bfloat16"):
        raise FormatError(f"llm.c model files hold float32 (version 3) or bfloat16 (version 5), not {dtype!r}")
    tensors = to_layout(params, cfg, "llmc", Vp)
    Vp = tensors["wte"].shape[0]
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:8] = (LLMC_MAGIC, 3 if dtype == "float32" else 5, cfg.max_seq_len, cfg.vocab_size, cfg.n_layers,
                  cfg.n_heads, cfg.d_model, Vp)
    notes = []
    if cfg.dtype != "float32":
        notes.append(f"{cfg.dtype} rounded to float32 (llm.c holds float32)")
    if dtype == "bfloat16":
        notes.append("float32 rounded to bfloat16 (nearest even): version 5")
        chunks = [_f32_to_bf16(tensors[k].astype(np.float32)).astype("<u2").tobytes() for k in LLMC_ORDER]
    else:
        chunks = [tensors[k].astype("<f4").tobytes() for k in LLMC_ORDER]
    _atomic_write_bytes(Path(path), [header.tobytes()] + chunks)
    return notes


# -- llm.c debug state ---------------------------------------------------------------------------------

@dataclass
class LlmcState:
    x: np.ndarray          # (B, T) int32 input ids
    y: np.ndarray          # (B, T) int32 targets
    logits: np.ndarray     # (B, T, V) float32, unpadded
    loss: float            # float32 value
    grads: dict            # canonical name -> float32 gradient (padded wte rows dropped)
    Vp: int                # padded vocabulary of the gradient block


def read_llmc_state(path, cfg: ModelConfig, Vp: int | None = None) -> LlmcState:
    """llm.c's debug state -> canonical tensors. The header holds only B and T, so the model's config
    is needed; Vp is found from the file size when not given."""
    path = Path(path)
    check_can_hold(cfg, "llmc")
    data = _read(path, "llm.c debug state")
    h = _header(data, path, LLMC_STATE_MAGIC, (LLMC_STATE_VERSION,), "llm.c debug state")
    B, T = int(h[2]), int(h[3])
    for off, name, value in ((8, "B", B), (12, "T", T)):
        if value < 1:
            raise FormatError(f"{path}: offset {off} ({name}): found {value}, expected >= 1")
    if T > cfg.max_seq_len:
        raise FormatError(f"{path}: offset 12 (T): found {T}, expected <= max_seq_len {cfg.max_seq_len}")
    V, C = cfg.vocab_size, cfg.d_model
    head = 1024 + 8 * B * T + 4 * B * T * V + 4
    rest = sum(int(np.prod(s)) for s in llmc_shapes(cfg, 0).values())    # wte counted with 0 rows
    if Vp is None:               # not in the header: the size of wte's gradient tells it (else llm.c's rule)
        n_wte = (len(data) - head) // 4 - rest
        Vp = n_wte // C if n_wte >= V * C and n_wte % C == 0 else llmc_padded_vocab(V)
    _check_size(path, len(data), head + 4 * (rest + Vp * C),
                f"header B {B}, T {T}; config V {V}, C {C}, L {cfg.n_layers}, maxT {cfg.max_seq_len}; Vp {Vp}")
    at = 1024
    x = np.frombuffer(data, "<i4", B * T, at).reshape(B, T); at += 4 * B * T
    y = np.frombuffer(data, "<i4", B * T, at).reshape(B, T); at += 4 * B * T
    logits = np.frombuffer(data, "<f4", B * T * V, at).reshape(B, T, V); at += 4 * B * T * V
    loss = float(np.frombuffer(data, "<f4", 1, at)[0]); at += 4
    grads, shapes = {}, llmc_shapes(cfg, Vp)
    for key in LLMC_ORDER:
        size = int(np.prod(shapes[key]))
        grads[key] = np.frombuffer(data, "<f4", size, at).reshape(shapes[key]); at += 4 * size
    return LlmcState(x.astype(np.int32), y.astype(np.int32), logits.astype(np.float32), loss,
                     grads_from_layout(grads, "llmc", cfg, what=str(path)), Vp)


def write_llmc_state(path, cfg: ModelConfig, x, y, logits, loss: float, grads: dict, Vp: int | None = None) -> None:
    """Write llm.c's debug state: x, y (B, T), logits (B, T, V) unpadded, the loss, every parameter
    gradient in llm.c's order with wte padded to Vp (all float32)."""
    x, y = np.asarray(x), np.asarray(y)
    B, T = x.shape
    if y.shape != (B, T) or np.shape(logits) != (B, T, cfg.vocab_size):
        raise FormatError(f"state shapes: x {x.shape}, y {y.shape}, logits {np.shape(logits)}; expected "
                          f"{(B, T)}, {(B, T)}, {(B, T, cfg.vocab_size)}")
    g = to_layout(grads, cfg, "llmc", Vp)
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:4] = (LLMC_STATE_MAGIC, LLMC_STATE_VERSION, B, T)
    chunks = [header.tobytes(), x.astype("<i4").tobytes(), y.astype("<i4").tobytes(),
              np.asarray(logits).astype("<f4").tobytes(), np.asarray([loss]).astype("<f4").tobytes()]
    chunks += [g[k].astype("<f4").tobytes() for k in LLMC_ORDER]
    _atomic_write_bytes(Path(path), chunks)


READERS = {"hf": read_hf, "nanogpt": read_nanogpt, "llmc": read_llmc}
WRITERS = {"hf": write_hf, "nanogpt": write_nanogpt, "llmc": write_llmc}
