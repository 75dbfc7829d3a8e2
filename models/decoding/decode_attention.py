"""Attention for a decode step (one new token per row) as two small matmuls, for the CPU.

PyTorch's fused attention on a CPU is built for long queries: for one query token it spends its
time setting up blocks, and with a padding mask (rows of different lengths) more still. A decode
step's attention is tiny (SmolLM2: 9 query heads over 3 key heads, ~100 keys), so plain
matmuls do it in a fraction of the time. The query heads that share a key head are stacked, so
keys and values are read once, never repeated per head. Prompts (queries longer than one token)
keep transformers' SDPA path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "signalgraph_decode"


def decode_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (rows, heads, 1, dim); key, value (rows, key heads, keys, dim); attention_mask None or
    additive (rows, 1, 1, keys). Returns (rows, 1, heads, dim), as transformers' attention functions do."""
    if query.shape[2] != 1 or (dropout and module.training) or (attention_mask is not None and attention_mask.dtype == torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    key_heads = key.shape[1]
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(rows, key_heads, heads // key_heads, dim)  # head h reads key head h // group
    scores = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scale)  # (rows, key heads, group, keys)
    if attention_mask is not None:
        scores.add_(attention_mask)  # (rows, 1, 1, keys): the same for every head
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # (rows, key heads, group, dim)
    return out.reshape(rows, 1, heads, dim), None


AttentionInterface.register(NAME, decode_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # prompts are masked as for SDPA, which runs them


def use_decode_attention(model) -> bool:
    """Switch `model` (a transformers model of its own, e.g. the decode copy) to this attention,
    where it uses SDPA now; True if it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
