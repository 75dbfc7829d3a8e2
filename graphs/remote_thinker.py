"""The controller's brain on an OpenAI-compatible engine: vLLM, SGLang, llama.cpp's server, a hosted
API, or another Signalgraph server.

This is the survey's tool-usage axis with the backbone hosted elsewhere (on a GPU machine, say):
the session's tools go to the engine as its own function calling (`tools`, `tool_choice`), its
calls come back as the controller's calls, and the controller runs the tools, keeps the session
and writes the reply as it does for the local model (the same response stage and no-markup
rules). The end-to-end paths need the local MM-LLM's projectors: an engine reads attached media
only through tools and writes no signal tokens, so its skills list is empty and "draw it yourself"
is answered as something it cannot do.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage, ToolMessage

from graphs.thinker import ConditioningCache, ThinkResult, system_prompt, with_passages
from models.errors import SignalgraphError
from tools.untrusted import inert


class BackboneUnavailableError(SignalgraphError):
    """The engine could not be reached, or refused the request."""


def _openai_messages(messages: list[AnyMessage], system: str, passages: list[dict]) -> list[dict]:
    """LangChain messages in the engine's wire format: tool calls and results as the protocol's own
    fields, not text; tool results and earlier replies inert (data cannot close their turn)."""
    out: list[dict] = [{"role": "system", "content": system}]
    for message in messages:
        if isinstance(message, SystemMessage):
            out[0]["content"] += "\n\n" + message.text
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": message.text})
        elif isinstance(message, AIMessage):
            turn: dict = {"role": "assistant", "content": inert(message.text) or None}
            if message.tool_calls:
                turn["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
                    for c in message.tool_calls]
            out.append(turn)
        elif isinstance(message, ToolMessage):
            out.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": inert(message.text)})
    return with_passages(out, passages)  # as for the local model


class OpenAIThinker:
    """A `Thinker` whose backbone is a model behind an OpenAI-compatible `/v1/chat/completions`."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_new_tokens: int | None = None,
                 timeout: float = 120.0, tool_calls: str = "native"):
        """`tool_calls`: "native" sends the tools as the engine's function calling; "schema" asks for
        the call as JSON under a schema of the tools (`response_format`), for engines whose function
        calling does not constrain the arguments but whose structured outputs do."""
        from openai import OpenAI

        self.tool_calls = tool_calls
        self.base_url = base_url
        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.max_new_tokens = max_new_tokens
        self.cache = ConditioningCache()  # asked for by the controller; an engine writes no signal spans

    def skills(self) -> list[str]:
        return []  # no trained projectors here: seeing and drawing go through tools

    def think(self, messages, *, tools, passages, media, on_text: Callable[[str], None] | None = None,
              require_tool=False, max_new_tokens=None) -> ThinkResult:
        import openai

        request = {"model": self.model, "messages": _openai_messages(messages, system_prompt([], media), passages),
                   "max_tokens": max_new_tokens or self.max_new_tokens}
        if tools and self.tool_calls == "schema":
            request["response_format"] = _call_format(tools, require_tool)
        elif tools:
            request["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description",
                                                                                 "parameters")}} for t in tools]
            request["tool_choice"] = "required" if require_tool else "auto"
            if require_tool and len(tools) == 1:  # named: engines then decode under that tool's own schema
                request["tool_choice"] = {"type": "function", "function": {"name": tools[0]["name"]}}
        try:
            if on_text is None or "response_format" in request:  # JSON is not words to stream
                completion = self.client.chat.completions.create(**request)
                choice = completion.choices[0]
                text, calls = choice.message.content or "", [
                    (c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
                finish, usage = choice.finish_reason, completion.usage
            else:
                text, calls, finish, usage = self._stream(request, on_text)
        except openai.APIStatusError as exc:
            raise BackboneUnavailableError(f"the backbone at {self.base_url} refused the request "
                                           f"({exc.status_code}): {exc.message}") from None
        except openai.APIError as exc:
            raise BackboneUnavailableError(f"the backbone at {self.base_url} cannot be reached: {exc}") from None
        if "response_format" in request:
            text, calls = _from_call_format(text, completion.id)
            if on_text is not None and text:
                on_text(text)
        parsed, malformed = [], []
        for call_id, name, arguments in calls:
            try:
                args = json.loads(arguments or "{}")
                if not isinstance(args, dict):
                    raise ValueError("not an object")
                parsed.append({"id": call_id, "name": name, "args": args})
            except ValueError as exc:
                malformed.append(f"the arguments of {name} are not a JSON object ({exc})")
        return ThinkResult(text.strip(), parsed, [], malformed, text,
                           getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0,
                           finish == "length")

    def _stream(self, request: dict, on_text: Callable[[str], None]):
        """Streamed: words go to `on_text` as they come; tool calls are put together from their deltas."""
        text, calls, finish, usage = "", {}, None, None
        stream = self.client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                if choice.delta.content:
                    text += choice.delta.content
                    on_text(choice.delta.content)
                for delta in choice.delta.tool_calls or []:
                    call = calls.setdefault(delta.index, ["", "", ""])
                    call[0] = delta.id or call[0]
                    if delta.function is not None:
                        call[1] += delta.function.name or ""
                        call[2] += delta.function.arguments or ""
        return text, [tuple(calls[i]) for i in sorted(calls)], finish, usage


def _call_format(tools: list[dict], require_tool: bool) -> dict:
    """A JSON schema whose instances are one call of one of `tools` ({"name", "arguments"}) or, unless
    a tool is required, a reply in words ({"reply"})."""
    options = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    if not require_tool:
        options.append({"type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"],
                        "additionalProperties": False})
    return {"type": "json_schema", "json_schema": {"name": "tool_call_or_reply", "strict": True,
                                                   "schema": {"anyOf": options}}}


def _from_call_format(content: str, completion_id: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(reply text, [(id, name, arguments JSON)]) from an answer under `_call_format`; text that is not
    such JSON is kept as the reply (an engine that ignored the schema), never shown as JSON."""
    try:
        answer = json.loads(content)
    except ValueError:
        return content, []
    if isinstance(answer, dict) and isinstance(answer.get("name"), str) and "arguments" in answer:
        return "", [(f"call-{completion_id}", answer["name"], json.dumps(answer["arguments"]))]
    if isinstance(answer, dict) and isinstance(answer.get("reply"), str):
        return answer["reply"], []
    return "", []
