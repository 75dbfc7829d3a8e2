"""Routing of one turn through the LangGraph controller.

These tests are about the graph, so the backbone is a scripted thinker that returns canned
outputs (the real backbone's decoding is tested in test_constrained_decoding and in the CLI
test below). Tools, media store and checkpointer are the real ones.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
from langchain_core.messages import ToolMessage
from langchain_core.tools import StructuredTool
from PIL import Image
from pydantic import BaseModel

from graphs.controller import Controller
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult
from tools.media_store import MediaStore


def call(name: str, index: int = 0, **args) -> dict:
    return {"id": f"call-{name}-{index}", "name": name, "args": args}


class Wait(BaseModel):
    seconds: float = 0.3


def _recording_tool(name: str, log: list, fail: Exception | None = None) -> StructuredTool:
    def run(seconds: float = 0.3) -> str:
        start = time.perf_counter()
        time.sleep(seconds)
        log.append((name, start, time.perf_counter(), threading.get_ident()))
        if fail is not None:
            raise fail
        return f"{name} done"

    return StructuredTool.from_function(run, name=name, description=f"waits, as {name}", args_schema=Wait,
                                        metadata={"effect": "reads"})


@pytest.fixture
def store(tmp_path):
    allowed = tmp_path / "inbox"
    allowed.mkdir()
    return MediaStore(tmp_path / "media", allowed_dirs=[allowed])


def make(tmp_path, store, thinker, tools=(), **kwargs) -> Controller:
    return Controller(thinker=thinker, store=store, tools_for=lambda session: list(tools),
                      data_dir=tmp_path / "data", **kwargs)


def steps(trace: list[dict]) -> list[str]:
    return [entry["step"] for entry in trace]


def test_plain_text_goes_straight_to_the_user(tmp_path, store):
    streamed = []
    controller = make(tmp_path, store, ScriptedThinker(ThinkResult("Paris.", raw="Paris.")))
    result = controller.turn("s", "capital of France?", on_text=streamed.append)
    assert result.text == "Paris." and "".join(streamed) == "Paris."
    assert steps(result.trace) == ["ingest", "retrieve", "think", "respond"]


def test_independent_tool_calls_run_in_parallel_and_return_in_call_order(tmp_path, store):
    log: list = []
    tools = [_recording_tool(f"slow{i}", log) for i in range(4)]
    thinker = ScriptedThinker(
        ThinkResult("", [call(f"slow{i}", i, seconds=0.2 + 0.1 * (3 - i)) for i in range(4)]),
        ThinkResult("All four finished."),
    )
    result = make(tmp_path, store, thinker, tools).turn("s", "run them all")
    assert result.text == "All four finished."
    starts, ends = [s for _, s, _, _ in log], [e for _, _, e, _ in log]
    assert max(starts) < min(ends)  # every call started before any finished: they overlapped
    history = make(tmp_path, store, ScriptedThinker(), tools).state("s")["messages"]
    tool_messages = [m for m in history if isinstance(m, ToolMessage)]
    assert [m.name for m in tool_messages] == ["slow0", "slow1", "slow2", "slow3"]  # call order, not finish order
    assert steps(result.trace) == ["ingest", "retrieve", "think", "gate", "act", "act", "act", "act", "collect",
                                   "think",
                                   "respond"]
    assert thinker.seen[1]["messages"][-1].content == "slow3 done"  # results go back to the backbone


@pytest.mark.parametrize("tool_call, expected", [
    (call("teleport"), "there is no tool called 'teleport'"),
    (call("broken", seconds=0.0), "broken failed: RuntimeError: disk on fire"),
    (call("sleepy", seconds=2.0), "did not finish within 0.3 s"),
])
def test_tool_failures_become_messages_and_the_session_goes_on(tmp_path, store, tool_call, expected):
    log: list = []
    tools = [_recording_tool("broken", log, RuntimeError("disk on fire")), _recording_tool("sleepy", log)]
    thinker = ScriptedThinker(ThinkResult("", [tool_call]), ThinkResult("Sorry, that failed."),
                              ThinkResult("Still here."))
    controller = make(tmp_path, store, thinker, tools, tool_timeout=0.3)
    result = controller.turn("s", "do it")
    # the model's words, then what really went wrong (LLaVA's lesson: show the real error)
    assert result.text.startswith("Sorry, that failed. I could not run ") and expected.split(": ")[-1] in result.text
    act = next(e for e in result.trace if e["step"] == "act")
    assert expected.split("failed: ")[-1] in act["error"]
    assert expected in thinker.seen[1]["messages"][-1].content
    assert controller.turn("s", "are you there?").text == "Still here."


def test_a_call_that_cannot_be_repaired_is_explained_and_the_session_goes_on(tmp_path, store):
    thinker = ScriptedThinker(ThinkResult("", malformed=["expected a JSON object, got 'transcribe audio-1'"]),
                              ThinkResult("Fine now."))
    controller = make(tmp_path, store, thinker)
    result = controller.turn("s", "transcribe it")
    assert "wrote the call wrongly" in result.text and "transcribe audio-1" in result.text
    assert controller.turn("s", "again").text == "Fine now."


def test_a_turn_can_narrow_the_tools_and_require_one(tmp_path, store):
    log: list = []
    tools = [_recording_tool("first", log), _recording_tool("second", log)]
    thinker = ScriptedThinker(ThinkResult("", [call("second", seconds=0.0)]), ThinkResult("done"))
    make(tmp_path, store, thinker, tools).turn("s", "use the second", tools=["second"], require_tool=True)
    assert thinker.seen[0]["tools"] == ["second"] and thinker.seen[0]["require_tool"] is True
    assert thinker.seen[1]["require_tool"] is False  # only the first step is forced


def test_the_loop_stops_after_max_steps(tmp_path, store):
    log: list = []
    tool = _recording_tool("again", log)
    thinker = ScriptedThinker(*[ThinkResult("", [call("again", seconds=0.001 * i)]) for i in range(5)])
    result = make(tmp_path, store, thinker, [tool], max_steps=2).turn("s", "loop")
    assert steps(result.trace).count("think") == 2 and len(log) == 2
    assert result.text == "again done"  # silent after its tools: their own sentences, said once


def test_a_call_repeated_word_for_word_in_a_turn_runs_once(tmp_path, store):
    log: list = []
    thinker = ScriptedThinker(ThinkResult("", [call("same", seconds=0.0)]), ThinkResult("", [call("same",
                                                                                                  seconds=0.0)]),
                              ThinkResult("ok"))
    result = make(tmp_path, store, thinker, [_recording_tool("same", log)]).turn("s", "go")
    assert len(log) == 1 and steps(result.trace).count("act") == 1


def test_attachments_are_stored_once_and_referred_to_by_id(tmp_path, store):
    photo = tmp_path / "inbox" / "red.png"
    Image.new("RGB", (8, 8), "red").save(photo)
    thinker = ScriptedThinker(ThinkResult("A red square."), ThinkResult("Same again."))
    controller = make(tmp_path, store, thinker)
    controller.turn("s", "what is this?", [{"kind": "image", "path": str(photo)}])
    controller.turn("s", "and this?", [{"kind": "image", "path": str(photo)}])
    media = thinker.seen[0]["media"]
    assert media[0]["id"] == "image-1" and media[0]["kind"] == "image"
    assert "[attached: image-1]" in thinker.seen[0]["messages"][-1].content
    state = controller.state("s")
    assert all("base64" not in str(m.content) for m in state["messages"])  # ids, not bytes, in the checkpoint


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd"])
def test_paths_outside_the_allowed_folders_are_refused(tmp_path, store, path):
    (tmp_path / "outside.png").write_bytes(b"not even an image")
    thinker = ScriptedThinker(ThinkResult("I could not open that."))
    result = make(tmp_path, store, thinker).turn("s", "look", [{"kind": "image", "path": str(tmp_path / "inbox" / path)
                                                               if path.startswith("..") else path}])
    reject = next(e for e in result.trace if e["step"] == "reject")
    assert "allowed" in reject["reason"]
    assert thinker.seen[0]["media"] == []


def test_sessions_are_isolated(tmp_path, store):
    photo = tmp_path / "inbox" / "blue.png"
    Image.new("RGB", (8, 8), "blue").save(photo)
    thinker = ScriptedThinker(ThinkResult("one"), ThinkResult("two"))
    controller = make(tmp_path, store, thinker)
    controller.turn("alice", "my secret is 42", [{"kind": "image", "path": str(photo)}])
    controller.turn("bob", "what is alice's secret?")
    assert all("42" not in str(m.content) for m in thinker.seen[1]["messages"])
    assert thinker.seen[1]["media"] == []
    with pytest.raises(Exception, match="image-1"):
        store.get("bob", "image-1")
    assert controller.sessions() == ["alice", "bob"]
    controller.delete_session("alice")
    assert controller.sessions() == ["bob"]


def test_signal_spans_go_to_the_generator_and_untrained_ones_say_why(tmp_path, store):
    thinker = ScriptedThinker()
    key = thinker.cache.put({"prompt_embeds": torch.zeros(77, 8)})
    thinker.script = [ThinkResult("Here it is.", spans=[{"modality": "image", "key": key, "error": None}]),
                      ThinkResult("Here.", spans=[{"modality": "image", "key": None,
                                                   "error": "the image output projector has no trained weights"}])]
    made = []

    def generate(modality, conditioning):
        made.append((modality, tuple(conditioning["prompt_embeds"].shape)))
        image = Image.new("RGB", (4, 4), "green")
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), ".png", {}

    controller = make(tmp_path, store, thinker, generate=generate)
    result = controller.turn("s", "draw a green square")
    assert made == [("image", (77, 8))]
    assert [m["id"] for m in result.media] == ["image-1"] and result.media[0]["path"].endswith(".png")
    gen = next(e for e in result.trace if e["step"] == "generate")
    assert gen["via"] == "output projector"
    second = controller.turn("s", "another")
    assert "no trained weights" in second.text and second.media == []


def test_conversation_persists_across_processes(tmp_path):
    """Two real `signalgraph ask` processes on the tiny profile share one session."""
    env_args = [sys.executable, "-m", "agent.cli.main", "--profile", "tiny"]
    config = tmp_path / "signalgraph.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nallowed_dirs: [{tmp_path}]\nmax_new_tokens: 4\n")
    for question in ("hello", "hello again"):
        done = subprocess.run([*env_args, "--config", str(config), "ask", question, "--session", "kept", "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    listed = subprocess.run([*env_args, "--config", str(config), "sessions"], capture_output=True, text=True,
                            timeout=300)
    name, count = listed.stdout.split("\t")
    assert name == "kept" and int(count.split()[0]) >= 4  # both turns' question and reply survived


def test_session_allowlists_come_from_config():
    from agent.config import AgentConfig

    config = AgentConfig(tools=["transcribe", "speak"], session_tools={"kiosk": ["search_knowledge"]})
    assert config.tools_for("kiosk") == ["search_knowledge"]
    assert config.tools_for("anyone") == ["transcribe", "speak"]
    assert AgentConfig().tools_for("anyone") is None  # no allowlist: every tool

