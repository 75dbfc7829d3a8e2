"""Output projectors: signal-token hidden states -> a generator's conditioning.

A generator declares the conditioning it reads as named shapes, e.g. Stable Diffusion's
`{"prompt_embeds": (77, 768)}` or AudioLDM-2's two sequences. An output projector has one head
per name and maps the (n_signal, d_llm) hidden states of one signal span to each shape.

- `mlp`          per-token MLP to the target width, then a learned mix of the n signal tokens
                 into the target length (cheap; what NExT-GPT calls the linear variant)
- `transformer`  learnable target-length queries decode over the signal states (NExT-GPT's
                 and GILL's transformer output projector)
"""

from __future__ import annotations

import torch
from torch import nn

from models.errors import ConfigError
from models.input_projectors import fit_heads
from models.specs import OutputProjectorSpec


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, n_signal: int, length: int, width: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, width))
        # (length, n_signal): each output position is a learned mixture of the signal tokens
        self.mix = nn.Parameter(torch.full((length, n_signal), 1.0 / n_signal))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ln,bnd->bld", self.mix, self.mlp(states))


class TransformerHead(nn.Module):
    def __init__(self, in_dim: int, length: int, width: int, hidden: int, layers: int, heads: int):
        super().__init__()
        heads = fit_heads(hidden, heads)
        self.input = nn.Linear(in_dim, hidden)
        self.queries = nn.Parameter(torch.randn(length, hidden) * 0.02)
        layer = nn.TransformerDecoderLayer(hidden, heads, dim_feedforward=4 * hidden, batch_first=True,
                                           norm_first=True, dropout=0.0)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        memory = self.input(states)
        queries = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        return self.output(self.decoder(queries, memory))


class OutputProjector(nn.Module):
    def __init__(self, spec: OutputProjectorSpec, in_dim: int, n_signal: int,
                 shapes: dict[str, tuple[int, int]]):
        super().__init__()
        if not shapes:
            raise ConfigError("an output projector needs at least one conditioning shape from its generator")
        self.shapes = dict(shapes)
        self.n_signal = n_signal
        heads = {}
        for name, (length, width) in shapes.items():
            if spec.type == "mlp":
                heads[name] = MLPHead(in_dim, n_signal, length, width, spec.hidden)
            else:
                heads[name] = TransformerHead(in_dim, length, width, spec.hidden, spec.layers, spec.heads)
        self.heads = nn.ModuleDict(heads)

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, n_signal, d_llm) -> {name: (B, length, width)}."""
        if states.dim() != 3 or states.shape[1] != self.n_signal:
            raise ValueError(f"expected signal states (B, {self.n_signal}, d), got {tuple(states.shape)}")
        return {name: head(states) for name, head in self.heads.items()}


def alignment_loss(predicted: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """NExT-GPT's decoding-side alignment: MSE to the generator's own text-encoder output."""
    losses = [nn.functional.mse_loss(predicted[name], target[name].to(predicted[name])) for name in predicted]
    return torch.stack(losses).mean()
