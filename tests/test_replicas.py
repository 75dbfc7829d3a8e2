"""Two `signalgraph serve` replicas, each with its own empty data folder, on one Postgres: they serve
one set of sessions, and when one is killed mid-stream the other carries on from the last finished
turn. Real processes, real HTTP, the official client, a real database."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import openai
import pytest
from PIL import Image

from tools.database import Database

MODEL = "signalgraph-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def replica(tmp_path, name: str, database: str, settings: str = ""):
    """`signalgraph serve --profile tiny` with its own data folder, on the shared database, with
    any further config `settings` (YAML lines)."""
    port = _free_port()
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"data_dir: {tmp_path / name}\ndatabase: {database}\n{settings}")
    process = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "--profile", "tiny", "--config", str(config),
                                "serve", "--port", str(port)], env=dict(os.environ), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, f"replica {name} did not come up"
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.communicate(timeout=60)


def ask(url: str, session: str, text: str, **kwargs):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.create(model=MODEL, user=session, messages=[{"role": "user", "content": text}],
                                          **{"max_tokens": 8, **kwargs})


def send_picture(url: str, session: str, colour: tuple[int, int, int]) -> bytes:
    """A turn with a small PNG of one colour attached; returns the PNG's bytes."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(png, format="PNG")
    picture = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    client.chat.completions.create(model=MODEL, user=session, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Here is a picture."}, {"type": "image_url", "image_url": {"url": picture}}]}])
    return png.getvalue()


def users(url: str, session: str) -> list[str]:
    return [t["user"] for t in httpx.get(f"{url}/v1/sessions/{session}", timeout=30).json()["turns"]]


@pytest.fixture
def two_replicas(tmp_path, postgres_url):
    Database(postgres_url).upgrade()
    with ExitStack() as stack:
        yield [stack.enter_context(replica(tmp_path, name, postgres_url)) for name in ("a", "b")]


def test_an_old_schema_stops_the_server_with_one_line(tmp_path, postgres_url):
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path / 'c'}\ndatabase: {postgres_url}\n")
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", "--profile", "tiny", "--config", str(config),
                           "serve", "--port", str(_free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "run `signalgraph db upgrade`" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_replicas_share_sessions_survive_a_kill_and_keep_concurrent_histories_exact(two_replicas):
    (a, process_a), (b, _) = two_replicas

    # a session moves between replicas with its history
    ask(a, "moving", "first, on a")
    ask(b, "moving", "second, on b")
    assert users(a, "moving") == users(b, "moving") == ["first, on a", "second, on b"]

    # media a replica stored come from the other, whose own folder never held them
    sent = send_picture(a, "moving", (200, 30, 30))
    fetched = httpx.get(f"{b}/v1/media/moving/image-1", timeout=30)
    assert fetched.status_code == 200 and fetched.content == sent

    # 8 sessions at once, turns spread over both replicas: every history exact, in order
    def session(n: int) -> list[str]:
        sent = [f"s{n} turn {i}" for i in range(3)]
        for i, text in enumerate(sent):
            ask((a, b)[(n + i) % 2], f"busy-{n}", text)
        return sent

    with ThreadPoolExecutor(8) as pool:
        sent = list(pool.map(session, range(8)))
    for n, expected in enumerate(sent):
        assert users(b, f"busy-{n}") == expected

    # replica a killed mid-stream: b serves the session from its last finished turn
    ask(a, "killed", "finished turn")
    stream = ask(a, "killed", "this turn never finishes", stream=True, max_tokens=400)
    next(iter(stream))  # the turn is running on a
    process_a.send_signal(signal.SIGKILL)
    process_a.wait(30)
    assert users(b, "killed") == ["finished turn"]
    ask(b, "killed", "carried on")
    assert users(b, "killed") == ["finished turn", "carried on"]
