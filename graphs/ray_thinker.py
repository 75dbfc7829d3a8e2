"""The MM-LLM backbone as a Ray Serve deployment, and the controller's brain that calls it.

`BackboneReplica` is what each replica of the `backbone` deployment runs: the local MM-LLM with its
decode scheduler (concurrent turns sent to one replica decode in one batch), its signal-span
conditioning, and its output projectors' generators. `RayThinker` is the controller's side: the
same `think` as the in-process `BackboneThinker`, over the deployment's handle, streamed or not.

Both axes of the survey cross the wire: tool calls come back as calls for the controller to run,
and a signal span's conditioning comes back with the reply (not as a key into one replica's memory),
so any backbone replica can then run the output projector's generator on it. Attached media travel
as their bytes, so a backbone replica on another node needs no shared disk.
"""

from __future__ import annotations

import hashlib
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from graphs.thinker import ConditioningCache, ThinkResult, generate_media
from models.errors import SignalgraphError


class BackboneReplica:
    """One replica's backbone: the MM-LLM of a profile, loaded once."""

    def __init__(self, profile, max_new_tokens: int | None = None):
        from graphs.thinker import BackboneThinker
        from models.mmllm import MMLLM

        self.thinker = BackboneThinker(MMLLM.from_profile(profile), ConditioningCache(), max_new_tokens=max_new_tokens)
        self._media = Path(tempfile.mkdtemp(prefix="signalgraph-backbone-"))

    def _local(self, media: list[dict]) -> list[dict]:
        """The attachments as files of this replica's own."""
        local = []
        for item in media:
            item = dict(item)
            data = item.pop("data", None)
            if data is not None:
                # by content, as the media store names its files: the same bytes are written once
                path = self._media / f"{hashlib.sha256(data).hexdigest()}{Path(item['path']).suffix}"
                if not path.exists():
                    path.write_bytes(data)
                item["path"] = str(path)
            local.append(item)
        return local

    def _think(self, request: dict, on_text=None) -> tuple[ThinkResult, dict[str, dict]]:
        result = self.thinker.think(request["messages"], tools=request["tools"], passages=request["passages"],
                                    media=self._local(request["media"]), on_text=on_text,
                                    require_tool=request["require_tool"], max_new_tokens=request["max_new_tokens"])
        conditioning = {s["key"]: self.thinker.cache.get(s["key"]) for s in result.spans if s.get("key")}
        return result, conditioning

    def think(self, request: dict) -> tuple[ThinkResult, dict[str, dict]]:
        return self._think(request)

    def think_stream(self, request: dict) -> Iterator[tuple[str, object]]:
        """("text", piece) as the words come, then ("result", (ThinkResult, conditioning))."""
        pieces: queue.Queue = queue.Queue()
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["value"] = self._think(request, on_text=lambda text: pieces.put(text))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = exc
            pieces.put(None)

        threading.Thread(target=run, daemon=True).start()
        while (piece := pieces.get()) is not None:
            yield "text", piece
        if "error" in outcome:
            raise outcome["error"]
        yield "result", outcome["value"]

    def skills(self) -> list[str]:
        return self.thinker.skills()

    def generate(self, modality: str, conditioning: dict) -> tuple[bytes, str, dict]:
        return generate_media(self.thinker.mm, modality, conditioning)


class RayThinker:
    """The controller's brain on the `backbone` deployment."""

    def __init__(self, handle, *, timeout: float = 600.0):
        self.handle = handle
        self.timeout = timeout
        self.cache = ConditioningCache()  # spans' conditioning, as the replica sent it back
        self._skills: list[str] | None = None

    def _call(self, method: str, *args):
        from graphs.remote_thinker import BackboneUnavailableError
        from tools.ray_pool import ExpertUnavailableError, call_deployment

        try:
            return call_deployment(self.handle, method, *args, what="the backbone deployment", timeout=self.timeout)
        except ExpertUnavailableError as exc:
            raise BackboneUnavailableError(str(exc)) from None

    def skills(self) -> list[str]:
        if self._skills is None:
            self._skills = self._call("skills")
        return self._skills

    def think(self, messages, *, tools, passages, media, on_text: Callable[[str], None] | None = None,
              require_tool=False, max_new_tokens=None) -> ThinkResult:
        request = {"messages": list(messages), "tools": tools, "passages": passages,
                   "media": [_with_bytes(item) for item in media], "require_tool": require_tool,
                   "max_new_tokens": max_new_tokens}
        if on_text is None:
            result, conditioning = self._call("think", request)
        else:
            result, conditioning = self._stream(request, on_text)
        for span in result.spans:  # keyed here as they were there, for the controller's generate step
            if span.get("key") in conditioning:
                span["key"] = self.cache.put(conditioning[span["key"]])
        return result

    def _stream(self, request: dict, on_text: Callable[[str], None]):
        import ray.exceptions as rex

        from graphs.remote_thinker import BackboneUnavailableError
        from tools.ray_pool import _dead_replica

        try:
            for kind, value in self.handle.options(stream=True).think_stream.remote(request):
                if kind == "text":
                    on_text(value)
                else:
                    return value
        except rex.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, SignalgraphError):
                raise cause from None
            raise BackboneUnavailableError(f"the backbone deployment failed: {type(cause).__name__}: {cause}"
                                           ) from None
        except Exception as exc:
            if _dead_replica(exc):  # words may have gone out already: not retried, said plainly
                raise BackboneUnavailableError(f"the backbone replica stopped mid-turn ({type(exc).__name__}); "
                                               "send the message again") from None
            raise
        raise BackboneUnavailableError("the backbone deployment ended its stream without a result")

    def generate(self, modality: str, conditioning: dict) -> tuple[bytes, str, dict]:
        return self._call("generate", modality, conditioning)


def _with_bytes(item: dict) -> dict:
    path = item.get("path")
    if not path or not Path(path).is_file():
        return item
    return {**item, "data": Path(path).read_bytes()}
