"""The think step: prompt the backbone, decode (constrained inside tool calls), split what it wrote.

`Thinker` is the seam between the graph and the model. `BackboneThinker` is the real one; a
scripted thinker (tests) returns canned outputs so routing can be tested on its own.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable, Protocol

import yaml
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage, ToolMessage

from models.errors import SignalgraphError

PROMPTS = Path(__file__).with_name("prompts.yaml")


@cache
def prompts() -> dict[str, str]:
    return yaml.safe_load(PROMPTS.read_text())


@dataclass
class ThinkResult:
    text: str  # what the user sees: markers removed
    tool_calls: list[dict] = field(default_factory=list)  # {"id", "name", "args"}
    # {"modality", "key", "error"}: key into the ConditioningCache, or None with the reason
    spans: list[dict] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # errors of tool calls that could not be repaired
    raw: str = ""  # what the backbone wrote, markers included


class Thinker(Protocol):
    def think(self, messages: list[AnyMessage], *, tools: list[dict], passages: list[dict],
              media: list[dict], on_text: Callable[[str], None] | None = None,
              require_tool: bool = False) -> ThinkResult: ...


class ConditioningCache:
    """Signal-span conditioning tensors, kept in memory under small keys that state can hold."""

    def __init__(self, size: int = 64):
        self._items: OrderedDict[str, dict] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def put(self, conditioning: dict) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = conditioning
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._items.get(key)


def render_tool_call(call: dict) -> str:
    return "<tool_call>" + json.dumps({"name": call["name"], "arguments": call["args"]}) + "</tool_call>"


def to_chat(messages: list[AnyMessage]) -> list[dict]:
    """LangChain messages -> chat-template dicts in the signal protocol's own notation."""
    chat = []
    for message in messages:
        if isinstance(message, SystemMessage):
            chat.append({"role": "system", "content": message.text})
        elif isinstance(message, HumanMessage):
            chat.append({"role": "user", "content": message.text})
        elif isinstance(message, AIMessage):
            content = message.text + "".join(render_tool_call(c) for c in message.tool_calls)
            chat.append({"role": "assistant", "content": content})
        elif isinstance(message, ToolMessage):
            # small chat models know no "tool" role; a tagged user turn reads the same to them
            chat.append({"role": "user", "content": f"<tool_response>{message.text}</tool_response>"})
    return chat


def system_prompt(tools: list[dict], passages: list[dict], media: list[dict]) -> str:
    parts = [prompts()["system"].strip()]
    if tools:
        listing = "\n".join(f"- {t['name']}: {t['description']} Arguments: {json.dumps(t['parameters'].get('properties', {}))}"
                            for t in tools)
        parts.append(prompts()["tools"].format(tools=listing).strip())
    if passages:
        listing = "\n".join(f"[{p['source']}#{p['position']}] {p['text']}" for p in passages)
        parts.append(prompts()["passages"].format(passages=listing).strip())
    if media:
        parts.append(prompts()["attachments"].format(media=", ".join(f"{m['id']} ({m['kind']})" for m in media)).strip())
    return "\n\n".join(parts)


class BackboneThinker:
    """The MM-LLM as the controller's brain."""

    def __init__(self, mm, cache: ConditioningCache, *, max_new_tokens: int | None = None):
        self.mm = mm
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()  # one generation at a time per model

    def _readable(self, media: list[dict]) -> dict[str, list]:
        """Media the backbone can read directly: only through trained input projectors."""
        from models.media import load_audio, load_image

        loaders = {"image": lambda p: load_image(p, self.mm.profile.limits),
                   "audio": lambda p: load_audio(p, self.mm.profile.limits)}
        readable: dict[str, list] = {}
        for item in media:
            kind = item["kind"]
            if kind not in loaders:
                continue
            try:
                self.mm.input_projector(kind)
            except SignalgraphError:  # no encoder or no trained projector: the tools handle it
                continue
            readable.setdefault(kind, []).append(loaders[kind](item["path"]))
        return readable

    def think(self, messages, *, tools, passages, media, on_text=None, require_tool=False) -> ThinkResult:
        from graphs.signal_parser import SignalParser, TextDelta, parse_message
        from models.constrained_decoding import ToolCallConstraint

        chat = [{"role": "system", "content": system_prompt(tools, passages, media)}, *to_chat(messages)]
        processors = [ToolCallConstraint(self.mm.backbone.tokenizer, tools, force_tool_call=require_tool)] \
            if tools else []
        streamer = None
        if on_text is not None:
            parser = SignalParser(self._signal_strings())
            streamer = _TextStreamer(self.mm.backbone.tokenizer, lambda chunk: [
                on_text(e.text) for e in parser.feed(chunk) if isinstance(e, TextDelta)])
        with self._lock:
            readable = self._readable(media)
            generation = self.mm.generate(chat, images=readable.get("image"), audios=readable.get("audio"),
                                          max_new_tokens=self.max_new_tokens, logits_processors=processors,
                                          streamer=streamer)
        parsed = parse_message(generation.text)
        calls = [{"id": c.id, "name": c.name, "args": c.arguments} for c in parsed.tool_calls]
        spans = [{"modality": s.modality, "key": self.cache.put(s.conditioning) if s.conditioning else None,
                  "error": s.error} for s in generation.spans]
        return ThinkResult(parsed.text.strip(), calls, spans, [m.error for m in parsed.malformed], generation.text)

    def _signal_strings(self) -> dict[str, list[str]]:
        tok = self.mm.backbone.tokenizer
        return {m: tok.convert_ids_to_tokens(ids) for m, ids in self.mm.backbone.signal_ids.items()}


class _TextStreamer:
    """A transformers streamer that hands decoded text deltas to a callback as tokens arrive."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.callback = callback
        self.stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_skipped = False

    def put(self, value) -> None:
        if not self.prompt_skipped:  # generate() first passes the prompt (empty with inputs_embeds)
            self.prompt_skipped = True
            return
        self.ids += [i for i in value.flatten().tolist() if i not in self.stop]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.callback(text[self.sent:])
        self.sent = len(text)

    def end(self) -> None:
        pass
