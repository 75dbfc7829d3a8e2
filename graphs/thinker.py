"""The think step: prompt the backbone, decode (constrained inside tool calls), split what it wrote.

`Thinker` is the seam between the graph and the model. `BackboneThinker` is the real one; a
scripted thinker (tests) returns canned outputs so routing can be tested on its own.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from langchain_core.messages import AnyMessage

from graphs.prompting import prompts, to_chat
from models.errors import SignalgraphError


@dataclass
class ThinkResult:
    text: str  # what the user sees: markers removed
    tool_calls: list[dict] = field(default_factory=list)  # {"id", "name", "args"}
    # {"modality", "key", "error"}: key into the ConditioningCache, or None with the reason
    spans: list[dict] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # errors of tool calls that could not be repaired
    raw: str = ""  # what the backbone wrote, markers included
    prompt_tokens: int = 0  # what this round cost the backbone, as counted by the backbone
    completion_tokens: int = 0
    truncated: bool = False  # it stopped at the token limit


class Thinker(Protocol):
    def think(self, messages: list[AnyMessage], *, tools: list[dict], passages: list[dict],
              media: list[dict], on_text: Callable[[str], None] | None = None,
              require_tool: bool = False, max_new_tokens: int | None = None) -> ThinkResult: ...


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


def _signature(tool: dict) -> str:
    properties = tool["parameters"].get("properties", {})
    required = set(tool["parameters"].get("required", []))
    args = [name if name in required else f"{name}={json.dumps(spec.get('default'))}"
            for name, spec in properties.items()]
    return f"{tool['name']}({', '.join(args)})"


def system_prompt(tools: list[dict], media: list[dict]) -> str:
    """The backbone's system turn: who it is, its tools, the attachments. (Its own skills are not
    listed: the shipped weights were trained without that line, and right-tool fell from 69.0% to
    58.6% of held-out requests with it; the controller answers "what can you do?" itself.)"""
    parts = [prompts()["system"].strip()]
    if tools:
        # signatures, not JSON schemas: small models copy schema descriptions into their arguments
        listing = "\n".join(f"- {_signature(t)}: {t['description']}" for t in tools)
        parts.append(prompts()["tools"].format(tools=listing).strip())
    if media:
        listing = ", ".join(f"{m['id']} ({m['kind']})" for m in media)
        parts.append(prompts()["attachments"].format(media=listing).strip())
    return "\n\n".join(parts)


def render_prompt(messages: list[AnyMessage], *, tools: list[dict], passages: list[dict],
                  media: list[dict]) -> list[dict]:
    """The chat the backbone reads in a think step. Training data in the controller's format is
    rendered by this same function, so what is trained is exactly what is served."""
    chat, _ = to_chat(messages, system_prefix=system_prompt(tools, media), plain_tool_results=True)
    return with_passages(chat, passages)


def with_passages(chat: list[dict], passages: list[dict]) -> list[dict]:
    """The retrieved notes after the last user turn's words, where small models look, not in the
    system prompt."""
    if not passages:
        return chat
    last = max(i for i, m in enumerate(chat) if m["role"] == "user")
    listing = "\n".join(f"[{p['source']}#{p['position']}] {p['text']}" for p in passages)
    chat[last] = {**chat[last], "content": chat[last]["content"] + "\n\n"
                  + prompts()["passages"].format(passages=listing).strip()}
    return chat


class BackboneThinker:
    """The MM-LLM as the controller's brain."""

    def __init__(self, mm, cache: ConditioningCache, *, max_new_tokens: int | None = None):
        self.mm = mm
        self.cache = cache
        self.max_new_tokens = max_new_tokens

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

    def think(self, messages, *, tools, passages, media, on_text=None, require_tool=False,
              max_new_tokens=None) -> ThinkResult:
        from graphs.signal_parser import SignalParser, TextDelta, parse_message
        from models.decoding.constrained import ToolCallConstraint
        from models.decoding.streaming import BothStreamers, RepeatedCallStop, TokenStreamer

        chat = render_prompt(messages, tools=tools, passages=passages, media=media)
        backbone = self.mm.backbone
        processors = [ToolCallConstraint(
            backbone.tokenizer, tools, force_tool_call=require_tool,
            vocab_size=backbone.input_embeddings().weight.shape[0],
            banned_token_ids=backbone.new_token_ids,  # no placeholders or signal tokens inside a call
        )] if tools else []
        streamer = None
        if on_text is not None:
            parser = SignalParser(self._signal_strings())
            tokenizer = self.mm.backbone.tokenizer
            streamer = TokenStreamer(lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                                     {tokenizer.eos_token_id, tokenizer.pad_token_id},
                                     lambda chunk: [on_text(e.text) for e in parser.feed(chunk)
                                                    if isinstance(e, TextDelta)])
        repeat = RepeatedCallStop(self.mm.backbone.tokenizer)
        streamer = BothStreamers(streamer, repeat) if streamer else repeat
        readable = self._readable(media)
        generation = self.mm.generate(chat, images=readable.get("image"), audios=readable.get("audio"),
                                      max_new_tokens=max_new_tokens or self.max_new_tokens,
                                      logits_processors=processors,
                                      streamer=streamer, stopping_criteria=[repeat])
        parsed = parse_message(_drop_cut_call(generation.text))
        calls = [{"id": c.id, "name": c.name, "args": c.arguments} for c in parsed.tool_calls]
        spans = [{"modality": s.modality, "key": self.cache.put(s.conditioning) if s.conditioning else None,
                  "error": s.error} for s in generation.spans]
        return ThinkResult(parsed.text.strip(), calls, spans, [m.error for m in parsed.malformed], generation.text,
                           generation.prompt_tokens, generation.generated_tokens, generation.truncated)

    def skills(self) -> list[str]:
        """The model's own trained skills, in words (graphs/capabilities.py)."""
        from graphs.capabilities import SKILL_WORDS

        return [words for (side, modality), words in SKILL_WORDS.items() if self.mm.has_trained(side, modality)]

    def _signal_strings(self) -> dict[str, list[str]]:
        tok = self.mm.backbone.tokenizer
        return {m: tok.convert_ids_to_tokens(ids) for m, ids in self.mm.backbone.signal_ids.items()}


def _drop_cut_call(text: str) -> str:
    """A tool call still open when the token limit hit was cut off, not written wrongly: drop it."""
    start = text.rfind("<tool_call>")
    return text[:start] if start != -1 and "</tool_call>" not in text[start:] else text


def generate_media(mm, modality: str, conditioning: dict) -> tuple[bytes, str, dict]:
    """The output projector's generator on a signal span's conditioning: (bytes, suffix, meta)."""
    import io

    generator = mm.generator(modality)
    batch = {name: tensor.unsqueeze(0) for name, tensor in conditioning.items()}
    buffer = io.BytesIO()
    if modality == "image":
        generator.generate(batch)[0].save(buffer, format="PNG")
        return buffer.getvalue(), ".png", {"via": "output projector"}
    import soundfile

    soundfile.write(buffer, generator.generate(batch)[0], generator.sample_rate, format="WAV")
    return buffer.getvalue(), ".wav", {"via": "output projector"}
