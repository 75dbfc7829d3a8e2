"""A chat-completions request as a job for the turn queue: one controller turn in a session (the
request's last message, its image and audio parts as attachments), or OpenAI function calling
with the caller's own tools (not run here; the calls go back to the caller)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from fastapi import Request

from agent.runtime import KB_SESSION, Runtime
from agent.server.schemas import (
    AUDIO_SUFFIXES,
    ApiError,
    AudioPart,
    ChatCompletionRequest,
    ImagePart,
    Message,
    TextPart,
    decode_base64,
    decode_image_url,
)
from models.errors import MediaError, MediaTooLargeError
from tools.tenants import tenant_of

SESSION_HEADER = "X-Session-Id"


def session_id(request: Request, req: ChatCompletionRequest) -> str:
    session = request.headers.get(SESSION_HEADER) or req.user or f"api-{uuid.uuid4().hex[:16]}"
    param = SESSION_HEADER if request.headers.get(SESSION_HEADER) else "user"
    if len(session) > 128 or not session.isprintable() or "/" in session:
        raise ApiError(422, "a session id must be at most 128 printable characters without '/'", param=param,
                       code="invalid_session")
    if session == KB_SESSION:
        raise ApiError(422, f"{session!r} holds the knowledge base's files; choose another session id",
                       param=param, code="invalid_session")
    return session


def prepare_turn(runtime: Runtime, req: ChatCompletionRequest, session: str, uploads: Path) -> dict:
    """The turn's text and attachments (uploads validated and stored first, so bad media fail the
    request with its status rather than becoming a notice), and the controller's options."""
    index = len(req.messages) - 1
    last = req.messages[index]
    if last.role != "user":
        raise ApiError(422, f"the last message must be the user's (it is {last.role!r}); without tools, "
                            "each request is one user turn", param=f"messages[{index}].role", code="invalid_value")
    if req.tool_choice is not None and not isinstance(req.tool_choice, str):
        raise ApiError(422, "tool_choice names a tool, but the request has no tools", param="tool_choice",
                       code="invalid_value")
    attachments = [_upload(runtime, session, part, f"messages[{index}].content[{j}]", uploads)
                   for j, part in last.media_parts()]
    if not last.text().strip() and not attachments:
        raise ApiError(422, "the user's message is empty", param=f"messages[{index}].content", code="invalid_value")
    return {"text": last.text(), "attachments": attachments, "history": req.messages[:-1],
            "tools": [] if req.tool_choice == "none" else None, "require_tool": req.tool_choice == "required",
            "max_tokens": req.max_completion_tokens or req.max_tokens}


