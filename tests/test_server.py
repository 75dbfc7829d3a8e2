"""The HTTP API as its clients meet it: the official `openai` client against a real uvicorn server
on 127.0.0.1, over the tiny profile.

The contract tests run the real tiny backbone. Tests about media routing, errors and the queue use
the project's ScriptedThinker (graphs/scripted.py) so the backbone writes a known tool call; the
tools, media store, controller and server are the real ones.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile
from PIL import Image

from agent.config import AgentConfig
from agent.runtime import Runtime
from agent.server.app import create_app
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult
from models.specs import MediaLimits

MODEL = "signalgraph-tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}


def runtime(tmp_path, profile, thinker=None) -> Runtime:
    return Runtime(AgentConfig(data_dir=tmp_path / "data", allowed_dirs=[tmp_path]), profile, thinker=thinker)


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def png_data_url(size: int = 16, colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_base64(seconds: float = 0.5) -> str:
    buffer = io.BytesIO()
    t = np.arange(int(16_000 * seconds)) / 16_000
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def call(name: str, **args) -> dict:
    return {"id": f"call-{name}", "name": name, "args": args}


# --- the real tiny backbone ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_url(running, tmp_path_factory, tiny_profile):
    with running(create_app(runtime(tmp_path_factory.mktemp("model"), tiny_profile))) as url:
        yield url


def test_models_lists_the_profile_model(model_url):
    api = client(model_url)
    assert [m.id for m in api.models.list()] == [MODEL]
    assert api.models.retrieve(MODEL).owned_by == "signalgraph"


def test_a_completion_is_one_controller_turn_with_its_trace(model_url):
    raw = client(model_url).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}])
    completion = raw.parse()
    session = raw.headers["x-session-id"]
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == MODEL
    # the tiny random model writes until its token limit
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    extension = completion.model_extra["signalgraph"]
    assert extension["session"] == session
    assert [e["step"] for e in extension["trace"]][:3] == ["ingest", "retrieve", "think"]


def test_streaming_gives_the_same_reply_in_chunks(model_url):
    api = client(model_url)
    whole = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}])
    chunks = list(api.chat.completions.create(model=MODEL, stream=True,
                                              messages=[{"role": "user", "content": "Name a colour."}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == whole.choices[0].message.content
    assert chunks[-1].model_extra["signalgraph"]["trace"][0]["step"] == "ingest"


# --- OpenAI's contract: every response validates against the openai package's own types ---------


def _valid(kind, body: dict):
    """`body` as the openai package's pydantic type, validated strictly (no coercion)."""
    return kind.model_validate(body, strict=True)


def test_a_completion_validates_with_the_usage_the_backbone_counted(model_url):
    from openai.types.chat import ChatCompletion

    body = httpx.post(f"{model_url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there"}]}).json()
    completion = _valid(ChatCompletion, body)
    usage = completion.usage
    assert usage.prompt_tokens > 10 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert isinstance(completion.system_fingerprint, str) and completion.system_fingerprint.startswith("fp_")
    assert body["choices"][0]["message"]["annotations"] == []
    # the think rounds' own counts: the trace's rounds wrote what completion_tokens counts
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_bounds_the_reply_and_says_length(model_url):
    completion = client(model_url).chat.completions.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Tell me a long story."}])
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 3


def test_a_stream_validates_and_ends_with_usage_when_asked(model_url):
    from openai.types.chat import ChatCompletionChunk

    with httpx.stream("POST", f"{model_url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Name a colour."}]}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [_valid(ChatCompletionChunk, json.loads(e)) for e in events[:-1]]
    *body, last = chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert body[-1].choices[0].finish_reason in ("stop", "length")
    assert last.choices == [] and last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 10
    assert len({c.system_fingerprint for c in chunks}) == 1
    plain = client(model_url).chat.completions.create(model=MODEL, stream=True,
                                                      messages=[{"role": "user", "content": "Name a colour."}])
    assert all(c.usage is None for c in plain)  # no usage unless asked for


def test_what_the_server_cannot_do_is_400_naming_the_parameter(model_url):
    api = client(model_url)
    hi = [{"role": "user", "content": "hi"}]
    for fields, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                          ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"modalities": ["text", "audio"]}, "modalities"), ({"logit_bias": {"50": 5}}, "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model=MODEL, messages=hi, **fields)
        assert caught.value.body["param"] == param and caught.value.body["code"] == "unsupported_parameter", fields
    # what asks for nothing more is fine
    assert api.chat.completions.create(model=MODEL, messages=hi, n=1, logprobs=False, max_tokens=2,
                                       response_format={"type": "text"}).choices


def test_a_session_header_or_user_field_keeps_the_history(model_url):
    api = client(model_url)
    for text in ("first", "second"):
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                    extra_headers={"X-Session-Id": "kept"})
    api.chat.completions.create(model=MODEL, user="kept", messages=[{"role": "user", "content": "third"}])
    turns = httpx.get(f"{model_url}/v1/sessions/kept").json()["turns"]
    assert [t["user"] for t in turns] == ["first", "second", "third"]
    assert all(t["trace"][0]["step"] == "ingest" for t in turns)


