"""The response stage: every turn ends in words a person reads, and every generated file is in it.

The backbone here is a scripted thinker (the test is about what the controller makes of what the
model wrote); the tools are the real expert tools on the tiny profile with the shipped speech and
image models, the media store and the checkpointer are real.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent.proofs.tool_requests import tool_result
from graphs.controller import Controller
from graphs.reply import ProseGate, compose, is_markup
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult
from models.specs import ImageEncoderSpec, SpeechSpec, TranscriberSpec
from tools.expert_tools import TOOL_NAMES, ToolContext, build_tools
from tools.media_store import MediaStore
from tools.summaries import summary

CAT = Path(__file__).resolve().parents[1] / "examples" / "data" / "cat.jpg"


def call(name: str, index: int = 0, **args) -> dict:
    return {"id": f"call-{name}-{index}", "name": name, "args": args}


# --- the rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '{"audio": "audio-1", "text": "hello"}', '[{"label": "cat"}]', '{"image": "image-1", "pro',
    'Here: {"image": "image-1"}', '<tool_call>{"name": "speak"}</tool_call>', "Done. transcribe: hello",
    "Result of speak: I said it", "Here it is [IMG0][IMG1]", '[transcribe: "forest"]', "[speak: forest]",
])
def test_markup_is_never_a_reply(text):
    assert is_markup(text)


@pytest.mark.parametrize("text", ["Here is a red circle.", "Done.", "The sum is {3 + 4} in braces? No: 7.", "",
                                  "[Note: the meeting moved] It is at noon."])
def test_words_are_a_reply(text):
    assert not is_markup(text)


@pytest.mark.parametrize("name", TOOL_NAMES)
def test_every_tools_result_reads_as_words(name):
    rng = random.Random(0)
    from agent.proofs.tool_requests import requests

    item = next(i for i in requests(60, seed=1, single_only=True) if i["calls"][0]["name"] == name)
    result, _ = tool_result(item["calls"][0], rng)
    sentence = summary(name, result)
    assert sentence and not is_markup(sentence) and "{" not in sentence
    media = result.get("image") or result.get("audio") or ""
    assert media in sentence  # the id the link is made for is named
    reply = compose('{"oops": 1}', [{"name": name, "summary": sentence, "artifact": result, "error": None}])
    assert reply == sentence


def test_a_reply_that_leaves_out_the_finding_becomes_the_tools_sentence():
    result = {"audio": "audio-1", "text": "When is the team off-site?", "language": "en", "seconds": 2.1}
    row = {"name": "transcribe", "summary": summary("transcribe", result), "artifact": result, "error": None}
    # words that miss the finding give way to the tool's own sentence
    assert compose("Circle is circle, so yes.", [row]) == 'audio-1 says: "When is the team off-site?"'
    stated = 'The speaker asks: "when is the team off-site?"'
    assert compose(stated, [row]) == stated  # stated already: left alone


def test_a_failure_is_told_unless_a_retry_worked():
    ok = {"name": "speak", "summary": "I said it aloud (1 s): audio-2.", "artifact": {"audio": "audio-2"},
          "error": None}
    failed = {"name": "speak", "summary": "", "artifact": None, "error": "nothing speakable in '...'"}
    assert compose("", [failed]) == "I could not run speak: nothing speakable in '...'"
    assert compose("Said it: audio-2.", [failed, ok]) == "Said it: audio-2."
    assert compose("Said it.", [ok]) == ok["summary"]  # the new audio's id is what a reply must name


def test_a_round_that_opens_as_json_is_not_streamed():
    shown: list[str] = []
    gate = ProseGate(shown.append)
    for piece in ["  ", '{"au', 'dio": 1}']:
        gate(piece)
    assert shown == []
    gate = ProseGate(shown.append)
    for piece in ["", " Here", " it is."]:
        gate(piece)
    assert "".join(shown) == " Here it is."


# --- through the controller, with the real tools --------------------------------------------------


@pytest.fixture(scope="module")
def profile(tiny_profile, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIGNALGRAPH_HOME", str(tmp_path_factory.mktemp("signalgraph-home")))
        yield tiny_profile.model_copy(update={
            "name": "tiny-tools",
            "speech": SpeechSpec(source="shipped:piper-joe-medium"),
            "transcriber": TranscriberSpec(kind="faster_whisper", source="shipped:whisper-tiny.en"),
            "image_encoder": ImageEncoderSpec(kind="efficientnet_lite0", source="shipped:efficientnet-lite0"),
        })


@pytest.fixture
def turn(profile, tmp_path):
    """(script, text) -> the controller's TurnResult, the model's outputs scripted."""
    store = MediaStore(tmp_path / "media", allowed_dirs=[CAT.parent])

    def run(script: list[ThinkResult], text: str, attachments=()):
        thinker = ScriptedThinker(*script)
        tools = lambda session: build_tools(ToolContext(session, profile, store))  # noqa: E731
        controller = Controller(thinker=thinker, store=store, tools_for=tools, data_dir=tmp_path / "data")
        try:
            return controller.turn("s", text, list(attachments)), thinker
        finally:
            controller.close()

    yield run
    store.close()


def test_a_repeated_call_after_the_result_ends_in_the_tools_sentence(turn):
    spoken = call("speak", text="the meeting starts at noon")
    result, thinker = turn([ThinkResult("", [spoken]), ThinkResult("", [spoken])], "Read this out loud.")
    (item,) = result.media
    assert result.text.startswith('I said "the meeting starts at noon" aloud') and item["id"] in result.text
    # the backbone was shown the sentence, not JSON
    assert thinker.seen[1]["messages"][-1].content == result.text


def test_json_after_the_results_becomes_words_and_keeps_every_file(turn):
    script = [ThinkResult("", [call("describe_image", image="image-1"), call("generate_image", 1, prompt="a dog")]),
              ThinkResult("", [call("speak", text="woof")]),
              ThinkResult('{"image": "image-2", "labels": [{"label": "tabby"}]}')]
    result, _ = turn(script, "What is this? Then draw a dog and say woof.", [{"kind": "image", "path": str(CAT)}])
    assert not is_markup(result.text) and "{" not in result.text
    assert "image-1 looks like a" in result.text and 'I drew "a dog": image-2.' in result.text
    assert [m["id"] for m in result.media] == ["image-2", "audio-1"]  # a later tool does not drop the drawing
    respond = next(e for e in result.trace if e["step"] == "respond")
    assert respond["composed"] and respond["outputs"] == ["image-2", "audio-1"]


def test_a_turn_with_nothing_said_still_ends_in_words(turn):
    result, _ = turn([ThinkResult("")], "Hmm.")
    assert result.text and not is_markup(result.text)


@pytest.mark.parametrize("question", ["Hi! What can you do?", "How can you help me?", "What are your capabilities?",
                                      "What tools do you have?", "help",
                                      "Which things are you able to help me with today?"])
def test_what_can_you_do_is_answered_from_the_sessions_tools(turn, question):
    result, _ = turn([ThinkResult("You can search for information about the human body.")], question)
    # the session's six tools and no trained projectors (a scripted thinker has no skills): exactly that
    assert result.text == ("I can answer questions and chat. With my tools I can write down what is said in a "
                           "recording, read text aloud, name what a photo shows, draw a picture from a description, "
                           "make a sound from a description and search your notes.")


def test_other_questions_keep_the_models_words(turn):
    result, _ = turn([ThinkResult("Paris is the capital of France.")], "What can you tell me about Paris?")
    assert result.text == "Paris is the capital of France."


@pytest.mark.parametrize("said, reply", [("circle [image-1]", "circle"), ("It is a circle.\n[attached: image-1]",
                                                                          "It is a circle.")])
def test_echoed_media_notes_are_not_words(turn, said, reply):
    result, _ = turn([ThinkResult(said)], "Which shape is this?", [{"kind": "image", "path": str(CAT)}])
    assert result.text == reply


def test_a_reply_that_is_only_an_echoed_note_becomes_words(turn):
    result, _ = turn([ThinkResult("[attached: image-1]")], "Say forest out loud.",
                     [{"kind": "image", "path": str(CAT)}])
    assert result.text and "[" not in result.text and "image-1" not in result.text


@pytest.mark.parametrize("size", [1, 2, 3, 5, 50])
def test_echoed_notes_are_dropped_from_the_stream_too(size):
    from graphs.reply import PlainLinkStream, plain_links

    text = "A circle [image-1] and [attached: image-1, audio-2] a [link](http://x) [not a note]."
    out: list[str] = []
    stream = PlainLinkStream(out.append)
    for i in range(0, len(text), size):
        stream(text[i:i + size])
    stream.flush()
    assert "".join(out) == plain_links(text) == "A circle and a link (http://x) [not a note]."
