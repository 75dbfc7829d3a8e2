"""Expert tools on real models: the tiny profile's Stable Diffusion and AudioLDM-2 (random weights of
the real classes, built in code), and the shipped piper voice, Whisper tiny.en and EfficientNet-lite0.

The tiny pipelines are built once per module into a private SIGNALGRAPH_HOME; each module-level
fixture shares one ModelPool, so every model loads once for the whole file.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from langchain_core.messages import ToolMessage

from models.media import load_audio, load_image
from models.specs import ImageEncoderSpec, SpeechSpec, TranscriberSpec
from tools.expert_tools import (
    TOOL_NAMES,
    ToolContext,
    UnknownToolError,
    build_tools,
    call_tool,
    runnable_tools,
    tool_schemas,
)
from tools.media_store import MediaStore
from tools.model_pool import ModelPool
from tools.summaries import summary

CAT = Path(__file__).resolve().parents[1] / "examples" / "data" / "cat.jpg"


@pytest.fixture(scope="module")
def profile(tiny_profile, tiny_home):
    """The tiny profile with the shipped speech models and EfficientNet-lite0 (real weights)."""
    return tiny_profile.model_copy(update={
        "name": "tiny-tools",
        "speech": SpeechSpec(source="shipped:piper-joe-medium"),
        "transcriber": TranscriberSpec(kind="faster_whisper", source="shipped:whisper-tiny.en"),
        "image_encoder": ImageEncoderSpec(kind="efficientnet_lite0", source="shipped:efficientnet-lite0"),
    })


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool()


@pytest.fixture
def store(tmp_path: Path):
    with MediaStore(tmp_path / "store", allowed_dirs=[CAT.parent]) as s:
        yield s


@pytest.fixture
def context(profile, store, pool, tmp_path) -> ToolContext:
    return ToolContext(session="s1", profile=profile, store=store, pool=pool, output_dir=tmp_path / "out")


def _tools(context: ToolContext, allow=None) -> dict:
    return {tool.name: tool for tool in build_tools(context, allow)}


def _artifact(tool, args: dict) -> dict:
    """What programs read of a successful call: the tool's dict (its sentence is checked too)."""
    outcome = call_tool(tool, args)
    assert outcome.error is None, outcome.error
    assert outcome.text == summary(tool.name, outcome.artifact) and "{" not in outcome.text
    return outcome.artifact


def _call(tool, **args) -> ToolMessage:
    """Invoke as the controller does: with a tool call, so errors come back as status='error'."""
    return tool.invoke({"type": "tool_call", "id": "call-1", "name": tool.name, "args": args})


# --- speech in and out ------------------------------------------------------------------------


def test_speak_then_transcribe_round_trip(context, store):
    tools = _tools(context)
    spoken = _artifact(tools["speak"], {"text": "The quick brown fox jumps over the lazy dog."})
    assert spoken["audio"] == "audio-1" and spoken["seconds"] > 1.0
    record = store.get("s1", "audio-1")
    assert record.origin == "generated" and record.suffix == ".wav" and record.meta["tool"] == "speak"
    assert len(load_audio(record.path)) > 16_000
    assert (context.output_dir / "s1" / "audio-1.wav").read_bytes() == record.path.read_bytes()

    heard = _artifact(tools["transcribe"], {"audio": "audio-1"})
    words = heard["text"].lower()
    # piper samples noise in its voice, so each rendering differs a little, and now and then
    # Whisper tiny.en mishears one word of it ("lizzy dog"): one slip in five is allowed
    assert sum(word in words for word in ("quick", "brown", "fox", "lazy", "dog")) >= 4, heard
    assert heard["audio"] == "audio-1" and heard["language"] == "en"
    assert summary("transcribe", heard) == f'audio-1 says: "{heard["text"].strip()}"'
    assert summary("speak", spoken).startswith('I said "The quick brown fox') and spoken["audio"] in summary("speak",
                                                                                                             spoken)


def test_speak_with_nothing_speakable_is_a_message(context):
    result = _call(_tools(context)["speak"], text="...")
    assert result.status == "error" and "nothing speakable" in result.content


# --- images -----------------------------------------------------------------------------------


def test_describe_image_names_the_cat(context, store):
    store.add_file("s1", CAT)
    result = _artifact(_tools(context)["describe_image"], {"image": "image-1", "top_k": 3})
    labels = [entry["label"].lower() for entry in result["labels"]]
    assert len(labels) == 3 and any("cat" in label or "tabby" in label for label in labels), result
    assert all(0.0 <= entry["score"] <= 1.0 for entry in result["labels"])
    top = result["labels"][0]
    assert summary("describe_image", result).startswith("image-1 looks like a") and top["label"] in summary(
        "describe_image", result) and f"({round(100 * top['score'])}%)" in summary("describe_image", result)


def test_describe_image_without_a_classifier_says_so(context, tiny_profile):
    context.profile = tiny_profile  # its image encoder is a CLIP vision tower: features, no labels
    result = _call(_tools(context)["describe_image"], image="image-1")
    assert result.status == "error" and "no image description head is configured" in result.content


