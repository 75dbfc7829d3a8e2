"""Attention for the scheduler's packed steps, and for decode steps as two small matmuls on a CPU.

A scheduler step packs one token for each decoding row and the whole new part of each joining
row's prompt into one sequence (`step_layout`, models/decoding/row_cache.py), so that a prompt
is computed inside the step instead of stalling it with a forward of its own. Its linear layers
see one matrix of tokens; only attention has to tell the rows apart, and it does here:

- decoding rows: one query each over its own row of the cache, padding masked. PyTorch's fused
  attention on a CPU is built for long queries: for one query token it spends its time setting up
  blocks, and with a padding mask more still. A decode step's attention is tiny (SmolLM2: 9 query
  heads over 3 key heads, ~100 keys), so plain matmuls do it in a fraction of the time. The query
  heads that share a key head are stacked, so keys and values are read once, never repeated per head.
- joining rows: each prompt's queries over its own keys through transformers' SDPA, causal, as a
  lone prefill runs them.

Calls without a layout (a model's own `generate`) take the matmuls for one-token queries and SDPA
for prompts.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "signalgraph_decode"


def decode_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, step_layout=None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (rows, heads, queries, dim); key, value (rows, key heads, keys, dim). Returns
    (rows, queries, heads, dim), as transformers' attention functions do. With a `step_layout`
    the query is one packed row (1, heads, tokens, dim), the keys are the whole cache and
    attention_mask is the decoding rows' additive mask (rows, 1, 1, keys)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if step_layout is not None:
        return _packed_step(module, query, key, value, attention_mask, scale, step_layout), None
    boolean_mask = attention_mask is not None and attention_mask.dtype == torch.bool
    if query.shape[2] != 1 or (dropout and module.training) or boolean_mask:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _one_query_per_row(query, key, value, attention_mask, scale)[:, None], None


def _one_query_per_row(query, key, value, attention_mask, scale) -> torch.Tensor:
    """query (rows, heads, 1, dim) over each row's keys; returns (rows, heads, dim)."""
    rows, heads, _, dim = query.shape
    key_heads = key.shape[1]
    grouped = query.reshape(rows, key_heads, heads // key_heads, dim)  # head h reads key head h // group
    scores = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scale)  # (rows, key heads, group, keys)
    if attention_mask is not None:
        scores.add_(attention_mask)  # (rows, 1, 1, keys): the same for every head
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # (rows, key heads, group, dim)
    return out.reshape(rows, heads, dim)


def _packed_step(module, query, key, value, attention_mask, scale, layout) -> torch.Tensor:
    _, heads, tokens, dim = query.shape
    out = query.new_empty(1, tokens, heads, dim)
    rows = layout.decoding
    if rows:
        mine = query[0, :, :rows].transpose(0, 1)[:, :, None]  # (rows, heads, 1, dim)
        out[0, :rows] = _one_query_per_row(mine, key[:rows], value[:rows], attention_mask, scale)
    for row, joining in enumerate(layout.joining, start=rows):
        queries = slice(joining.start, joining.start + joining.new)
        keys = slice(key.shape[2] - joining.length, None)  # the row's own columns, ending in the step's
        causal = None  # a whole prompt: SDPA's own causal path, as in a lone prefill
        if joining.reused:  # new positions after reused ones: position i sees keys up to reused + i
            causal = (torch.arange(joining.length, device=query.device)[None]
                      <= torch.arange(joining.reused, joining.length, device=query.device)[:, None])[None, None]
        attended, _ = sdpa_attention_forward(module, query[:, :, queries], key[row:row + 1, :, keys],
                                             value[row:row + 1, :, keys], causal, scaling=scale)
        out[0, queries] = attended[0]
    return out


AttentionInterface.register(NAME, decode_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # prompts are masked as for SDPA, which runs them


def use_decode_attention(model) -> bool:
    """Switch `model` (a transformers model of its own, e.g. the decode copy) to this attention,
    where it uses SDPA or eager attention now; True if it runs this attention."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    return getattr(config, "_attn_implementation", None) == NAME
