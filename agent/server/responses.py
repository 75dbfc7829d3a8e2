"""OpenAI's response objects: a whole completion, the SSE stream of chunks (with the usage chunk
when asked), and the HTTP status of each kind of error."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

from fastapi.responses import StreamingResponse

from agent.server.schemas import ApiError, error_body
from agent.server.turn_queue import TurnQueue
from graphs.remote_thinker import BackboneUnavailableError
from models.errors import AssetError, MediaTooLargeError, SignalgraphError


class Completion:
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


def stream_reply(queue: TurnQueue, job: Callable, completion: Completion, headers: dict,
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
            status, message = error_status(exc)
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


def error_status(exc: Exception) -> tuple[int, str]:
    """The status and message an error gets: the user's to fix (4xx) or a fault (500)."""
    if isinstance(exc, ApiError):
        return exc.status, exc.message
    if isinstance(exc, MediaTooLargeError):
        return 413, str(exc)
    if isinstance(exc, AssetError):
        return 500, f"the server's models are not ready: {exc}"
    if isinstance(exc, BackboneUnavailableError):
        return 503, str(exc)
    if isinstance(exc, SignalgraphError):
        return 400, str(exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}"