def test_generate_image_gives_a_new_png_id_each_time(context, store):
    tools = _tools(context)
    first = _artifact(tools["generate_image"], {"prompt": "a red bicycle", "seed": 3})
    second = _artifact(tools["generate_image"], {"prompt": "a red bicycle", "seed": 3})
    assert first == {"image": "image-1", "prompt": "a red bicycle"} and second["image"] == "image-2"
    one, two = store.get("s1", "image-1"), store.get("s1", "image-2")
    assert one.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_image(one.path).size == (32, 32)
    assert one.sha256 == two.sha256  # same prompt and seed: same pixels, still two ids
    assert one.meta["prompt"] == "a red bicycle" and one.meta["seed"] == 3


def test_parallel_generations_get_distinct_ids(context, store):
    tool = _tools(context)["generate_image"]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda s=s: results.append(_artifact(tool, {"prompt": "a boat", "seed": s})))
               for s in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r["image"] for r in results) == ["image-1", "image-2", "image-3"]


def test_generate_image_without_a_generator_is_a_plain_message(context, profile):
    context.profile = profile.model_copy(update={"image_generator": None})
    assert "generate_image" not in runnable_tools(context.profile)  # a runtime does not offer it
    result = _call(_tools(context, ["generate_image"])["generate_image"], prompt="a cat")
    assert isinstance(result, ToolMessage) and result.status == "error"
    assert result.content.startswith("no image generator is configured in profile 'tiny-tools'")
    # invoked with plain arguments, the message is the result itself
    assert "no image generator" in _tools(context, ["generate_image"])["generate_image"].invoke({"prompt": "a cat"})


# --- audio ------------------------------------------------------------------------------------


def test_generate_audio_gives_a_wav_id(context, store):
    result = _artifact(_tools(context)["generate_audio"], {"prompt": "rain on a roof", "seconds": 0.5, "seed": 1})
    assert result["audio"] == "audio-1" and result["seconds"] == pytest.approx(0.5, abs=0.05)
    record = store.get("s1", "audio-1")
    assert record.path.read_bytes()[:4] == b"RIFF" and record.suffix == ".wav"
    assert len(load_audio(record.path)) == pytest.approx(8000, abs=800)


def test_generate_audio_without_a_generator_is_a_plain_message(context, profile):
    context.profile = profile.model_copy(update={"audio_generator": None})
    result = _call(_tools(context, ["generate_audio"])["generate_audio"], prompt="rain")
    assert result.status == "error" and "no audio generator is configured in profile" in result.content


# --- knowledge --------------------------------------------------------------------------------


class _FakeKB:
    """A stand-in knowledge base: this test is about the tool's result format, not retrieval
    (the real vector store has its own tests). It returns the passages it holds, in order."""

    def __init__(self) -> None:
        from langchain_core.documents import Document

        self.documents = [
            Document("Whisper transcribes speech.", metadata={"source": "models.md", "position": 3}),
            Document("Piper speaks text aloud.", metadata={"source": "speech.md", "position": 0}),
        ]
        self.calls: list[tuple[str, int]] = []

    def similarity_search_with_score(self, query: str, k: int = 4):
        self.calls.append((query, k))
        return [(doc, 0.9 - 0.1 * i) for i, doc in enumerate(self.documents[:k])]


def test_search_knowledge_returns_passages_with_sources(context):
    kb = _FakeKB()
    context.knowledge_base = kb
    result = _artifact(_tools(context)["search_knowledge"], {"query": "speech to text", "k": 2})
    assert kb.calls == [("speech to text", 2)]
    assert result["passages"][0] == {"text": "Whisper transcribes speech.", "source": "models.md",
                                     "position": 3, "score": 0.9}
    assert [p["source"] for p in result["passages"]] == ["models.md", "speech.md"]
    json.dumps(result)
    assert summary("search_knowledge", result) == 'Your notes say: "Whisper transcribes speech." [models.md#3]'


def test_search_knowledge_without_a_knowledge_base(context):
    result = _call(_tools(context, ["search_knowledge"])["search_knowledge"], query="anything")
    assert result.status == "error" and "no knowledge base" in result.content


# --- errors the user or the model can cause ---------------------------------------------------


def test_unknown_id_lists_the_known_ids(context, store):
    store.add_file("s1", CAT)
    tools = _tools(context)
    result = _call(tools["describe_image"], image="image-9")
    assert result.status == "error" and "image-9" in result.content and "known image ids: image-1" in result.content
    result = _call(tools["transcribe"], audio="audio-1")
    assert result.status == "error" and "this session has no audio or video yet" in result.content


def test_paths_and_wrong_kinds_are_refused_with_the_ids_that_would_do(context, store):
    store.add_file("s1", CAT)
    tools = _tools(context)
    result = _call(tools["describe_image"], image=str(CAT))
    assert result.status == "error" and "looks like a file path" in result.content and "image-1" in result.content
    spoken = _artifact(tools["speak"], {"text": "hello"})["audio"]
    result = _call(tools["transcribe"], audio="image-1")  # an image where audio is wanted
    assert result.status == "error" and "'image-1' is an image" in result.content and spoken in result.content
    result = _call(tools["generate_audio"], prompt="x", seconds=-1)
    assert result.status == "error" and "seconds" in result.content