def test_a_new_session_starts_from_the_messages_the_request_carries(model_url):
    raw = client(model_url).chat.completions.with_raw_response.create(model=MODEL, messages=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"}])
    turns = httpx.get(f"{model_url}/v1/sessions/{raw.headers['x-session-id']}").json()["turns"]
    assert [(t["user"], bool(t["trace"])) for t in turns] == [("My name is Ada.", False), ("What is my name?", True)]
    assert turns[0]["assistant"] == "Hello Ada."


def test_caller_tools_come_back_as_tool_calls_not_run(model_url):
    completion = client(model_url).chat.completions.create(
        model=MODEL, max_tokens=200, tools=[WEATHER], tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert set(json.loads(tool_call.function.arguments)) == {"city"}  # decoded under the tool's schema


def test_caller_tools_stream_and_take_the_results_back(model_url):
    api = client(model_url)
    chunks = list(api.chat.completions.create(
        model=MODEL, max_tokens=200, stream=True, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "Weather?"}]))
    calls = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].id
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    answer = api.chat.completions.create(model=MODEL, max_tokens=8, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0].id, "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}])
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


# --- media, errors and limits: a scripted backbone ----------------------------------------------

@pytest.fixture(scope="module")
def scripted(running, tmp_path_factory, tiny_profile):
    thinker = ScriptedThinker()
    profile = tiny_profile.model_copy(update={"limits": MediaLimits(max_bytes=200_000, max_image_pixels=64 * 64)})
    app = create_app(runtime(tmp_path_factory.mktemp("scripted"), profile, thinker))
    with running(app) as url:
        yield url, thinker


def test_an_image_and_audio_go_in_and_a_generated_image_comes_back_as_a_url(scripted):
    url, thinker = scripted
    thinker.script += [ThinkResult("", [call("generate_image", prompt="a red square")]),
                       ThinkResult("Here is a red square: image-2.")]
    content = [{"type": "text", "text": "Draw this again."},
               {"type": "image_url", "image_url": {"url": png_data_url()}},
               {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}}]
    completion = client(url).chat.completions.create(model=MODEL, user="pictures",
                                                     messages=[{"role": "user", "content": content}])
    assert [(m["id"], m["kind"]) for m in thinker.seen[-2]["media"]] == [("image-1", "image"), ("audio-1", "audio")]
    message = completion.choices[0].message
    (item,) = message.model_extra["media"]
    assert item["kind"] == "image" and item["url"] == f"{url}/v1/media/pictures/{item['id']}"
    assert message.content.startswith("Here is a red square: image-2.") and item["id"] == "image-2"
    assert f"![{item['id']}]({item['url']})" in message.content
    response = httpx.get(item["url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size[0] > 0


def test_a_generated_image_streams_as_a_link_and_a_media_list(scripted):
    url, thinker = scripted
    thinker.script += [ThinkResult("", [call("generate_image", prompt="a blue circle")]), ThinkResult("{")]
    chunks = list(client(url).chat.completions.create(model=MODEL, stream=True, user="stream-pictures",
                                                      messages=[{"role": "user", "content": "Draw a circle"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    (item,) = chunks[-1].model_extra["signalgraph"]["media"]
    # the model's "{" is held back; the reply is the tool's own sentence, then the link
    assert text == f'I drew "a blue circle": {item["id"]}.\n\n![{item["id"]}]({item["url"]})'
    assert httpx.get(item["url"]).status_code == 200


def test_a_streamed_reply_completed_by_the_response_stage_is_sent_once(scripted):
    url, thinker = scripted
    thinker.script += [ThinkResult("", [call("describe_image", image="image-9")]), ThinkResult("Let me see.")]
    chunks = list(client(url).chat.completions.create(model=MODEL, stream=True, user="completed",
                                                      messages=[{"role": "user", "content": "What is image-9?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("Let me see. I could not run describe image: ") and text.count("Let me see.") == 1
    turns = httpx.get(f"{url}/v1/sessions/completed").json()["turns"]
    assert turns[-1]["assistant"] == text


def test_malformed_bodies_are_400(scripted):
    url, _ = scripted
    for body in ("{not json", "[1, 2]"):
        response = httpx.post(f"{url}/v1/chat/completions", content=body)
        assert response.status_code == 400
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert caught.value.body["param"] == "messages[0].content[1]" and "data URL" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}]}])
    assert caught.value.body["code"] == "invalid_media"
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}])
    assert caught.value.body["code"] == "invalid_base64"


def test_invalid_fields_are_422_naming_the_field(scripted):
    url, _ = scripted
    api = client(url)
    cases = [({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
             ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
              "messages[0].content[0].image_url.url"),
             ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}},
               "messages": [{"role": "user", "content": "hi"}]}, "tool_choice"),
             ({"user": "knowledge-base", "messages": [{"role": "user", "content": "hi"}]}, "user")]
    for fields, param in cases:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            api.chat.completions.create(model=MODEL, **fields)
        assert caught.value.status_code == 422 and caught.value.body["param"] == param, fields


