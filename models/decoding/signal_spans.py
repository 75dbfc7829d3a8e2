"""Keep signal spans whole while decoding: once the model writes [IMG0], [IMG1].. follow.

A small model may stop a span half way or write [IMG2] out of order; the output projector
reads exactly n signal states, so a broken span would be useless. This processor forces the
rest of a started span and forbids starting one anywhere but at its first token.
"""

from __future__ import annotations

import torch


class SignalSpanProcessor:
    def __init__(self, signal_ids: dict[str, list[int]]):
        self.next_of: dict[int, int] = {}
        inner: list[int] = []
        for ids in signal_ids.values():
            self.next_of |= dict(zip(ids[:-1], ids[1:]))
            inner += ids[1:]
        self.inner = torch.tensor(inner, dtype=torch.long)  # made once: it is applied at every step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.next_of:
            return scores
        if len(self.inner):
            scores[:, self.inner.to(scores.device)] = float("-inf")
        if input_ids.shape[1] == 0:
            return scores
        for row, last in enumerate(input_ids[:, -1].tolist()):
            forced = self.next_of.get(last)
            if forced is not None:
                scores[row] = float("-inf")
                scores[row, forced] = 0.0
        return scores
