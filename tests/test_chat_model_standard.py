"""SignalgraphChatModel: LangChain's standard chat-model unit tests, plus its own behaviour on the
tiny profile's random backbone (a model that, left alone, writes only byte soup)."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel, Field

from agent.chat_model import SignalgraphChatModel
from graphs.prompting import describe_tools, to_chat, tool_spec


class TestSignalgraphChatModelStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[SignalgraphChatModel]:
        return SignalgraphChatModel

    @property
    def chat_model_params(self) -> dict:
        # Nothing loads until the first call, so the standard init tests stay fast.
        return {"profile_name": "tiny", "require_trained": False}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False  # images need trained input projectors; the tiny profile has none


class Pick(BaseModel):
    """Pick a colour and a count."""

    colour: str = Field(max_length=8)
    count: int = Field(ge=0, le=9)




@pytest.fixture
def llm(chaotic_mm) -> SignalgraphChatModel:
    return SignalgraphChatModel(mm=chaotic_mm, profile_name="tiny", max_tokens=48, allow_signal_spans=False)


def _merge(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    return merged


def test_required_tool_choice_yields_a_valid_call_on_a_random_model(llm):
    bound = llm.bind_tools([Pick], tool_choice="required", max_tokens=200)
    for prompt in ("pick one", "choose", "another"):
        reply = bound.invoke(prompt)
        assert reply.invalid_tool_calls == [] and len(reply.tool_calls) == 1
        call = reply.tool_calls[0]
        assert call["name"] == "Pick"
        Pick(**call["args"])  # validates against the schema
        assert reply.response_metadata["finish_reason"] == "tool_calls"


def test_structured_output_goes_through_the_forced_call(llm):
    picked = llm.with_structured_output(Pick).invoke("pick", max_tokens=200)
    assert isinstance(picked, Pick)


def test_named_tool_choice_forces_that_tool(llm):
    def ring(times: int) -> str:
        """Ring a bell."""
        return "ding" * times

    reply = llm.bind_tools([Pick, ring], tool_choice="ring", max_tokens=200).invoke("go")
    assert [c["name"] for c in reply.tool_calls] == ["ring"]
    with pytest.raises(Exception, match="not a bound tool"):
        llm.bind_tools([Pick], tool_choice="missing")


@pytest.mark.parametrize("prompt", ["hello there", "What is 2+2?", "Write a poem"])
def test_stream_adds_up_to_invoke(llm, prompt):
    invoked = llm.invoke(prompt)
    chunks = list(llm.stream(prompt))
    assert len(chunks) > 2  # text arrives in pieces, then the closing chunk with usage
    merged = _merge(chunks)
    assert invoked.content and merged.content == invoked.content
    assert merged.usage_metadata == invoked.usage_metadata
    assert merged.response_metadata["finish_reason"] == invoked.response_metadata["finish_reason"]


def test_stream_with_a_forced_tool_call_adds_up_to_invoke(llm):
    bound = llm.bind_tools([Pick], tool_choice="any", max_tokens=200)
    invoked = bound.invoke("pick")
    merged = _merge(list(bound.stream("pick")))
    strip = lambda calls: [(c["name"], c["args"]) for c in calls]  # noqa: E731 - ids are fresh per reply
    assert strip(merged.tool_calls) == strip(invoked.tool_calls) and len(invoked.tool_calls) == 1


def test_usage_metadata_counts_tokens(llm):
    reply = llm.invoke("count me")
    usage = reply.usage_metadata
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 48
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_stop_sequences_cut_the_reply(llm):
    full = llm.invoke("hello there").content
    stop = full[5:8]
    cut = llm.invoke("hello there", stop=[stop]).content
    assert stop not in cut and full.startswith(cut)
    assert _merge(list(llm.stream("hello there", stop=[stop]))).content == cut


def test_signal_tokens_and_placeholders_are_never_written_when_banned(llm):
    reply = llm.invoke("draw")
    assert "[IMG" not in reply.content and "<image>" not in reply.content and "<audio>" not in reply.content


def test_history_becomes_chat_template_turns():
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("transcribe audio-1"),
        AIMessage("", tool_calls=[{"name": "transcribe", "args": {"audio_id": "audio-1"}, "id": "c1"}]),
        ToolMessage("hello world", tool_call_id="c1", name="transcribe"),
        ToolMessage("second result", tool_call_id="c2", name="other"),
        AIMessage("It says hello world."),
        HumanMessage("thanks"),
    ]
    chat, images = to_chat(messages, system_suffix="TOOLS")
    assert images == []
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert chat[0]["content"] == "Be brief.\n\nTOOLS"
    assert chat[2]["content"] == '<tool_call>{"name": "transcribe", "arguments": {"audio_id": "audio-1"}}</tool_call>'
    assert chat[3]["content"].startswith('<tool_response name="transcribe" id="c1">\nhello world\n</tool_response>')
    assert 'name="other" id="c2"' in chat[3]["content"]  # parallel results share one user turn
    chat, _ = to_chat(messages, tool_role=True)
    assert [m["role"] for m in chat][3:5] == ["tool", "tool"]


def test_image_blocks_become_placeholders_and_images():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    message = HumanMessage(content=[{"type": "text", "text": "what is this? "},
                                    {"type": "image_url", "image_url": {"url": url}}])
    chat, images = to_chat([message])
    assert chat == [{"role": "user", "content": "what is this? <image>"}]
    assert images[0].size == (4, 4) and images[0].getpixel((0, 0)) == (255, 0, 0)


def test_tools_are_described_in_the_system_prompt():
    spec = tool_spec(Pick)
    text = describe_tools([spec], "any")
    assert "<tool_call>" in text and "- Pick: Pick a colour and a count." in text
    assert '"count": {"maximum": 9, "minimum": 0, "type": "integer"}' in text  # titles dropped


def test_identity_and_tracing_params():
    llm = SignalgraphChatModel(profile_name="tiny", max_tokens=7, stop=["x"], temperature=0.0)
    params = llm._get_ls_params()
    assert params["ls_provider"] == "signalgraph" and params["ls_model_name"] == "signalgraph-tiny"
    assert params["ls_max_tokens"] == 7 and params["ls_stop"] == ["x"]
    assert llm._llm_type == "signalgraph" and llm._identifying_params["profile_name"] == "tiny"
    assert llm.mm is None  # nothing loaded yet


def test_signal_spans_are_listed_and_streamed_alike():
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    mm = MMLLM.from_profile(load_profile("tiny"), require_trained=False)
    b = mm.backbone
    first = mm.generate([{"role": "user", "content": "hi"}], max_new_tokens=1).token_ids[0]
    with torch.no_grad():  # make [IMG0] the greedy choice where the model's favourite token was
        b.input_embeddings().weight[b.signal_ids["image"][0]] = 2 * b.input_embeddings().weight[first]
    llm = SignalgraphChatModel(mm=mm, max_tokens=12)  # require_trained is off: spans are allowed
    reply = llm.invoke("hi")
    spans = reply.response_metadata["signal_spans"]
    assert spans and spans[0]["modality"] == "image" and spans[0]["index"] == 0 and spans[0]["end"] > spans[0]["start"]
    assert "[IMG" not in reply.content
    merged = _merge(list(llm.stream("hi")))
    assert merged.response_metadata["signal_spans"] == spans and merged.content == reply.content
    banned = SignalgraphChatModel(mm=mm, max_tokens=12, allow_signal_spans=False).invoke("hi")
    assert banned.response_metadata["signal_spans"] == []


def test_leaving_a_stream_early_ends_generation(llm):
    for _ in llm.stream("hello", max_tokens=400):
        break
    assert llm.invoke("hello").content  # the model is free again
