"""`signalgraph serve --ray`: the tiny profile as Ray Serve deployments on a local Ray cluster
(started by the command, as a user would), answering through the official client; an expert model
run through its own deployment gives what it gives in-process; a killed backbone replica is
replaced by Ray and the next turn is answered, not hung."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

pytest.importorskip("ray.serve", reason="pip install 'signalgraph[ray]'")
pytestmark = pytest.mark.cluster

MODEL = "signalgraph-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def on_ray(tmp_path_factory, wait_until_answers):
    """The server on Ray; yields (url, ray) with this process connected to its cluster as a driver."""
    import ray

    work = tmp_path_factory.mktemp("ray")
    port = _free_port()
    config = work / "signalgraph.yaml"
    config.write_text(f"data_dir: {work / 'data'}\n")
    process = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "--profile", "tiny", "--config", str(config),
                                "serve", "--ray", "--port", str(port)], env=dict(os.environ), cwd=work,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/readyz", process, timeout=300, what="the Ray deployments",
                           log=lambda: process.stdout.read())
        ray.init(address="auto", log_to_driver=False)
        yield url, ray
    finally:
        ray.shutdown()
        if process.poll() is None:
            process.terminate()
            output, _ = process.communicate(timeout=180)
            assert "Traceback" not in output, output[-3000:]


def _replicas(ray, deployment: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::signalgraph#{deployment}#"))


def test_every_model_is_a_deployment_and_the_api_answers(on_ray):
    url, ray = on_ray
    for name in ("gateway", "backbone", "transcriber", "speech", "image_encoder", "image_generator",
                 "audio_generator", "embedder"):
        assert len(_replicas(ray, name)) == 1, name
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    reply = api.chat.completions.create(model=MODEL, user="ray-1", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert [e["step"] for e in reply.model_extra["signalgraph"]["trace"]][-1] == "respond"
    chunks = list(api.chat.completions.create(model=MODEL, user="ray-1", stream=True,
                                              messages=[{"role": "user", "content": "and again"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    turns = httpx.get(f"{url}/v1/sessions/ray-1").json()["turns"]
    assert [t["user"] for t in turns] == ["hello", "and again"]


def test_a_tool_runs_its_model_in_the_expert_deployment(on_ray, tmp_path, tiny_profile):
    """The transcribe tool with its model in the `transcriber` deployment: run there, not here."""
    url, ray = on_ray
    from ray import serve

    from tools.expert_tools import ToolContext, build_tools, call_tool
    from tools.media_store import MediaStore
    from tools.model_pool import default_pool
    from tools.ray_pool import RayModelPool

    store = MediaStore(tmp_path / "media")
    t = np.arange(16_000) / 16_000
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16_000, format="WAV")
    record = store.add_bytes("s", buffer.getvalue(), "audio", ".wav")

    def transcribe(pool) -> dict:
        context = ToolContext(session="s", profile=tiny_profile, store=store, pool=pool, output_dir=tmp_path / "out")
        (tool,) = build_tools(context, allow=["transcribe"])
        outcome = call_tool(tool, {"audio": record.id})
        assert outcome.error is None, outcome.error
        return outcome.artifact

    remote = RayModelPool({"transcriber": serve.get_deployment_handle("transcriber", app_name="signalgraph")})
    result = transcribe(remote)
    assert result["text"].strip() and result["seconds"] == 1.0
    assert ("transcriber", tiny_profile.transcriber) not in default_pool()  # it ran there, not here
    with pytest.raises(Exception, match="no deployment serves the speech"):
        remote.get("speech", tiny_profile.speech, lambda spec: None)


def test_a_killed_backbone_replica_is_replaced_and_the_next_turn_answered(on_ray):
    url, ray = on_ray
    (before,) = _replicas(ray, "backbone")
    ray.kill(ray.get_actor(before, namespace="serve"), no_restart=True)
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        reply = api.chat.completions.create(model=MODEL, user="ray-2", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
    except openai.APIStatusError as exc:  # allowed: a clear 503 while Ray starts the new replica
        assert exc.status_code == 503 and "backbone" in exc.message
    deadline = time.monotonic() + 180
    while (after := _replicas(ray, "backbone")) in ([], [before]):
        assert time.monotonic() < deadline, "Ray did not replace the backbone replica"
        time.sleep(0.5)
    assert after != [before]
    reply = api.chat.completions.create(model=MODEL, user="ray-2", messages=[{"role": "user", "content": "hi again"}])
    assert reply.choices[0].message.content
