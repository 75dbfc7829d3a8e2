"""Linear layers with their weights packed for oneDNN, for decoding on a CPU in fp32.

Decoding multiplies a few rows by each weight matrix, so a step is bound by reading the weights
from memory. MKL's fp32 matmul (what nn.Linear runs on a CPU) reads them well for one row but
took 2.1x as long for 8 rows as for 1 on SmolLM2 here; the same step with weights packed in
oneDNN's blocked layout took 1.3x as long, so a batch of sessions costs little more than one.
The packed path is PyTorch's own (the kernels torch.compile uses for frozen CPU linears); where
it is missing, layers stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

BATCH_HINT = 8  # the row count the packing is tuned for; any count works


def packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available())


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` (in place) by a PackedLinear of the same weights."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child))
    return model
