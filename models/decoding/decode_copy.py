"""The model the scheduler decodes with: LoRA merged into the weights, linear layers packed for
the CPU (models/decoding/packed_linear.py), running the scheduler's packed-step attention
(models/decoding/decode_attention.py), and optionally another dtype.

A peft model computes each adapted layer as x·W + (x·A)·B, which on a CPU costs more than the
layer itself (SmolLM2 with r=8 adapters on q/k/v/o decodes about 2.7x slower than without). The
decode copy folds B·A into W once, in a module tree that shares the model's other weights (a
merge writes only into the adapted layers and the embedding). On a CPU in fp32 its linear layers
then hold their weights packed, a second copy of them that makes a batch of rows cheap. A copy
in another dtype (bf16, which agent/bench/decode.py measures against fp32) is a full copy.

A copy is rebuilt when any of the model's weights change in place (training steps, loading
adapters): tensors count their in-place writes, and the sum of those counts is the copy's key.
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
from torch import nn

from models.decoding.decode_attention import NAME, use_decode_attention
from models.decoding.packed_linear import pack_linears, packable

_copies: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_views: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def weights_version(model: nn.Module) -> int:
    """A number that changes whenever one of the model's weights is written in place."""
    return sum(p._version for p in model.parameters())


def decode_model(model: nn.Module, dtype: torch.dtype | None = None, *, version: int | None = None) -> nn.Module:
    """The model to decode with: LoRA merged, in `dtype` if given, linears packed for the CPU
    where they can be; the model itself when none of that applies. `version` is
    `weights_version(model)` where the caller has it already."""
    current = next(model.parameters()).dtype
    target = dtype or current
    merge = hasattr(model, "merge_and_unload")
    pack = packable(torch.empty(0, dtype=target, device=next(model.parameters()).device))
    if not merge and target == current and not pack:
        return model
    key = weights_version(model) if version is None else version
    with _lock:
        copies = _copies.setdefault(model, {})
        cached = copies.get(target)
        if cached is None or cached[0] != key:
            copies.clear()  # copies of older weights are stale
            built = _merged_copy(model) if merge else _shared_copy(model)
            if target != current:  # a full copy: casting in place would cast the shared weights too
                built = copy.deepcopy(built).to(target)
            if pack:
                built = pack_linears(built)
            use_decode_attention(built)
            cached = copies[target] = (key, built)
        return cached[1]


def attention_view(model: nn.Module) -> nn.Module:
    """`model` if it runs the decode attention, else a module tree over the same weights that does
    (the scheduler's packed steps need it), made once per model; the model itself is left as it is."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        return model
    with _lock:
        view = _views.get(model)
        if view is None:
            view = _shared_copy(model)
            if not use_decode_attention(view):
                raise TypeError(f"the decode scheduler needs a transformers model with SDPA or eager attention, got "
                                f"{type(model).__name__} with {getattr(model.config, '_attn_implementation', None)!r}")
            _views[model] = view
        return view


def _shared_copy(model: nn.Module) -> nn.Module:
    """A module tree of its own over the same weights, whose layers can be swapped."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def _merged_copy(model: nn.Module) -> nn.Module:
    params = list(model.named_parameters(remove_duplicate=False))
    # a weight a merge writes into (an adapted layer's base, or the same tensor tied elsewhere) is copied
    written = {id(p) for name, p in params if "base_layer" in name or p.requires_grad}
    shared = {id(p): p for _, p in params if id(p) not in written}
    merged = copy.deepcopy(model, memo=shared).merge_and_unload()
    merged.train(model.training)
    return merged
