"""The HTTP API and the web chat over one Runtime: `create_app(runtime)` gives the FastAPI app.

    POST /v1/chat/completions     OpenAI's chat completions, streamed over SSE or not
    GET  /v1/models, /v1/models/{id}
    GET  /v1/media/{session}/{id} a session's image or audio (what the replies link to)
    GET  /v1/sessions/{session}   a session's turns, for the web chat to show again
    GET  /                        the web chat

A request without `tools` is one controller turn: its last message is the user's new words (with
image and audio parts as attachments) in the session named by the `X-Session-Id` header or the
`user` field; the session keeps the history, so earlier messages seed only a session that is new.
Generated media come back as URLs in the reply, and the turn's media, trace and citations in a
`signalgraph` field. A request with `tools` is OpenAI function calling over the backbone
(graphs.chat_model): the caller's tools are offered under constrained decoding and calls come back
as `tool_calls`, not run; the caller holds that history, as with OpenAI.

Up to `max_concurrency` turns run at once (one at a time per session; the backbone batches their
decoding); `queue_size` more wait, and beyond that the answer is 429. Errors are OpenAI's error
objects with the message of the real cause, never a traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import mimetypes
import secrets
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.api_schemas import (
    AUDIO_SUFFIXES,
    ApiError,
    AudioPart,
    ChatCompletionRequest,
    ImagePart,
    Message,
    TextPart,
    decode_base64,
    decode_image_url,
    error_body,
    parse_request,
)
from agent.runtime import KB_SESSION, Runtime
from models.errors import AssetError, MediaError, MediaTooLargeError, SignalgraphError

WEB = Path(__file__).with_name("web")
SESSION_HEADER = "X-Session-Id"
_DRAIN_BYTES = 64 * 2**20  # read (and drop) this much of an oversized body, so the client gets its 413


class TurnQueue:
    """Up to `workers` jobs at once (the backbone batches their decoding); up to `size` more wait;
    beyond that, 429. Jobs with the same key (a session) run one after another: only a session's
    oldest job is handed to a worker, so its later turns wait without holding one."""

    def __init__(self, size: int, workers: int = 1):
        self.size = size
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="signalgraph-turn")
        self._lock = threading.Lock()
        self._admitted = 0
        self._keys: dict[str, deque] = {}  # session -> its admitted jobs, oldest (running) first

    def submit(self, job: Callable[[], Any], key: str | None = None) -> Future:
        future: Future = Future()
        with self._lock:
            if self._admitted >= self.size + self.workers:
                raise ApiError(429, f"the server is busy: {self.workers} turn(s) are running and {self.size} are "
                                    "waiting; try again shortly", code="queue_full")
            self._admitted += 1
            if key is not None:
                jobs = self._keys.setdefault(key, deque())
                jobs.append((job, future))
                if len(jobs) > 1:
                    return future  # started when the session's earlier jobs are done
        self._start(job, future, key)
        return future

    def _start(self, job: Callable[[], Any], future: Future, key: str | None) -> None:
        def run():
            future.set_running_or_notify_cancel()
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                self._finish(key)
                future.set_exception(exc)
            else:
                self._finish(key)  # before the result is out, so a caller's next turn finds room
                future.set_result(result)
        self._executor.submit(run)

    def _finish(self, key: str | None) -> None:
        with self._lock:
            self._admitted -= 1
            if key is None:
                return
            jobs = self._keys[key]
            jobs.popleft()
            if not jobs:
                del self._keys[key]
                return
            following = jobs[0]
        self._start(*following, key)


def _give_freed_memory_back() -> None:
    """Turns allocate and free large tensors (KV caches, prefill logits). glibc's adaptive mmap
    threshold soon puts such blocks on the heap, which keeps their pages once freed, so a server's
    memory stays at its busiest moment's peak. A fixed 1 MiB threshold keeps them mmapped, and
    freed memory goes back to the system."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def create_app(runtime: Runtime, *, api_key: str | None = None, queue_size: int = 8,
               max_request_bytes: int | None = None, max_concurrency: int = 8) -> FastAPI:
    """The app. `api_key`: require `Authorization: Bearer <key>` on /v1; `max_request_bytes`:
    default one media file at the profile's byte limit, base64-encoded, plus 1 MiB;
    `max_concurrency`: turns that run at once."""
    limits = runtime.profile.limits
    body_limit = max_request_bytes or limits.max_bytes * 4 // 3 + 2**20
    model_id = f"signalgraph-{runtime.profile.name}"
    fingerprint = _fingerprint(runtime.profile)
    created = int(time.time())
    queue = TurnQueue(queue_size, max_concurrency)
    _give_freed_memory_back()
    runtime.controller  # built now, once: requests on several threads must not race to build it
    uploads = runtime.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    # uploaded files are attached by path like any other, so the store must be allowed to read them
    if uploads.resolve() not in runtime.store.allowed_dirs:
        runtime.store.allowed_dirs.append(uploads.resolve())

    # no /docs: its page loads scripts from a CDN, which an offline machine cannot reach
    app = FastAPI(title="Signalgraph", summary="OpenAI-compatible API over the Signalgraph agent",
                  docs_url=None, redoc_url=None)
    @app.exception_handler(SignalgraphError)
    async def _user_error(request: Request, exc: SignalgraphError):
        status, message = _status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        body = exc.body() if isinstance(exc, ApiError) else error_body(status, message)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return JSONResponse(error_body(exc.status_code, str(message), code="not_found" if exc.status_code == 404
                                       else None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer <key>'",
                           code="missing_api_key")
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "the API key is not valid for this server", code="invalid_api_key")

    guarded = [Depends(authorize)]

    # --- the web chat -------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html", media_type="text/html", headers={"Content-Security-Policy": WEB_CSP})

    @app.get("/chat.js", include_in_schema=False)
    async def script():
        return FileResponse(WEB / "chat.js", media_type="text/javascript")

    # --- models and media -----------------------------------------------------------------------

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "signalgraph"}

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", dependencies=guarded)
    async def model(model: str):
        _check_model(model, model_id)
        return model_card()

    @app.get("/v1/media/{session}/{media_id}", dependencies=guarded)
    async def media(session: str, media_id: str):
        try:
            record = runtime.store.get(session, media_id)
        except SignalgraphError:
            raise ApiError(404, f"there is no media {media_id!r} in session {session!r}", param="media_id",
                           code="media_not_found") from None
        kind = mimetypes.guess_type(f"x{record.suffix}")[0] or "application/octet-stream"
        return FileResponse(record.path, media_type=kind, filename=f"{record.id}{record.suffix}",
                            content_disposition_type="inline")

    @app.get("/v1/sessions/{session}", dependencies=guarded)
    async def session_turns(request: Request, session: str):
        state = await run_in_threadpool(runtime.controller.state, session)
        pending = await run_in_threadpool(runtime.controller.pending, session)
        return {"session": session, "turns": _turns(state, lambda m: _media_item(request, session, m)),
                "pending": pending}

    # --- chat completions ---------------------------------------------------------------------

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        body = await _read_body(request, body_limit)
        # parsing and decoding media take a while for large bodies: off the event loop
        req = await run_in_threadpool(_parse, body)
        _check_model(req.model, model_id)
        completion = _Completion(model_id, fingerprint)
        if req.tools and req.tool_choice != "none":
            job = await run_in_threadpool(_caller_tools_job, runtime, req, model_id)
            headers, key = {}, None
        else:
            session = _session(request, req)
            prepared = await run_in_threadpool(_prepare_turn, runtime, req, session, uploads)
            job = _controller_job(runtime, session, prepared, lambda m: _media_item(request, session, m))
            headers, key = {SESSION_HEADER: session}, session
        if not req.stream:
            future = queue.submit(lambda: job(None), key)
            reply = await asyncio.wrap_future(future)
            return JSONResponse(completion.full(reply), headers=headers)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(queue, job, completion, headers, key, include_usage)

    return app


