"""Layers of the manual model: each file holds the equation, `*_forward` and `*_backward`.

Conventions (the whole package):
    shapes   B batch, T time, C = d_model, H heads, D head size, F = d_ff, V vocab, S = max_seq_len
    forward(inputs..., params...)          -> output(s), cache   (the cache is a small NamedTuple
                                              whose fields name what backward reads: LinearCache,
                                              AttentionCache, ...)
    backward(dout, cache, dparam buffers)  -> gradients w.r.t. the inputs, in the forward's order;
                                              parameter gradients are ACCUMULATED (+=) into the
                                              caller's buffers, which the caller zeroes once.
"""
from .activations import ACTIVATIONS, GeluCache, GeluTanhCache, ReluCache
from .attention import FLASH_BLOCK, AttentionCache, attention_backward, attention_forward
from .block import BlockCache, block_backward, block_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .special import erf
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .linear import LinearCache, linear_backward, linear_forward, unembed_backward, unembed_forward
from .loss import LossCache, loss_backward, loss_forward
from .mlp import MLPCache, mlp_backward, mlp_forward

__all__ = ["erf", "ACTIVATIONS", "attention_forward", "attention_backward", "FLASH_BLOCK",
           "block_forward", "block_backward", "embedding_forward", "embedding_backward",
           "layernorm_forward", "layernorm_backward", "linear_forward", "linear_backward",
           "unembed_forward", "unembed_backward", "loss_forward", "loss_backward",
           "mlp_forward", "mlp_backward",
           "AttentionCache", "BlockCache", "EmbeddingCache", "GeluCache", "GeluTanhCache", "LayerNormCache",
           "LinearCache", "LossCache", "MLPCache", "ReluCache"]