def _upload(runtime: Runtime, session: str, part: ImagePart | AudioPart, param: str, uploads: Path) -> dict:
    if isinstance(part, ImagePart):
        data, suffix = decode_image_url(part.image_url.url, param)
        kind = "image"
    else:
        data, suffix = decode_base64(part.input_audio.data, param), AUDIO_SUFFIXES[part.input_audio.format]
        kind = "audio"
    limit = runtime.store.limits.max_bytes
    if len(data) > limit:
        raise ApiError(413, f"{param}: the {kind} is {len(data):,} bytes; this server takes at most {limit:,}",
                       param=param, code="media_too_large")
    try:
        runtime.store.add_bytes(session, data, kind, suffix)
    except MediaTooLargeError as exc:
        raise ApiError(413, f"{param}: {exc}", param=param, code="media_too_large") from None
    except MediaError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param, code="invalid_media") from None
    path = uploads / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not path.exists():  # content-addressed: the same upload is written once
        tmp = path.with_name(f".{uuid.uuid4().hex}{suffix}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return {"kind": kind, "path": str(path)}


def media_item(request: Request, session: str, media_id: str) -> dict:
    kind = media_id.split("-", 1)[0]
    url = f"{str(request.base_url).rstrip('/')}/v1/media/{quote(session, safe='')}/{quote(media_id)}"
    return {"id": media_id, "kind": kind, "url": url}


def _seed(controller, session: str, history: list[Message]) -> None:
    """A new session starts from the conversation the request carries (text only)."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    if not history or controller.state(session).get("messages"):
        return
    kinds = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage, "developer": SystemMessage}
    messages = [kinds[m.role](content=m.text()) for m in history if m.role in kinds and m.text()]
    if messages:
        controller.graph.update_state({"configurable": {"thread_id": session}}, {"messages": messages},
                                      as_node="respond")


def controller_job(runtime: Runtime, session: str, prepared: dict, media_item: Callable[[str], dict]) -> Callable:
    """`session` is the thread (tools.tenants.scoped): the reply names it as its tenant knows it."""
    def job(on_text: Callable[[str], None] | None) -> dict:
        controller = runtime.controller
        _seed(controller, session, prepared["history"])
        streamed: list[str] = []

        def stream(text: str) -> None:
            streamed.append(text)
            on_text(text)

        result = controller.turn(session, prepared["text"], prepared["attachments"],
                                 on_text=None if on_text is None else stream,
                                 tools=prepared["tools"], require_tool=prepared["require_tool"],
                                 max_new_tokens=prepared["max_tokens"])
        # the reply may not have been streamed (the controller's own words when the model said
        # nothing, or a generator's failure note): send it at the end
        said = "".join(streamed).strip()
        if on_text is None or result.text.strip() in said:
            unstreamed = ""
        elif said and result.text.startswith(said):  # the model's words, completed by the response stage
            unstreamed = result.text[len(said):]
        else:
            unstreamed = ("\n\n" if said else "") + result.text
        media = [media_item(m["id"]) for m in result.media]
        links = [f"![{m['id']}]({m['url']})" if m["kind"] == "image" else f"[{m['id']}]({m['url']})" for m in media]
        extension = {"session": tenant_of(session)[1], "media": media, "citations": result.citations,
                     "notices": result.notices,
                     "pending": result.pending,  # an action waiting for the user's yes or no (the reply asks)
                     "trace": json.loads(json.dumps(result.trace, default=str))}
        usage = {"prompt_tokens": result.usage["prompt_tokens"], "completion_tokens": result.usage["completion_tokens"],
                 "total_tokens": result.usage["prompt_tokens"] + result.usage["completion_tokens"]}
        return {"text": result.text, "unstreamed": unstreamed, "links": links, "media": media, "tool_calls": [],
                "finish_reason": result.finish_reason, "usage": usage, "signalgraph": extension}

    return job


# --- the caller's tools -------------------------------------------------------------------------

def caller_tools_job(runtime: Runtime, req: ChatCompletionRequest, model_id: str) -> Callable:
    from agent.chat_model import SignalgraphChatModel

    messages = _lc_messages(req.messages)
    names = [t.function.name for t in req.tools]
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        if choice.function.name not in names:
            raise ApiError(422, f"tool_choice names {choice.function.name!r}, which is not among the request's "
                                f"tools ({', '.join(names)})", param="tool_choice", code="invalid_value")
        choice = choice.function.name
    elif choice == "required":
        choice = "any"
    mm = getattr(runtime.thinker, "mm", None)
    if mm is None:
        raise ApiError(400, "this server's thinker is not a model, so it cannot take the caller's tools",
                       param="tools")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    llm = SignalgraphChatModel(mm=mm, model=model_id, profile_name=runtime.profile.name,
                               max_tokens=req.max_completion_tokens or req.max_tokens, stop=stop)
    extra = {} if req.parallel_tool_calls is None else {"parallel_tool_calls": req.parallel_tool_calls}
    bound = llm.bind_tools([t.model_dump() for t in req.tools], tool_choice=choice, **extra)

    def job(on_text: Callable[[str], None] | None) -> dict:
        if on_text is None:
            message = bound.invoke(messages)
        else:
            message = None
            for chunk in bound.stream(messages):
                if chunk.text:
                    on_text(chunk.text)
                message = chunk if message is None else message + chunk
        calls = [{"id": c["id"], "type": "function",
                  "function": {"name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
                 for c in message.tool_calls]
        usage = message.usage_metadata or {}
        # a call cut off at the token limit is dropped by the parser: the reply ran out of length
        cut = usage.get("output_tokens", 0) >= (llm.max_tokens or mm.profile.backbone.max_new_tokens)
        return {"text": message.text, "unstreamed": "", "links": [], "media": [], "tool_calls": calls,
                "finish_reason": "tool_calls" if calls else ("length" if cut else "stop"),
                "usage": {"prompt_tokens": usage.get("input_tokens", 0),
                          "completion_tokens": usage.get("output_tokens", 0),
                          "total_tokens": usage.get("total_tokens", 0)},
                "signalgraph": None}

    return job


def _lc_messages(messages: list[Message]) -> list:
    """OpenAI messages as LangChain ones, for the chat model (images as data-URL blocks)."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    out = []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            out.append(SystemMessage(content=m.text()))
        elif m.role == "user":
            blocks = []
            for j, part in enumerate(m.content if isinstance(m.content, list) else [TextPart(type="text",
                                                                                         text=m.text())]):
                param = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    blocks.append({"type": "text", "text": part.text})
                elif isinstance(part, ImagePart):
                    decode_image_url(part.image_url.url, param)  # 400 now rather than deep in the model
                    blocks.append({"type": "image_url", "image_url": {"url": part.image_url.url}})
                else:
                    raise ApiError(422, f"{param}: audio parts are taken only without tools (as a controller "
                                        "turn, which transcribes them)", param=param, code="invalid_value")
            out.append(HumanMessage(content=blocks))
        elif m.role == "assistant":
            calls = [{"id": c.id, "name": c.function.name,
                      "args": _arguments(c.function.arguments, f"messages[{i}].tool_calls[{k}].function.arguments")}
                     for k, c in enumerate(m.tool_calls or [])]
            out.append(AIMessage(content=m.text(), tool_calls=calls))
        else:
            if not m.tool_call_id:
                raise ApiError(422, f"messages[{i}]: a tool message needs tool_call_id",
                               param=f"messages[{i}].tool_call_id", code="invalid_value")
            out.append(ToolMessage(content=m.text(), tool_call_id=m.tool_call_id, name=m.name))
    return out


def _arguments(text: str, param: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ApiError(422, f"{param}: tool-call arguments must be a JSON object", param=param, code="invalid_value")
    return value




def session_turns(state: dict, media_item: Callable[[str], dict]) -> list[dict]:
    """The session's turns: what the user wrote, the reply, and the media each turn made."""
    from langchain_core.messages import AIMessage, HumanMessage

    turns: list[dict] = []
    for message in state.get("messages", []):
        if isinstance(message, HumanMessage):
            turns.append({"user": message.text, "assistant": "", "media": [], "trace": []})
        elif isinstance(message, AIMessage) and message.text and turns:
            turns[-1]["assistant"] = message.text
    # the trace holds each turn from its ingest step on; seeded turns have none, so match from the end
    traced: list[list[dict]] = []
    for entry in state.get("trace", []):
        if entry["step"] == "ingest":
            traced.append([])
        if traced:
            traced[-1].append(entry)
    for turn, trace in zip(reversed(turns), reversed(traced)):
        turn["trace"] = json.loads(json.dumps(trace, default=str))
        turn["media"] = [media_item(m) for e in trace if e["step"] == "respond" for m in e.get("outputs", [])]
    return turns
