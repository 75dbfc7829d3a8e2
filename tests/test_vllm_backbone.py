"""The controller driven by vLLM (its CPU build) serving the shipped SmolLM2 folder: the tool-usage
axis on a real engine, through its own function calling (tool_choice "required" decodes under the
tools' JSON schema; "auto" goes through its hermes parser).

vLLM's CPU build pins transformers < 5.20 and needs a venv of its own, so this test runs where one
is made (`make vllm`, about 3 minutes and 1 GB): it starts `python -m vllm.entrypoints.openai.
api_server` from $SIGNALGRAPH_VLLM_PYTHON (default .venv-vllm/bin/python) and skips, saying how,
when there is none.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from agent.config import AgentConfig, RemoteBackbone
from agent.runtime import Runtime
from graphs.reply import is_markup

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("SIGNALGRAPH_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM venv: run `make vllm` (or set "
                                 "SIGNALGRAPH_VLLM_PYTHON) to test against vLLM's CPU build")]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory, wait_until_answers):
    from models.assets import resolve

    folder = resolve("shipped:smollm2-135m-instruct")  # the folder `signalgraph models prepare` made
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model",
                                    str(folder), "--served-model-name", "smollm2", "--port", str(port),
                                    "--max-model-len", "4096", "--enable-auto-tool-choice", "--tool-call-parser",
                                    "hermes"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        # it compiles its model on first start
        wait_until_answers(f"{url}/health", process, timeout=600, what="vLLM", log=lambda: log.read_text()[-3000:])
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def _agent(tmp_path, url: str, profile, tool_calls: str) -> Runtime:
    config = AgentConfig(data_dir=tmp_path / tool_calls, allowed_dirs=[tmp_path], max_new_tokens=256, retrieve_k=0,
                         backbone=RemoteBackbone(base_url=f"{url}/v1", model="smollm2", tool_calls=tool_calls))
    return Runtime(config, profile)


def _photo(tmp_path) -> str:
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (30, 120, 200)).save(photo)
    return str(photo)


def test_vllm_structured_outputs_choose_the_tool_and_the_controller_runs_it(vllm_url, tmp_path, tiny_profile):
    """`tool_calls: schema`: the call decoded under the tools' JSON schema, run, and answered in words."""
    agent = _agent(tmp_path, vllm_url, tiny_profile, "schema")
    try:
        streamed: list[str] = []
        for on_text in (None, streamed.append):
            result = agent.controller.turn(f"s-{on_text is None}", "What is in this photo?",
                                           [{"path": _photo(tmp_path)}], tools=["describe_image"], require_tool=True,
                                           on_text=on_text)
            acted = [e for e in result.trace if e["step"] == "act"]
            assert acted and {e["tool"] for e in acted} == {"describe_image"}, [str(e) for e in result.trace]
            assert all(isinstance(e["args"], dict) and e["args"].get("image") == "image-1" for e in acted)
            assert result.text and not is_markup(result.text)
            assert result.usage["prompt_tokens"] > 0  # counted by vLLM
        chat = agent.controller.turn("chat", "What is the capital of France?", tools=["describe_image"])
        assert chat.text and not is_markup(chat.text)  # a reply in words under the same schema
    finally:
        agent.close()


def test_vllm_native_function_calling_reaches_the_controller(vllm_url, tmp_path, tiny_profile):
    """`tool_calls: native`: vLLM's own function calling. Its CPU build (0.32) does not hold a call's
    arguments to the tool's schema (a named tool gave a bare string), so the controller must take
    whatever comes back: a call it runs or one it reports as malformed, and words either way."""
    agent = _agent(tmp_path, vllm_url, tiny_profile, "native")
    try:
        result = agent.controller.turn("s", "What is in this photo?", [{"path": _photo(tmp_path)}],
                                       tools=["describe_image"], require_tool=True)
        (think, *_) = [e for e in result.trace if e["step"] == "think"]
        assert think["tool_calls"] == ["describe_image"] or think["malformed"], str(think)
        assert result.text and not is_markup(result.text)
    finally:
        agent.close()