# --- requests ---------------------------------------------------------------------------------

async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it passes `limit` (the rest is drained, so the client reads the 413)."""
    too_large = ApiError(413, f"the request is larger than this server accepts ({limit:,} bytes); send smaller "
                              "media", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _DRAIN_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > limit + _DRAIN_BYTES:
            break
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    return parse_request(data)


def _fingerprint(profile) -> str:
    """What answers depend on: the profile and its trained weights (OpenAI's system_fingerprint)."""
    digest = hashlib.sha256(profile.model_dump_json().encode())
    weights = Path(profile.projector_weights) if profile.projector_weights else None
    if weights is not None and weights.is_file():
        digest.update(weights.read_bytes())
    return f"fp_{digest.hexdigest()[:12]}"


def _check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise ApiError(404, f"the model {name!r} does not exist here; this server serves {model_id!r} "
                            "(see GET /v1/models)", param="model", code="model_not_found")


# The web chat loads and fetches only from this server: a link a note or a reply carries is never
# fetched (no remote images, no beacons), whatever ends up in the page.
WEB_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' blob: data:; "
           "media-src 'self' blob:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")


def _session(request: Request, req: ChatCompletionRequest) -> str:
    session = request.headers.get(SESSION_HEADER) or req.user or f"api-{uuid.uuid4().hex[:16]}"
    param = SESSION_HEADER if request.headers.get(SESSION_HEADER) else "user"
    if len(session) > 128 or not session.isprintable() or "/" in session:
        raise ApiError(422, "a session id must be at most 128 printable characters without '/'", param=param,
                       code="invalid_session")
    if session == KB_SESSION:
        raise ApiError(422, f"{session!r} holds the knowledge base's files; choose another session id",
                       param=param, code="invalid_session")
    return session


