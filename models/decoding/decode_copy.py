"""The model the scheduler decodes with: LoRA merged into the weights, and optionally another dtype.

A peft model computes each adapted layer as x·W + (x·A)·B, which on a CPU costs more than the
layer itself (SmolLM2 with r=8 adapters on q/k/v/o decodes about 2.7x slower than without). The
decode copy folds B·A into W once. It shares every frozen weight outside the adapted layers with
the model (the MLPs, norms), so it costs only the adapted layers and the embedding; a copy in
another dtype (bf16, which agent/bench_decode.py measures against fp32) is a full copy.

A copy is rebuilt when any of the model's weights change in place (training steps, loading
adapters): tensors count their in-place writes, and the sum of those counts is the copy's key.
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
from torch import nn

_copies: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def decode_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A merged copy of a peft model (else the model itself), in `dtype` if given."""
    current = next(model.parameters()).dtype
    if not hasattr(model, "merge_and_unload") and dtype in (None, current):
        return model
    key = sum(p._version for p in model.parameters())
    with _lock:
        copies = _copies.setdefault(model, {})
        cached = copies.get(dtype)
        if cached is None or cached[0] != key:
            copies.clear()  # copies of older weights are stale
            built = _merged_copy(model) if hasattr(model, "merge_and_unload") else model
            if dtype not in (None, current):  # a full copy: casting in place would cast the shared weights too
                built = copy.deepcopy(built).to(dtype)
            cached = copies[dtype] = (key, built)
        return cached[1]


def _merged_copy(model: nn.Module) -> nn.Module:
    params = list(model.named_parameters(remove_duplicate=False))
    # a weight a merge writes into (an adapted layer's base, or the same tensor tied elsewhere) is copied
    written = {id(p) for name, p in params if "base_layer" in name or p.requires_grad}
    shared = {id(p): p for _, p in params if id(p) not in written}
    merged = copy.deepcopy(model, memo=shared).merge_and_unload()
    merged.train(model.training)
    return merged
