"""Keys and values of finished rows, kept by token ids, so that a prompt that starts the same way
(the next turn of a session, the next think round of a turn) prefills only what is new.

An entry holds the prompt and the answer as the model saw them. A new prompt reuses the longest
prefix it shares with any entry; the key stops at the first position that held spliced media
features (their ids say nothing of the features). Entries are dropped oldest-first beyond
`max_tokens` tokens in all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), (1, heads, n, head_dim)


def token_prefix(token_ids: list[int] | None) -> tuple[int, ...]:
    """The ids up to the first position that is not a token (spliced features are negative)."""
    if not token_ids:
        return ()
    end = next((i for i, t in enumerate(token_ids) if t < 0), len(token_ids))
    return tuple(token_ids[:end])


class PrefixCache:
    def __init__(self, max_tokens: int = 4096, min_reuse: int = 16):
        self.max_tokens = max_tokens
        self.min_reuse = min_reuse  # shorter shared prefixes are not worth the copy
        self._entries: OrderedDict[tuple[int, ...], Layers] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "reused_tokens": 0}

    def lookup(self, ids: tuple[int, ...], limit: int) -> tuple[int, Layers | None]:
        """(n, layers cut to n) for the longest stored prefix of `ids`, n <= limit; (0, None) if none."""
        best, best_key = 0, None
        with self._lock:
            for key in self._entries:
                n = _shared(key, ids, limit)
                if n > best:
                    best, best_key = n, key
            if best < self.min_reuse:
                self.stats["misses"] += 1
                return 0, None
            self._entries.move_to_end(best_key)
            layers = [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]
            self.stats["hits"] += 1
            self.stats["reused_tokens"] += best
        return best, layers

    def clear(self) -> None:
        """Forget every entry (the model's weights changed, so its keys and values no longer hold)."""
        with self._lock:
            self._entries.clear()
            self._tokens = 0

    def store(self, ids: tuple[int, ...], layers: Layers) -> None:
        if len(ids) < self.min_reuse or len(ids) > self.max_tokens:
            return
        with self._lock:
            if ids in self._entries:
                self._entries.move_to_end(ids)
                return
            self._entries[ids] = layers
            self._tokens += len(ids)
            while self._tokens > self.max_tokens:
                old, _ = self._entries.popitem(last=False)
                self._tokens -= len(old)


def _shared(a: tuple[int, ...], b: tuple[int, ...], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
