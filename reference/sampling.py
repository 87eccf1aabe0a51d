"""Generation for the reference, in torch: the same rule as manual/sampling.py, stated again.

    temperature == 0: argmax (ties -> lowest id); otherwise z = logits / temperature, logits
    below the k-th largest -> -inf (z is computed as (logits - max) / temperature), p = softmax(z), token = first id whose cumulative p
    exceeds the shared uniform draw u. Context cropped to the last max_seq_len tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from manual.sampling import check_generate_inputs, check_logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, u: float) -> int:
    z = logits.to(torch.float64)                                     # (V,)
    if temperature == 0:
        return int(torch.argmax(z))                                  # first maximal index
    z = (z - z.max()) / temperature                                  # the max first: no inf - inf at tiny temperatures
    if top_k is not None and top_k < z.shape[0]:
        kth = torch.topk(z, top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    above = torch.nonzero(torch.cumsum(p, 0) > u)
    if above.numel():
        return int(above[0, 0])
    return int(torch.nonzero(p > 0)[-1, 0])


def generate(model, prompt, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, uniforms: np.ndarray | None = None) -> np.ndarray:
    """`model` is reference.Model; returns the new ids (int64)."""
    cfg = model.cfg
    prompt, uniforms = check_generate_inputs(prompt, max_new_tokens, temperature, top_k, seed, uniforms)
    ids = torch.from_numpy(prompt)                                   # (T,) int64
    new = []
    for i in range(max_new_tokens):
        context = ids[-cfg.max_seq_len:][None, :]                    # (1, T)
        model.forward(context.numpy())
        row = np.asarray(model.logits)[0, -1]                        # (V,)
        check_logits(row, i)                                         # the same finite policy as manual
        logits = torch.as_tensor(row)
        new.append(sample_next(logits, temperature, top_k, float(uniforms[i])))
        ids = torch.cat([ids, torch.tensor([new[-1]])])
    return np.asarray(new, dtype=np.int64)
