"""A real `signalgraph serve` process on a loopback port, one streamed turn against it, and the
cold start: seconds from launching the command to the first token of the first reply.

The load test, the recovery test and the cold-start figure all drive the server the way a client
does (HTTP over loopback, SSE), so they measure what a user meets, process start-up included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from models.errors import SignalgraphError

MODEL_PREFIX = "signalgraph-"


class ServeError(SignalgraphError):
    """`signalgraph serve` did not come up, or died while it was being measured."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`signalgraph serve` in a child process, on 127.0.0.1, over `data_dir`.

    `config` adds agent-config keys (e.g. `max_new_tokens`). Start it with `start()`, then
    `wait_ready()`; `kill()` is SIGKILL, the crash the recovery test needs."""

    def __init__(self, data_dir: Path, profile: str, *, queue: int = 8, config: dict | None = None,
                 log: Path | None = None):
        self.data_dir = Path(data_dir)
        self.profile = profile
        self.queue = queue
        self.config = {"data_dir": str(self.data_dir), "allowed_dirs": [str(self.data_dir)], **(config or {})}
        self.log = log or self.data_dir.parent / f"{self.data_dir.name}-serve.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = MODEL_PREFIX + Path(profile).stem
        self.process: subprocess.Popen | None = None
        self.launched = 0.0

    def start(self) -> ServeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.data_dir.parent / f"{self.data_dir.name}-config.json"  # JSON is YAML too
        config_file.write_text(json.dumps(self.config))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("SIGNALGRAPH_API_KEY", None)
        command = [sys.executable, "-m", "agent.cli.main", "--profile", self.profile, "--config", str(config_file),
                   "serve", "--port", str(self.port), "--queue", str(self.queue), "--log-level", "warning"]
        self._log = open(self.log, "a")  # noqa: SIM115 - open for the process's whole life
        self.launched = time.perf_counter()
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=Path(__file__).resolve().parents[2])
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds from launch until GET /v1/models answers (the backbone is loaded by then)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServeError(f"signalgraph serve exited with status {self.process.returncode} before it "
                                 f"answered; its output is in {self.log}:\n{self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return time.perf_counter() - self.launched
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServeError(f"signalgraph serve did not answer within {timeout:g} s; see {self.log}")
            time.sleep(0.05)

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a crash or an OOM kill."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self._close_log()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._close_log()

    def _close_log(self) -> None:
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()


@dataclass
class StreamedTurn:
    """What one streamed chat completion gave back."""

    status: int
    text: str = ""
    error: str | None = None  # an error object sent inside the stream after the 200
    first_token_s: float | None = None  # request sent -> first non-empty content delta
    seconds: float = 0.0
    finished: bool = False  # the last chunk ([DONE]) arrived
    session: str | None = None
    chunks: list[str] = field(default_factory=list)


def _events(lines):
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: "):]


def _take(turn: StreamedTurn, data: str, started: float) -> bool:
    """Fold one SSE event into the turn; True once the stream is done."""
    if data == "[DONE]":
        turn.finished = True
        return True
    event = json.loads(data)
    if "error" in event:
        turn.error = event["error"].get("message", str(event["error"]))
        return True
    for choice in event.get("choices", []):
        content = choice.get("delta", {}).get("content")
        if content:
            if turn.first_token_s is None:
                turn.first_token_s = time.perf_counter() - started
            turn.chunks.append(content)
    return False


def _body(model: str, text: str) -> dict:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": text}]}


def stream_turn(url: str, model: str, session: str, text: str, *, timeout: float = 600) -> StreamedTurn:
    """One streamed turn in `session`."""
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(model, text), timeout=timeout,
                      headers={"X-Session-Id": session}) as response:
        turn = StreamedTurn(response.status_code, session=response.headers.get("x-session-id"))
        if response.status_code != 200:
            turn.error = response.read().decode(errors="replace")
        else:
            for data in _events(response.iter_lines()):
                if _take(turn, data, started):
                    break
    turn.text = "".join(turn.chunks)
    turn.seconds = time.perf_counter() - started
    return turn


async def stream_turn_async(client: httpx.AsyncClient, url: str, model: str, session: str,
                            text: str) -> StreamedTurn:
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=_body(model, text),
                             headers={"X-Session-Id": session}) as response:
        turn = StreamedTurn(response.status_code, session=response.headers.get("x-session-id"))
        if response.status_code != 200:
            turn.error = (await response.aread()).decode(errors="replace")
        else:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and _take(turn, line[len("data: "):], started):
                    break
    turn.text = "".join(turn.chunks)
    turn.seconds = time.perf_counter() - started
    return turn


def session_turns(url: str, session: str) -> list[dict]:
    response = httpx.get(f"{url}/v1/sessions/{session}", timeout=60)
    response.raise_for_status()
    return response.json()["turns"]


# --- cold start ----------------------------------------------------------------------------------


def cold_start(profile: str, work_dir: Path) -> dict:
    """Launch -> ready -> first token of the first reply, and the same turn again once warm.

    The warm turn is the baseline: what is left of the cold first token once the process is up
    and its models are loaded. Loading happens once: a second turn does not pay for it again."""
    work_dir = Path(work_dir)
    data = work_dir / f"cold-{Path(profile).stem}"
    shutil.rmtree(data, ignore_errors=True)  # a first run: no sessions, no knowledge base yet
    server = ServeProcess(data, profile)
    try:
        server.start()
        ready = server.wait_ready()
        sent = time.perf_counter()
        first = stream_turn(server.url, server.model, "cold", "Hello, who are you?")
        # a reply with no text has no first token: its end stands in for it
        launched_to_token = sent - server.launched + (first.first_token_s or first.seconds)
        second = stream_turn(server.url, server.model, "warm", "Hello, who are you?")
    finally:
        server.stop()
    for turn in (first, second):
        if turn.status != 200 or turn.error:
            raise ServeError(f"the cold-start turn failed with {turn.status}: {turn.error}")
    warm_token = second.first_token_s if second.first_token_s is not None else second.seconds
    return {"profile": server.model[len(MODEL_PREFIX):], "ready_s": round(ready, 3),
            "first_token_s": round(launched_to_token, 3),
            "first_turn_first_token_s": round(first.first_token_s or first.seconds, 3),
            "warm_first_token_s": round(warm_token, 3), "warm_turn_s": round(second.seconds, 3),
            "first_turn_s": round(first.seconds, 3)}