def _prepare_turn(runtime: Runtime, req: ChatCompletionRequest, session: str, uploads: Path) -> dict:
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


def _media_item(request: Request, session: str, media_id: str) -> dict:
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


def _controller_job(runtime: Runtime, session: str, prepared: dict, media_item: Callable[[str], dict]) -> Callable:
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
        extension = {"session": session, "media": media, "citations": result.citations, "notices": result.notices,
                     "pending": result.pending,  # an action waiting for the user's yes or no (the reply asks)
                     "trace": json.loads(json.dumps(result.trace, default=str))}
        usage = {"prompt_tokens": result.usage["prompt_tokens"], "completion_tokens": result.usage["completion_tokens"],
                 "total_tokens": result.usage["prompt_tokens"] + result.usage["completion_tokens"]}
        return {"text": result.text, "unstreamed": unstreamed, "links": links, "media": media, "tool_calls": [],
                "finish_reason": result.finish_reason, "usage": usage, "signalgraph": extension}

    return job


# --- the caller's tools -------------------------------------------------------------------------

def _caller_tools_job(runtime: Runtime, req: ChatCompletionRequest, model_id: str) -> Callable:
    from graphs.chat_model import SignalgraphChatModel

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


# --- responses ----------------------------------------------------------------------------------

class _Completion:
    """Builds one completion's JSON, whole or as chunks; every chunk shares id and time."""

    def __init__(self, model_id: str, fingerprint: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_id
        self.fingerprint = fingerprint

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    @staticmethod
    def content(reply: dict) -> str | None:
        text = "\n\n".join(p for p in [reply["text"], *reply["links"]] if p)
        return text or None

    def full(self, reply: dict) -> dict:
        message: dict = {"role": "assistant", "content": self.content(reply), "refusal": None, "annotations": []}
        if reply["tool_calls"]:
            message["tool_calls"] = reply["tool_calls"]
        if reply["media"]:
            message["media"] = reply["media"]
        body = self._head("chat.completion")
        body["choices"] = [{"index": 0, "message": message, "finish_reason": reply["finish_reason"],
                            "logprobs": None}]
        body["usage"] = reply["usage"]
        if reply["signalgraph"]:
            body["signalgraph"] = reply["signalgraph"]
        return body

    def chunk(self, delta: dict | None, finish_reason: str | None = None, **extra) -> str:
        """One SSE chunk; `delta=None` is the usage chunk, which has no choices."""
        body = self._head("chat.completion.chunk")
        body["choices"] = [] if delta is None else \
            [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        body.update({k: v for k, v in extra.items() if v is not None or k == "usage"})
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _stream(queue: TurnQueue, job: Callable, completion: _Completion, headers: dict,
            key: str | None, include_usage: bool = False) -> StreamingResponse:
    """SSE: the text as the backbone writes it, then links, tool calls, and the last chunk; with
    `include_usage` (OpenAI's stream_options) every chunk has `usage: null` and a last chunk
    without choices carries the turn's usage."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    future = queue.submit(lambda: job(lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)), key)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, None))

    usage = {"usage": None} if include_usage else {}

    async def events():
        yield completion.chunk({"role": "assistant", "content": ""}, **usage)
        while (text := await deltas.get()) is not None:
            yield completion.chunk({"content": text}, **usage)
        try:
            reply = future.result()
        except Exception as exc:  # noqa: BLE001 - the status line is sent; the error goes in the stream
            status, message = _status(exc)
            yield f"data: {json.dumps(error_body(status, message))}\n\n"
            return
        if reply["unstreamed"]:
            yield completion.chunk({"content": reply["unstreamed"]}, **usage)
        if reply["links"]:
            yield completion.chunk({"content": ("\n\n" if reply["text"] else "") + "\n\n".join(reply["links"])},
                                   **usage)
        for index, call in enumerate(reply["tool_calls"]):
            yield completion.chunk({"tool_calls": [dict(call, index=index)]}, **usage)
        if reply["media"]:
            yield completion.chunk({"media": reply["media"]}, **usage)
        yield completion.chunk({}, reply["finish_reason"], signalgraph=reply["signalgraph"], **usage)
        if include_usage:
            yield completion.chunk(None, usage=reply["usage"])
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers})


def _status(exc: Exception) -> tuple[int, str]:
    """The status and message an error gets: the user's to fix (4xx) or a fault (500)."""
    if isinstance(exc, ApiError):
        return exc.status, exc.message
    if isinstance(exc, MediaTooLargeError):
        return 413, str(exc)
    if isinstance(exc, AssetError):
        return 500, f"the server's models are not ready: {exc}"
    if isinstance(exc, SignalgraphError):
        return 400, str(exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}"


def _turns(state: dict, media_item: Callable[[str], dict]) -> list[dict]:
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
