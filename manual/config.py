"""ModelConfig: the one description of a model, shared by manual/ and reference/.

Every field has a comment. Invalid combinations raise ValueError with the numbers in
the message. The config travels inside every checkpoint as JSON (`to_json` /
`from_json`), so a checkpoint always says what model it holds.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

NORMS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
ATTENTIONS = ("standard", "flash")
DTYPES = ("float32", "float64")
LOSSES = ("cross_entropy", "brier")


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
            else:  # a plain Python float: an np.float64 here would promote every float32 array it touches
                object.__setattr__(self, name, float(value))
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

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
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config has unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)


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
