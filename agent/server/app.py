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
(agent.chat_model): the caller's tools are offered under constrained decoding and calls come back
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
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.runtime import Runtime
from agent.server.jobs import (
    SESSION_HEADER,
    caller_tools_job,
    controller_job,
    media_item,
    prepare_turn,
    session_id,
    session_turns,
)
from agent.server.responses import Completion, error_status, stream_reply
from agent.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    error_body,
    parse_request,
)
from agent.server.turn_queue import TurnQueue
from models.errors import SignalgraphError
from tools.tenants import scoped

WEB = Path(__file__).with_name("web")
_DRAIN_BYTES = 64 * 2**20  # read (and drop) this much of an oversized body, so the client gets its 413


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
    _ = runtime.controller  # built now, once: requests on several threads must not race to build it
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
        status, message = error_status(exc)
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

    keys = runtime.api_keys

    def authorize(request: Request) -> str | None:
        """The request's tenant: None for the default one (an open server, or the single `api_key`)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if token and api_key is not None and secrets.compare_digest(token.encode(), api_key.encode()):
            return None
        tenant, any_active = keys.lookup(token)
        if tenant is not None:
            return tenant
        if api_key is None and not any_active:
            return None  # an open server: OpenAI's clients send some key whatever the server wants
        if not token:
            raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer <key>'",
                           code="missing_api_key")
        raise ApiError(401, "the API key is not valid for this server", code="invalid_api_key")

    guarded = [Depends(authorize)]

    # --- for load balancers: alive, ready, draining ---------------------------------------------

    app.state.queue = queue
    app.state.draining = False  # set on SIGTERM (agent/cli/serve.py): running turns finish, new ones get 503

    @app.middleware("http")
    async def refuse_while_draining(request: Request, call_next):
        if app.state.draining and request.url.path.startswith("/v1/"):
            return JSONResponse(error_body(503, "this server is shutting down; send the request again (another "
                                                "replica will take it)", code="draining"),
                                status_code=503, headers={"Retry-After": "1"})
        return await call_next(request)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if runtime.database is not None:
            try:
                await run_in_threadpool(runtime.database.version)
            except SignalgraphError as exc:
                return JSONResponse({"status": "database unreachable", "detail": str(exc)}, status_code=503)
        if runtime.bucket is not None:
            try:
                await run_in_threadpool(runtime.bucket.check)
            except SignalgraphError as exc:
                return JSONResponse({"status": "media bucket unreachable", "detail": str(exc)}, status_code=503)
        return {"status": "ready", "turns": queue.busy}

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

    @app.get("/v1/media/{session}/{media_id}")
    async def media(session: str, media_id: str, tenant: str | None = Depends(authorize)):
        try:
            record = runtime.store.get(scoped(tenant, session), media_id)
        except SignalgraphError:
            raise ApiError(404, f"there is no media {media_id!r} in session {session!r}", param="media_id",
                           code="media_not_found") from None
        kind = mimetypes.guess_type(f"x{record.suffix}")[0] or "application/octet-stream"
        return FileResponse(record.path, media_type=kind, filename=f"{record.id}{record.suffix}",
                            content_disposition_type="inline")

    @app.get("/v1/sessions/{session}")
    async def session_history(request: Request, session: str, tenant: str | None = Depends(authorize)):
        thread = scoped(tenant, session)
        state = await run_in_threadpool(runtime.controller.state, thread)
        pending = await run_in_threadpool(runtime.controller.pending, thread)
        return {"session": session, "turns": session_turns(state, lambda m: media_item(request, session, m)),
                "pending": pending}

    # --- chat completions ---------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, tenant: str | None = Depends(authorize)):
        body = await _read_body(request, body_limit)
        # parsing and decoding media take a while for large bodies: off the event loop
        req = await run_in_threadpool(_parse, body)
        _check_model(req.model, model_id)
        completion = Completion(model_id, fingerprint)
        if req.tools and req.tool_choice != "none":
            job = await run_in_threadpool(caller_tools_job, runtime, req, model_id)
            headers, key = {}, None
        else:
            session = session_id(request, req)
            thread = scoped(tenant, session)  # the tenant's own session of that name
            prepared = await run_in_threadpool(prepare_turn, runtime, req, thread, uploads)
            job = controller_job(runtime, thread, prepared, lambda m: media_item(request, session, m))
            headers, key = {SESSION_HEADER: session}, thread
        if not req.stream:
            future = queue.submit(lambda: job(None), key)
            reply = await asyncio.wrap_future(future)
            return JSONResponse(completion.full(reply), headers=headers)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream_reply(queue, job, completion, headers, key, include_usage)

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