def test_another_sessions_id_is_not_found(context, store):
    store.add_file("s2", CAT)
    result = _call(_tools(context)["describe_image"], image="image-1")
    assert result.status == "error" and "no image with id 'image-1'" in result.content


def test_a_media_error_becomes_a_message(context, store):
    record = store.add_generated("s1", "audio", b"RIFF but not really a wav file", ".wav")  # stored unchecked
    result = _call(_tools(context)["transcribe"], audio="audio-1")
    assert result.status == "error" and "could not be read as audio" in result.content
    assert "'audio-1'" in result.content and str(record.path) not in result.content  # the id, not the blob path


# --- building, allow-lists, schemas -----------------------------------------------------------


def test_allow_list_filters_and_keeps_its_order(context):
    tools = build_tools(context, ["speak", "transcribe"])
    assert [t.name for t in tools] == ["speak", "transcribe"]
    assert [t.name for t in build_tools(context)] == list(TOOL_NAMES)
    # what a runtime offers a session: the tools the profile can run (no knowledge base here)
    assert runnable_tools(context.profile) == [n for n in TOOL_NAMES if n != "search_knowledge"]


def test_unknown_tool_names_are_refused(context):
    with pytest.raises(UnknownToolError, match=r"'draw'.*available tools: transcribe, speak"):
        build_tools(context, ["speak", "draw"])


def test_building_tools_loads_no_model(profile, store):
    pool = ModelPool()
    build_tools(ToolContext(session="s1", profile=profile, store=store, pool=pool))
    assert pool.loaded() == []


def test_tool_schemas_are_json_schemas_of_the_arguments(context):
    schemas = tool_schemas(build_tools(context, TOOL_NAMES))
    assert [s["name"] for s in schemas] == list(TOOL_NAMES)
    by_name = {s["name"]: s for s in schemas}
    image = by_name["generate_image"]["parameters"]
    assert image["type"] == "object" and image["required"] == ["prompt"] and image["additionalProperties"] is False
    assert image["properties"]["seed"] == {
        "default": 0, "description": "random seed; the same prompt and seed give the same image",
        "maximum": 2**32 - 1, "minimum": 0, "type": "integer",
    }
    assert by_name["describe_image"]["parameters"]["properties"]["image"]["pattern"] == "^image-[0-9]+$"
    for schema in schemas:
        assert schema["description"] and all(p.get("description") for p in schema["parameters"]["properties"].values())
        assert "title" not in json.dumps(schema)
    json.dumps(schemas)


# --- the model pool ---------------------------------------------------------------------------


def test_the_pool_loads_once_under_concurrent_access():
    pool = ModelPool()
    calls: list[str] = []
    barrier = threading.Barrier(8)
    got: list[object] = []

    def builder(spec):
        calls.append(spec.source)
        time.sleep(0.2)  # a slow load: the other threads arrive while it runs
        return object()

    def ask():
        barrier.wait()
        got.append(pool.get("speech", SpeechSpec(source="shipped:piper-joe-medium"), builder))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["shipped:piper-joe-medium"] and len(got) == 8 and all(g is got[0] for g in got)
    other = pool.get("speech", SpeechSpec(source="shipped:piper-joe-medium", device="cpu"), builder)
    assert other is not got[0] and len(calls) == 2  # another spec is another model


def test_two_different_models_never_load_at_the_same_time():
    # the libraries' loaders patch global torch state while they run (meta-device init)
    pool = ModelPool()
    loading, overlaps = [], []
    barrier = threading.Barrier(2)

    def builder(spec):
        loading.append(spec["name"])
        overlaps.append(len(loading) > 1)
        time.sleep(0.1)
        loading.remove(spec["name"])
        return spec["name"]

    def ask(name):
        barrier.wait()
        pool.get("generator", {"name": name}, builder)

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("image", "audio")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [False, False]


def test_a_failed_build_is_not_cached():
    pool = ModelPool()
    attempts = []

    def flaky(spec):
        attempts.append(spec)
        if len(attempts) == 1:
            raise RuntimeError("disk hiccup")
        return "model"

    with pytest.raises(RuntimeError):
        pool.get("x", {"a": 1}, flaky)
    assert pool.get("x", {"a": 1}, flaky) == "model" and len(attempts) == 2
    assert ("x", {"a": 1}) in pool


def test_tools_share_the_pool(context, pool, store):
    store.add_file("s1", CAT)
    before = len(pool.loaded())
    for _ in range(2):
        _artifact(_tools(context)["describe_image"], {"image": "image-1"})
    encoder_keys = [k for k in pool.loaded() if k[0] == "image_encoder"]
    assert len(encoder_keys) == 1 and len(pool.loaded()) - before <= 1
