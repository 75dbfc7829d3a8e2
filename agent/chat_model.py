"""The MM-LLM as a LangChain chat model: invoke, stream, bind_tools, with_structured_output.

    llm = SignalgraphChatModel(profile_name="local")        # loads lazily, once per process
    llm.bind_tools([transcribe, generate_image]).invoke("transcribe audio-1")

What the backbone writes is split by `graphs.signal_parser`: text becomes the message content,
`<tool_call>` blocks become `tool_calls` (or `invalid_tool_calls` when even repair fails),
signal spans are listed in `response_metadata["signal_spans"]`. With tools bound, the tools are
described in the system prompt and `ToolCallConstraint` keeps every tool call inside the tools'
JSON schemas; tool_choice "any"/"required" or a tool's name forces a call.

Decoding is greedy (the MM-LLM's); `temperature` is recorded for tracing only.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict, Field, PrivateAttr

from graphs.prompting import (
    describe_tools,
    resolve_tool_choice,
    template_knows_tool_role,
    to_chat,
    tool_spec,
)
from graphs.signal_parser import (
    MalformedToolCall,
    SignalParser,
    SignalSpanEvent,
    TextDelta,
    ToolCallEvent,
    collect,
)
from models.decoding.streaming import BanTokens, ForceEos, StopFilter, TokenStreamer

_MODELS: dict[tuple[str, bool], Any] = {}
_MODELS_LOCK = threading.Lock()


def load_shared_model(profile_name: str, *, require_trained: bool = True):
    """One MMLLM per (profile, require_trained) per process, loaded on first use."""
    key = (profile_name, require_trained)
    with _MODELS_LOCK:
        if key not in _MODELS:
            from models.mmllm import MMLLM
            from models.profiles import load_profile

            _MODELS[key] = MMLLM.from_profile(load_profile(profile_name), require_trained=require_trained)
        return _MODELS[key]


# --- the chat model ---------------------------------------------------------------------------

class SignalgraphChatModel(BaseChatModel):
    """The Signalgraph MM-LLM backbone as a LangChain chat model."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    profile_name: str = "local"
    """A shipped profile's name or a profile YAML path; loaded on first use, shared per process."""
    mm: Any = Field(default=None, exclude=True)
    """An MMLLM to use instead of loading `profile_name`."""
    model_name: str | None = Field(default=None, alias="model")
    max_tokens: int | None = None
    """New tokens per reply (default: the profile's backbone.max_new_tokens)."""
    temperature: float | None = None
    """Recorded for tracing; decoding is greedy."""
    stop: list[str] | None = None
    streaming: bool = False
    require_trained: bool = True
    """Refuse untrained projectors (the MM-LLM's rule); tests on random tiny models turn it off."""
    constrain_tool_calls: bool = True
    """Mask decoding inside <tool_call> to the bound tools' schemas (xgrammar)."""
    parallel_tool_calls: bool = False
    """Allow several tool calls in one reply. Off: the reply ends after the first call (small
    models otherwise ramble into more calls); the agent loop asks again after the result."""
    allow_signal_spans: bool | None = None
    """Let the backbone write signal spans: None = only for modalities with an output projector
    that can run (trained, or require_trained off); False bans signal tokens."""
    tool_role: Literal["auto", "tool", "user"] = "auto"
    """How tool results enter the prompt: the template's "tool" role, or a tagged user turn."""
    system_prompt: str | None = None
    """Extra system text, before any SystemMessage."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # -- identity --

    @property
    def _llm_type(self) -> str:
        return "signalgraph"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._model_name(), "profile_name": self.profile_name,
                "max_tokens": self.max_tokens, "stop": self.stop,
                "constrain_tool_calls": self.constrain_tool_calls}

    def _model_name(self) -> str:
        return self.model_name or f"signalgraph-{self.profile_name}"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "signalgraph"
        params["ls_model_name"] = kwargs["model"] if isinstance(kwargs.get("model"), str) else self._model_name()
        if self.temperature is not None:
            params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = stops
        return params

    # -- model --

    def load(self):
        """The MMLLM (loaded now if it was not yet)."""
        if self.mm is None:
            with self._lock:
                if self.mm is None:
                    self.mm = load_shared_model(self.profile_name, require_trained=self.require_trained)
        return self.mm

    # -- tools --

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | Any], *,
                   tool_choice: str | dict | bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (anything convert_to_openai_tool takes). tool_choice: None/"auto", "none",
        "any"/"required"/True (must call one), or a tool's name / {"function": {"name": ...}}."""
        specs = [tool_spec(t) for t in tools]
        resolve_tool_choice(specs, tool_choice)  # fail now on an unknown tool name
        return self.bind(tools=specs, tool_choice=tool_choice, **kwargs)

    # -- generation --

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> dict:
        mm = self.load()
        backbone = mm.backbone
        tokenizer = backbone.tokenizer
        tools = [t if isinstance(t, dict) and "parameters" in t and "name" in t else tool_spec(t)
                 for t in kwargs.get("tools") or []]
        callable_tools, mode = resolve_tool_choice(tools, kwargs.get("tool_choice"))
        tool_role = self.tool_role == "tool" or (self.tool_role == "auto" and template_knows_tool_role(tokenizer))
        chat, images = to_chat(messages, system_prefix=self.system_prompt or "",
                               system_suffix=describe_tools(callable_tools, mode) if callable_tools else "",
                               tool_role=tool_role)
        if not any(m["role"] == "user" for m in chat):
            chat.append({"role": "user", "content": ""})  # a prompt of only a system message

        vocab = backbone.model.get_output_embeddings().weight.shape[0]
        eos = tokenizer.eos_token_id
        processors: list = []
        if callable_tools and self.constrain_tool_calls:
            from models.decoding.constrained import ToolCallConstraint

            parallel = kwargs.get("parallel_tool_calls", self.parallel_tool_calls)
            processors.append(ToolCallConstraint(tokenizer, callable_tools, force_tool_call=mode in ("any", "named"),
                                                 parallel_tool_calls=parallel, vocab_size=vocab, stop_token_ids=[eos],
                                                 banned_token_ids=backbone.new_token_ids))
        # media placeholders are inputs only; signal tokens only where a span can be decoded
        banned = list(backbone.placeholder_ids.values())
        banned += [i for m, ids in backbone.signal_ids.items() if not self._spans_allowed(mm, m) for i in ids]
        processors.append(BanTokens(banned))
        stops = list(stop or self.stop or [])
        cancel = threading.Event()
        processors.append(ForceEos(tokenizer, eos, stops, cancel))
        signal_strings = {m: tokenizer.convert_ids_to_tokens(ids) for m, ids in backbone.signal_ids.items()}
        max_new = kwargs.get("max_tokens") or self.max_tokens or mm.profile.backbone.max_new_tokens
        return {"mm": mm, "chat": chat, "images": images, "processors": processors, "stops": stops,
                "cancel": cancel, "max_new_tokens": max_new, "signal_strings": signal_strings,
                "tool_names": [t["name"] for t in callable_tools] if callable_tools else [t["name"] for t in tools],
                "stop_ids": {eos, tokenizer.pad_token_id}}

    def _spans_allowed(self, mm, modality: str) -> bool:
        if self.allow_signal_spans is not None:
            return self.allow_signal_spans
        if modality not in mm.profile.output_projectors:
            return False
        generators = {"image": mm.profile.image_generator, "audio": mm.profile.audio_generator}
        if generators.get(modality) is None:
            return False
        return not mm.require_trained or bool(mm._section(f"output_projectors.{modality}."))

    @staticmethod
    def _decode(tokenizer, ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _run(self, prep: dict, streamer=None):
        mm = prep["mm"]
        # the model's decode scheduler batches this with other threads' generations
        return mm.generate(prep["chat"], images=prep["images"] or None, max_new_tokens=prep["max_new_tokens"],
                           logits_processors=prep["processors"], streamer=streamer)

    def _input_tokens(self, prep: dict) -> int:
        mm = prep["mm"]
        media = {"image": prep["images"]} if prep["images"] else {}
        return len(mm.backbone.chat_ids(mm._prompt(prep["chat"], media)))

    def _finish(self, prep: dict, generation, parsed, output_tokens: int) -> dict:
        """usage_metadata and response_metadata of a reply."""
        input_tokens = self._input_tokens(prep)
        if parsed.tool_calls or parsed.malformed:
            reason = "tool_calls"
        elif output_tokens >= prep["max_new_tokens"]:
            reason = "length"
        else:
            reason = "stop"
        metadata = {"model_name": self._model_name(), "model_provider": "signalgraph", "finish_reason": reason,
                    "signal_spans": [{"modality": s.modality, "index": s.index} for s in parsed.spans]}
        if generation is not None:
            for record, span in zip(metadata["signal_spans"], [s for s in generation.spans]):
                record.update(start=span.start, end=span.end)
        if parsed.malformed:
            metadata["tool_call_errors"] = {m.id: m.error for m in parsed.malformed}
        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                 "total_tokens": input_tokens + output_tokens}
        return {"usage": usage, "metadata": metadata}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
        prep = self._prepare(messages, stop, kwargs)
        generation = self._run(prep)
        tokenizer = prep["mm"].backbone.tokenizer
        text = StopFilter(prep["stops"]).feed(self._decode(tokenizer, generation.token_ids), final=True)
        parser = SignalParser(prep["signal_strings"], tools=prep["tool_names"])
        truncated = len(generation.token_ids) >= prep["max_new_tokens"]
        parsed = collect(parser.feed(text) + parser.close(truncated=truncated))
        done = self._finish(prep, generation, parsed, len(generation.token_ids))
        message = AIMessage(
            content=parsed.text,
            tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in parsed.tool_calls],
            invalid_tool_calls=[invalid_tool_call(name=_malformed_name(m), args=_invalid_args(m.raw), id=m.id,
                                                  error=m.error) for m in parsed.malformed],
            usage_metadata=done["usage"], response_metadata=done["metadata"],
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        prep = self._prepare(messages, stop, kwargs)
        tokenizer = prep["mm"].backbone.tokenizer
        deltas: queue.Queue = queue.Queue()
        streamer = TokenStreamer(lambda ids: self._decode(tokenizer, ids), prep["stop_ids"], deltas.put)
        result: dict = {}

        def work():
            try:
                result["generation"] = self._run(prep, streamer)
            except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
                result["error"] = exc
            finally:
                deltas.put(None)

        thread = threading.Thread(target=work, name="signalgraph-generate", daemon=True)
        thread.start()
        stop_filter = StopFilter(prep["stops"])
        parser = SignalParser(prep["signal_strings"], tools=prep["tool_names"])
        events: list = []
        calls = 0
        try:
            finished = False
            while not finished:
                delta = deltas.get()
                if delta is None:
                    finished = True
                    generation = result.get("generation")
                    truncated = generation is not None and len(generation.token_ids) >= prep["max_new_tokens"]
                    new = parser.feed(stop_filter.feed("", final=True)) + parser.close(truncated=truncated)
                else:
                    new = parser.feed(stop_filter.feed(delta))
                for event in new:
                    events.append(event)
                    chunk = self._event_chunk(event, calls)
                    if chunk is None:
                        continue
                    if isinstance(event, (ToolCallEvent, MalformedToolCall)):
                        calls += 1
                    if run_manager and isinstance(event, TextDelta):
                        run_manager.on_llm_new_token(event.text, chunk=chunk)
                    yield chunk
        finally:
            prep["cancel"].set()  # the consumer went away early: let generation end
            thread.join()
        if "error" in result:
            raise result["error"]
        generation = result["generation"]
        parsed = collect(events)
        done = self._finish(prep, generation, parsed, len(generation.token_ids))
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=done["usage"],
                                                         response_metadata=done["metadata"],
                                                         chunk_position="last"))

    @staticmethod
    def _event_chunk(event, index: int) -> ChatGenerationChunk | None:
        if isinstance(event, TextDelta):
            return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
        if isinstance(event, ToolCallEvent):
            chunk = tool_call_chunk(name=event.name, args=json.dumps(event.arguments, ensure_ascii=False),
                                    id=event.id, index=index)
            return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))
        if isinstance(event, MalformedToolCall):
            chunk = tool_call_chunk(name=_malformed_name(event), args=_invalid_args(event.raw), id=event.id,
                                    index=index)
            return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))
        return None  # signal spans are listed in the last chunk's response_metadata


def _malformed_name(event: MalformedToolCall) -> str | None:
    """The tool name a malformed call gave, if one can be read."""
    import re

    found = re.search(r'["\']?name["\']?\s*:\s*["\']([^"\']+)["\']', event.raw)
    return found.group(1) if found else None


def _invalid_args(raw: str) -> str:
    """Args of an invalid tool call, such that LangChain's chunk merging also finds them invalid
    (a raw text that happens to parse as an object is passed as a JSON string instead)."""
    from langchain_core.utils.json import parse_partial_json

    try:
        parsed = parse_partial_json(raw)
    except Exception:  # noqa: BLE001 - anything unparseable is what we want
        return raw
    return json.dumps(raw) if isinstance(parsed, dict) else raw


__all__ = ["SignalgraphChatModel", "load_shared_model", "to_chat", "tool_spec", "resolve_tool_choice",
           "describe_tools", "SignalSpanEvent"]