def test_unknown_models_media_and_routes_are_404(scripted):
    url, _ = scripted
    with pytest.raises(openai.NotFoundError) as caught:
        client(url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found" and MODEL in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-4o")
    response = httpx.get(f"{url}/v1/media/nobody/image-7")
    assert response.status_code == 404 and response.json()["error"]["code"] == "media_not_found"
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["code"] == "not_found"


def test_requests_and_media_over_the_limits_are_413(scripted):
    url, thinker = scripted
    api = client(url)
    huge = "x" * 2_000_000  # the body limit is 200 kB of media, base64-encoded, plus 1 MiB
    with pytest.raises(openai.APIStatusError) as caught:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": huge}])
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as caught:  # 100 x 100 pixels; the profile allows 64 x 64
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(100)}}]}])
    assert caught.value.status_code == 413 and caught.value.body["param"] == "messages[0].content[0]"
    noise = base64.b64encode(os.urandom(300_000)).decode()  # under the body limit, over the media limit
    with pytest.raises(openai.APIStatusError) as caught:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": noise, "format": "wav"}}]}])
    assert caught.value.status_code == 413 and caught.value.body["code"] == "media_too_large"
    assert thinker.script == []


def test_a_real_fault_is_500_with_its_cause(scripted):
    url, thinker = scripted
    assert thinker.script == []  # the scripted backbone has nothing left to say: an IndexError inside the turn
    with pytest.raises(openai.InternalServerError) as caught:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["type"] == "server_error" and "IndexError" in caught.value.message
    stream = client(url).chat.completions.create(model=MODEL, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIError, match="IndexError"):
        list(stream)


# --- auth and the queue -------------------------------------------------------------------------

def test_a_bearer_token_guards_the_api_but_not_the_page(running, tmp_path, tiny_profile):
    thinker = ScriptedThinker(ThinkResult("hello"))
    with running(create_app(runtime(tmp_path, tiny_profile, thinker), api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError) as caught:
            client(url, "wrong").models.list()
        assert caught.value.body["code"] == "invalid_api_key"
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
        assert httpx.get(f"{url}/v1/media/s/image-1").status_code == 401
        reply = client(url, "s3cret").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hello"
        assert httpx.get(f"{url}/").status_code == 200 and "chat.js" in httpx.get(f"{url}/").text


class GatedThinker(ScriptedThinker):
    """Waits for the test to open the gate: the test is about the queue, not the model."""

    def __init__(self, *script):
        super().__init__(*script)
        self.entered, self.gate = threading.Event(), threading.Event()

    def think(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait(timeout=60)
        return super().think(*args, **kwargs)


def test_a_full_queue_is_429(running, tmp_path, tiny_profile):
    thinker = GatedThinker(ThinkResult("first"), ThinkResult("third"))
    # one turn at a time and no room to wait: the second request finds the queue full
    with running(create_app(runtime(tmp_path, tiny_profile, thinker), queue_size=0, max_concurrency=1)) as url:
        api = client(url)
        replies = []
        first = threading.Thread(target=lambda: replies.append(api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "one"}])))
        first.start()
        assert thinker.entered.wait(timeout=30)
        with pytest.raises(openai.RateLimitError) as caught:
            api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "two"}])
        assert caught.value.body["code"] == "queue_full"
        thinker.gate.set()
        first.join(timeout=30)
        assert replies[0].choices[0].message.content == "first"
        later = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "three"}])
        assert later.choices[0].message.content == "third"


# --- the command ------------------------------------------------------------------------------------

