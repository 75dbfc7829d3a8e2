"""What a load balancer sees: /healthz, /readyz, and a graceful drain on SIGTERM (running turns
finish, new ones get 503), on a real uvicorn server with the tiny profile."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from agent.cli.serve import DrainingServer
from agent.config import AgentConfig
from agent.runtime import Runtime
from agent.server.app import create_app
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult


class SlowThinker(ScriptedThinker):
    """Takes `seconds` to think: a turn that is still running when the signal comes."""

    def __init__(self, seconds: float, *script):
        super().__init__(*script)
        self.seconds = seconds
        self.started = threading.Event()

    def think(self, *args, **kwargs):
        self.started.set()
        time.sleep(self.seconds)
        return super().think(*args, **kwargs)


def test_sigterm_lets_the_running_turn_finish_and_refuses_new_ones(tmp_path, tiny_profile):
    import uvicorn

    thinker = SlowThinker(2.0, ThinkResult("Finished after all."))
    runtime = Runtime(AgentConfig(data_dir=tmp_path / "data", allowed_dirs=[tmp_path]), tiny_profile, thinker=thinker)
    app = create_app(runtime)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"),
                            drain_seconds=30)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/readyz").status_code == 200
        body = {"model": "signalgraph-tiny", "messages": [{"role": "user", "content": "Take your time."}]}
        running: dict = {}
        turn = threading.Thread(target=lambda: running.update(
            reply=httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)))
        turn.start()
        assert thinker.started.wait(10)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on SIGTERM

        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive, only not taking turns
        turn.join(30)
        assert running["reply"].status_code == 200
        assert running["reply"].json()["choices"][0]["message"]["content"] == "Finished after all."
        serving.join(30)
        assert not serving.is_alive()  # it exits once the running turn is done
    finally:
        server.should_exit = True
        runtime.close()
