"""How fast decoding could go if reading the weights were all it did: the memory limit.

Decoding one token at batch 1 reads every weight the step uses once, so no engine passes
`read bandwidth / bytes read per token` tokens a second on a machine. Both halves are measured in
the run that uses them: the bandwidth by summing a buffer far larger than the caches (the best of
a few tries: a limit is what the machine can do, not what it did on average), the bytes from the
model the step runs.
"""

from __future__ import annotations

import time
from itertools import chain

import torch
from torch import nn


def read_bandwidth(megabytes: int = 512, tries: int = 5) -> float:
    """Bytes a second this process reads from memory with all its threads (the best of `tries`)."""
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    buffer.sum()  # pages touched once, threads started
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def bytes_per_token(model: nn.Module) -> int:
    """The bytes of weights one decode step reads: every parameter and buffer once, except the input
    embedding table, of which a step reads one row, unless the output layer reads it too (tied)."""
    embedding = model.get_input_embeddings().weight
    output = getattr(model.get_output_embeddings(), "weight", None)
    tied = output is not None and output.data_ptr() == embedding.data_ptr()
    seen, total = set(), 0
    for tensor in chain(model.parameters(), model.buffers()):
        key = _storage(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    if not tied:
        total -= embedding.numel() * embedding.element_size()
    return total


def _storage(tensor: torch.Tensor) -> int:
    """What tells shared weights apart: their data pointer, or for an opaque tensor (oneDNN's packed
    weights have no plain storage) the tensor itself."""
    return id(tensor) if tensor.is_mkldnn else tensor.data_ptr()


def limit_row(rate: float, model: nn.Module, bandwidth: float) -> dict:
    """The fields a decode row gains: the memory limit of `model` and how near `rate` comes to it."""
    read = bytes_per_token(model)
    limit = bandwidth / read
    return {"memory_limit_tokens_s": round(limit, 1), "of_memory_limit": round(rate / limit, 3),
            "bytes_per_token_mb": round(read / 1e6, 1), "read_bandwidth_gb_s": round(bandwidth / 1e9, 1)}
