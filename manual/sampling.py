"""Text generation from any model with the Model interface (forward(ids) sets .logits).

Sampling, exactly (reference/sampling.py states the same rule in torch):
    temperature == 0   greedy: argmax of the last position's logits (ties -> lowest id)
    temperature  > 0   z = (logits - max(logits)) / temperature (the max first, so that a tiny
                       temperature such as 1e-320 gives -inf, never inf - inf = NaN); with top_k, every logit below the k-th
                       largest becomes -inf (ties with the k-th are kept);
                       p = softmax(z); the token is the first id whose running sum of p
                       exceeds u, where u ~ U[0, 1) is the next draw of one shared stream
                       (`uniform_stream(seed, n)`), so two implementations given the same
                       draws must pick the same tokens.
The context is cropped to the last max_seq_len tokens before each forward.
Finite policy (manual/checks.py): non-finite logits (a NaN, an infinity) and non-finite or
out-of-range uniform draws are refused with a NonFiniteError / ValueError, never turned into a
token; both implementations call check_logits and check_generate_inputs.
"""
from __future__ import annotations

import numpy as np

from .checks import NonFiniteError


def check_generate_inputs(prompt, max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
                          uniforms: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate generate()'s arguments (both implementations); returns (prompt ids int64, uniform draws)."""
    check_sampling_args(temperature, top_k, max_new_tokens)
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"prompt must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"prompt must hold integer token ids, got dtype {ids.dtype}")
    if uniforms is None:
        uniforms = uniform_stream(seed, max_new_tokens)
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if uniforms.ndim != 1:
        raise ValueError(f"uniform draws must be 1-D, got shape {uniforms.shape}")
    if len(uniforms) < max_new_tokens:
        raise ValueError(f"{len(uniforms)} uniform draws for {max_new_tokens} tokens")
    outside = ~((uniforms >= 0) & (uniforms < 1))              # NaN is outside too
    if outside.any():
        i = int(np.argmax(outside))
        raise NonFiniteError(f"uniform draw {i} is {uniforms[i]}; draws must be finite numbers in [0, 1)")
    return ids.astype(np.int64), uniforms


def check_logits(logits: np.ndarray, step: int) -> None:
    """Refuse non-finite logits of the row a token is drawn from (NonFiniteError naming the token id)."""
    bad = ~np.isfinite(logits)
    if bad.any():
        i = int(np.argmax(bad))
        raise NonFiniteError(f"the model's logits for new token {step} hold {int(bad.sum())} non-finite value(s), "
                             f"the first at token id {i} ({logits[i]}); refusing to sample from them "
                             f"(check the checkpoint or the model with debug=True)")


def check_sampling_args(temperature: float, top_k: int | None, max_new_tokens: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (or None for no cut), got {top_k!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def uniform_stream(seed: int, n: int) -> np.ndarray:
    """The n uniform draws in [0, 1) that drive sampling (float64), shared by both implementations."""
    return np.random.default_rng(seed).random(n)


def sample_next(logits: np.ndarray, temperature: float, top_k: int | None, u: float) -> int:
    """Pick one token id from one row of logits (V,) with one uniform draw u."""
    z = logits.astype(np.float64)                                   # (V,)
    if temperature == 0:
        return int(np.argmax(z))
    with np.errstate(divide="ignore", over="ignore"):
        z = (z - z.max()) / temperature                             # (V,) <= 0, the max is 0
    if top_k is not None and top_k < z.shape[0]:
        kth = np.sort(z)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z)
    p = p / p.sum()                                                 # (V,)
    above = np.nonzero(np.cumsum(p) > u)[0]
    if above.size:
        return int(above[0])
    return int(np.nonzero(p > 0)[0][-1])                            # rounding left the sum just below u


def generate(model, prompt, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, uniforms: np.ndarray | None = None) -> np.ndarray:
    """Extend `prompt` (1-D ids) by max_new_tokens tokens; returns only the new ids (int64)."""
    cfg = model.cfg
    ids, uniforms = check_generate_inputs(prompt, max_new_tokens, temperature, top_k, seed, uniforms)
    new = []
    for i in range(max_new_tokens):
        context = ids[-cfg.max_seq_len:][None, :]                  # (1, T)
        model.forward(context)
        row = np.asarray(model.logits)[0, -1]                      # (V,)
        check_logits(row, i)
        new.append(sample_next(row, temperature, top_k, float(uniforms[i])))
        ids = np.append(ids, new[-1])
    return np.asarray(new, dtype=np.int64)
