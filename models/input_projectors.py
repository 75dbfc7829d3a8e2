"""Input projectors: encoder features -> the LLM's embedding space, built from a short string.

- `linear`       one linear map per token (the first LLaVA)
- `mlpNx_gelu`   N linear layers with GELU between them (LLaVA-1.5 uses mlp2x_gelu)
- `resampler`    learnable queries cross-attend to the features (Perceiver Resampler /
                 Q-Former style); `resampler:Q` sets Q queries. The output length is Q, whatever
                 the input length, which keeps long videos and audio cheap for the LLM.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from models.errors import ConfigError


class Resampler(nn.Module):
    """Learnable queries that attend to [features; queries], Flamingo's Perceiver Resampler."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, layers: int = 2, heads: int = 8):
        super().__init__()
        heads = fit_heads(out_dim, heads)
        self.input = nn.Linear(in_dim, out_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "norm_q": nn.LayerNorm(out_dim),
                "norm_kv": nn.LayerNorm(out_dim),
                "attn": nn.MultiheadAttention(out_dim, heads, batch_first=True),
                "mlp": nn.Sequential(nn.LayerNorm(out_dim), nn.Linear(out_dim, 4 * out_dim), nn.GELU(),
                                     nn.Linear(4 * out_dim, out_dim)),
            })
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(out_dim)
        self.num_queries = num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.input(features)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            query = block["norm_q"](q)
            context = block["norm_kv"](torch.cat([x, q], dim=1))
            q = q + block["attn"](query, context, context, need_weights=False)[0]
            q = q + block["mlp"](q)
        return self.norm(q)


def fit_heads(dim: int, heads: int) -> int:
    """The largest head count <= `heads` that divides `dim` (tiny test models have odd sizes)."""
    while dim % heads:
        heads -= 1
    return heads


def build_input_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if match := re.fullmatch(r"mlp(\d+)x_gelu", kind):
        depth = int(match.group(1))
        if depth < 1:
            raise ConfigError(f"input projector {kind!r}: depth must be at least 1")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    if match := re.fullmatch(r"resampler(?::(\d+))?", kind):
        queries = int(match.group(1) or 32)
        if queries < 1:
            raise ConfigError(f"input projector {kind!r}: needs at least one query")
        return Resampler(in_dim, out_dim, num_queries=queries)
    raise ConfigError(
        f"unknown input projector {kind!r}; use linear, mlp2x_gelu (any mlpNx_gelu), resampler or resampler:Q"
    )


def projected_length(projector: nn.Module, input_tokens: int) -> int:
    """How many LLM embeddings one item with `input_tokens` encoder tokens becomes."""
    return projector.num_queries if isinstance(projector, Resampler) else input_tokens