def test_signalgraph_serve_listens_on_loopback_with_a_key_from_the_environment(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "signalgraph.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    env = dict(os.environ, SIGNALGRAPH_API_KEY="from-env")
    process = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "--profile", "tiny", "--config", str(config),
                                "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "signalgraph serve did not come up"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                                     headers={"Authorization": "Bearer from-env"})
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert response.json()["data"][0]["id"] == MODEL
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/" in output and "Traceback" not in output


def test_the_servers_turn_queue_runs_sessions_at_once_and_each_session_in_order():
    """The queue is what lets the decode scheduler see several turns at once."""
    from agent.server.turn_queue import TurnQueue

    queue = TurnQueue(size=0, workers=3)
    running, most, log = set(), [0], []
    lock = threading.Lock()

    def job(name: str, session: str):
        def run():
            with lock:
                running.add(name)
                most[0] = max(most[0], len(running))
                log.append(("start", session, name))
            time.sleep(0.2)
            with lock:
                running.discard(name)
                log.append(("end", session, name))
        return run

    futures = [queue.submit(job("a1", "a"), "a"), queue.submit(job("b1", "b"), "b"), queue.submit(job("a2", "a"), "a")]
    with pytest.raises(Exception, match="busy"):
        queue.submit(job("c1", "c"), "c")  # 3 running or waiting already, and no queue
    for future in futures:
        future.result(timeout=10)
    assert most[0] == 2  # a1 and b1 together; a2 waited for a1
    assert log.index(("end", "a", "a1")) < log.index(("start", "a", "a2"))
    assert queue._keys == {}  # a session with nothing running or waiting is forgotten


def test_a_sessions_waiting_turns_leave_the_workers_to_other_sessions():
    from agent.server.turn_queue import TurnQueue

    queue = TurnQueue(size=4, workers=2)
    gate, started = threading.Event(), threading.Event()
    first = queue.submit(lambda: gate.wait(10), "a")
    waiting = [queue.submit(lambda: None, "a") for _ in range(3)]  # queued behind a's first turn
    other = queue.submit(started.set, "b")
    assert started.wait(5)  # b ran on the second worker while a's three turns waited
    assert not any(f.done() for f in waiting)
    gate.set()
    for future in [first, *waiting, other]:
        future.result(timeout=10)
    with pytest.raises(RuntimeError, match="boom"):
        queue.submit(lambda: (_ for _ in ()).throw(RuntimeError("boom")), "a").result(timeout=10)
    assert queue.submit(lambda: "after", "a").result(timeout=10) == "after"  # a failed turn frees its session
    assert queue._keys == {} and queue._admitted == 0


def test_an_action_that_needs_confirmation_waits_in_the_session_for_yes(running, tmp_path, tiny_profile, monkeypatch):
    """A registered high-risk tool (examples/mail_tool.py): the reply asks, `signalgraph.pending`
    names the action, and the user's "yes" in the same session runs it."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    monkeypatch.setenv("SIGNALGRAPH_OUTBOX", str(tmp_path / "outbox"))
    thinker = ScriptedThinker(ThinkResult("", [call("send_mail", to="bob@example.com", text="hi")]),
                              ThinkResult("Sent."))
    config = AgentConfig(data_dir=tmp_path / "data", allowed_dirs=[tmp_path], extra_tools=["mail_tool:send_mail"])
    with running(create_app(Runtime(config, tiny_profile, thinker=thinker))) as url:
        api = client(url)
        asked = api.chat.completions.create(model=MODEL, user="mail", messages=[
            {"role": "user", "content": "Send a mail to bob@example.com saying hi."}])
        message = asked.choices[0].message
        assert message.content.startswith("Shall I run send mail (to: bob@example.com, text: hi)?")
        assert asked.model_extra["signalgraph"]["pending"]["actions"][0]["tool"] == "send_mail"
        assert not (tmp_path / "outbox").exists()
        assert httpx.get(f"{url}/v1/sessions/mail").json()["pending"]["actions"][0]["tool"] == "send_mail"
        done = api.chat.completions.create(model=MODEL, user="mail", messages=[{"role": "user", "content": "yes"}])
        assert done.model_extra["signalgraph"]["pending"] is None
        (mail,) = (tmp_path / "outbox").iterdir()
        assert json.loads(mail.read_text()) == {"to": "bob@example.com", "text": "hi"}


def test_warming_up_does_the_first_turns_one_time_work(tmp_path, tiny_profile):
    from models.decoding.constrained import compile_stats

    served = runtime(tmp_path, tiny_profile)
    try:
        compiled = compile_stats["compiled"]
        served.warm_up()
        assert compile_stats["compiled"] == compiled + 1  # the default tool set's grammar
        assert served.thinker.mm._decoder is not None and "warm-up" not in served._tools
        hits = compile_stats["cache_hits"]
        served.controller.turn("s1", "hello")
        assert compile_stats["compiled"] == compiled + 1 and compile_stats["cache_hits"] > hits
        assert served.controller.sessions() == ["s1"]  # the warm-up left no session behind
    finally:
        served.close()
