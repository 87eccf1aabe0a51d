"""ModelConfig: the one description of a model, shared by manual/ and reference/.

Every field has a comment. Invalid combinations raise ValueError with the numbers in
the message. The config travels inside every checkpoint as JSON (`to_json` /
`from_json`), so a checkpoint always says what model it holds.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

import numpy as np

NORMS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
ATTENTIONS = ("standard", "flash")
DTYPES = ("float32", "float64")
LOSSES = ("cross_entropy", "brier")

# The stated limit on the memory a config may imply: the bytes of its parameters (the gradients and
# the optimizer state take the same again, two to three times). A config over it is refused when it
# is built, before anything is allocated: a checkpoint of a few bytes cannot ask for n_layers = 10**9.
# Raise it (manual.config.MAX_PARAM_BYTES = ...) to size bigger models.
MAX_PARAM_BYTES = 2**40            # 1 TiB


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 100          # V: number of token ids, valid ids are [0, V)
    max_seq_len: int = 20          # longest sequence the position table covers (rows of wpe)
    d_model: int = 64              # C: width of the residual stream
    n_heads: int = 4               # H: attention heads; head size D = d_model // n_heads
    d_ff: int = 256                # F: hidden width of the feed-forward layer
    n_layers: int = 3              # L: number of transformer blocks
    norm: str = "pre"              # 'pre' (GPT-2: LN before each sub-layer) or 'post' (LN after each residual)
    activation: str = "gelu"       # FFN activation: 'relu', 'gelu' (exact, erf) or 'gelu_tanh' (tanh approximation)
    bias: bool = True              # biases in every linear layer and layer norm (False: none anywhere)
    tie_embeddings: bool = True    # logits = x @ wte^T (one matrix, two gradient contributions) vs. a separate lm_head
    ln_eps: float = 1e-5           # layer norm: (x - mean) / sqrt(biased_var + ln_eps)
    n_future: int = 1              # prediction heads: 1 = next token only; k > 1 adds heads for tokens 2..k ahead
    attention: str = "standard"    # 'standard' (materialise the T x T probabilities) or 'flash' (tiled, recompute in backward)
    dtype: str = "float32"         # floating point type of every parameter, activation and gradient
    pad_id: int = 0                # targets equal to pad_id are ignored by the loss (neither summed nor counted)
    loss: str = "cross_entropy"    # 'cross_entropy' or 'brier' (mean squared distance of softmax from one-hot)
    temperature: float = 1.0       # the loss sees logits / temperature

    def __post_init__(self) -> None:
        problems = []
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "d_ff", "n_layers", "n_future", "pad_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "d_ff", "n_layers", "n_future"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads >= 1 and self.d_model % self.n_heads != 0:
            problems.append(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads} "
                f"(head size would be {self.d_model / self.n_heads:g})")
        if not 0 <= self.pad_id < max(self.vocab_size, 1):
            problems.append(f"pad_id {self.pad_id} is outside the vocabulary [0, {self.vocab_size})")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("attention", ATTENTIONS),
                              ("dtype", DTYPES), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("ln_eps", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
                continue
            object.__setattr__(self, name, float(value))  # a Python float: np.float64 would promote float32 arrays
            if self.dtype in DTYPES:   # dtype-aware: the value must be a normal number of the model's dtype
                info = np.finfo(self.dtype)
                if not float(info.tiny) <= value <= float(info.max):
                    problems.append(f"{name} {value!r} is not a normal {self.dtype} number (it must lie in "
                                    f"[{float(info.tiny):.4g}, {float(info.max):.4g}]; outside, it underflows "
                                    f"or overflows and the loss becomes NaN)")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        self._check_size()

    def _check_size(self) -> None:
        """The implied parameter bytes against MAX_PARAM_BYTES (a closed form: nothing is enumerated)."""
        from .registry import param_count_closed_form

        nbytes = param_count_closed_form(self) * np.dtype(self.dtype).itemsize
        if nbytes > MAX_PARAM_BYTES:
            raise ValueError(f"invalid ModelConfig: it implies {nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB) of "
                             f"parameters (n_layers {self.n_layers}, d_model {self.d_model}, d_ff {self.d_ff}, "
                             f"vocab_size {self.vocab_size}, max_seq_len {self.max_seq_len}), over the limit "
                             f"manual.config.MAX_PARAM_BYTES = {MAX_PARAM_BYTES:,} bytes")

    # -- derived sizes ---------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """D: size of one attention head."""
        return self.d_model // self.n_heads

    # -- presets -----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration (see PRESETS), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; fields are {[f.name for f in fields(cls)]}")
        return cls(**{**PRESETS[name].model, **overrides})

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, strict: bool = False) -> "ModelConfig":
        """A config from a dict. strict=True (a checkpoint's config) requires every field: a missing one
        would silently take its default and give a different model from the one that was saved."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"config has unknown field(s) {unknown}; known fields are {sorted(known)}")
        missing = [name for name in known if name not in data]
        if strict and missing:
            raise ValueError(f"config lacks field(s) {missing}; a saved config must carry every field "
                             f"(defaults would silently give a different model)")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, strict: bool = False) -> "ModelConfig":
        data = load_json_object(text, "config")
        return cls.from_dict(data, strict=strict)


def load_json_object(text: str, what: str) -> dict:
    """json.loads(text), which must give an object; one ValueError for text that is not JSON, is nested
    too deeply to parse (RecursionError), or is not an object."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be JSON text, got {type(text).__name__}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{what} JSON is nested too deeply to read ({len(text):,} characters)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} JSON must be an object, got {type(data).__name__}")
    return data


def _dtype_name(value):
    """'float32' for 'float32', np.float32 or np.dtype('float32') alike (anything else is left for the
    check that lists the allowed names), so that a config holds a plain string on both sides."""
    if isinstance(value, str):
        return value
    try:
        name = np.dtype(value).name
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
        return value
    return name if name in DTYPES and value is not None else value


@dataclass(frozen=True)
class Preset:
    model: dict                     # ModelConfig fields
    train: dict = field(default_factory=dict)  # batch size, epochs, learning rate, clip (the blog's hyperparameters)


PRESETS: dict[str, Preset] = {
    # The blog post's model. Its "d_ff = 2565" is read as 256.
    "tiny": Preset(
        model=dict(vocab_size=100, d_model=64, n_heads=4, d_ff=256, n_layers=3, max_seq_len=20),
        train=dict(batch_size=4, epochs=100, lr=1e-3, clip=1.0),
    ),
    # Byte-level, big enough that matrix multiplies dominate.
    "medium": Preset(
        model=dict(vocab_size=256, d_model=256, n_heads=4, d_ff=1024, n_layers=4, max_seq_len=128),
        train=dict(batch_size=8, epochs=1, lr=3e-4, clip=1.0),
    ),
    # GPT-2 124M, for import and sizing; not trained in CI. pad_id = 50256 (<|endoftext|>).
    "gpt2-small": Preset(
        model=dict(vocab_size=50257, d_model=768, n_heads=12, d_ff=3072, n_layers=12, max_seq_len=1024,
                   activation="gelu_tanh", pad_id=50256),
        train=dict(batch_size=8, epochs=1, lr=6e-4, clip=1.0),
    ),
}
