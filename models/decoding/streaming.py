"""What runs beside `generate()` while the backbone decodes: streamers that hand text out as tokens
arrive, logits processors that end or steer decoding, and a stop when a tool call repeats."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class ForceEos:
    """Ends generation once a stop string was written or the consumer went away."""

    def __init__(self, tokenizer, eos_id: int, stops: list[str], cancel: threading.Event):
        self.tokenizer, self.eos_id, self.stops, self.cancel = tokenizer, eos_id, stops, cancel
        self.window = max((len(s) for s in stops), default=0) + 4

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            done = self.cancel.is_set()
            if not done and self.stops and input_ids.shape[1]:
                tail = self.tokenizer.decode(input_ids[row, -self.window:].tolist(), skip_special_tokens=False)
                done = any(s in tail for s in self.stops)
            if done:
                scores[row] = float("-inf")
                scores[row, self.eos_id] = 0.0
        return scores


class BanTokens:
    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.ids] = float("-inf")
        return scores


class StopFilter:
    """Cuts text at the first stop string; holds back what might be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
            return out
        hold = 0
        if not final:
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.buffer)), hold, -1):
                    if self.buffer.endswith(s[:k]):
                        hold = k
                        break
        out, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return out


class TokenStreamer:
    """A transformers streamer: decoded text deltas to a callback as tokens arrive. Trailing stop
    or pad tokens are held back, so the deltas add up to the decode of the final ids."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: set[int], callback: Callable[[str], None]):
        self.decode, self.stop_ids, self.callback = decode, stop_ids, callback
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_skipped = False

    def put(self, value) -> None:
        if not self.prompt_skipped:  # generate() first passes the prompt (empty with inputs_embeds)
            self.prompt_skipped = True
            return
        self.ids += value.flatten().tolist()
        self._emit()

    def _emit(self, final: bool = False) -> None:
        ids = list(self.ids)
        while ids and ids[-1] in self.stop_ids:
            ids.pop()
        text = self.decode(ids)
        if not final and text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.callback(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        self._emit(final=True)


class RepeatedCallStop:
    """Stops decoding once the model repeats a tool call it already wrote, word for word.

    Small models loop on a call until the token limit; the repeat would run once anyway.
    Fed as a streamer (to see the text) and asked as a stopping criterion.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.first = True
        self.stop = False

    def put(self, value) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        self.ids += value.flatten().tolist()
        if value.numel() and self.tokenizer.decode(value.flatten().tolist()[-1:]).endswith(">"):
            text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
            calls = [c for c in text.split("</tool_call>")[:-1] if "<tool_call>" in c]
            bodies = [c[c.index("<tool_call>"):].replace(" ", "").replace("\n", "") for c in calls]
            self.stop = len(bodies) != len(set(bodies))

    def end(self) -> None:
        pass

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.stop, dtype=torch.bool, device=input_ids.device)


class BothStreamers:
    """Two streamers as one."""

    def __init__(self, *streamers):
        self.streamers = streamers

    def put(self, value) -> None:
        for s in self.streamers:
            s.put(value)

    def end(self) -> None:
        for s in self.streamers:
            s.end()
