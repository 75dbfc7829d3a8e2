"""The streaming signal parser: text, tool calls and signal spans, however the text is chunked."""

from __future__ import annotations

import pytest

from graphs.signal_parser import (
    MalformedToolCall,
    SignalParser,
    SignalSpanEvent,
    TextDelta,
    ToolCallEvent,
    collect,
    parse_message,
    repair_tool_call,
)

SPAN = "[IMG0][IMG1][IMG2][IMG3]"
AUDIO_SPAN = "".join(f"[AUD{i}]" for i in range(8))
CALL = '<tool_call>{"name": "transcribe", "arguments": {"audio_id": "audio-1"}}</tool_call>'

MESSAGES = [
    "Plain text, no markers at all.",
    f"Let me listen.\n{CALL}",
    f"Here is a cat: {SPAN} Enjoy! {AUDIO_SPAN}",
    f"{CALL}\n{CALL}",
    "a < b and [x] [I like] <tool_ wow <tool_call",  # marker-like text that is not a marker
    "<tool_call>{'name': 'search', 'arguments': {'q': 'it\\'s', k: 3,},}</tool_call> after",
    "before <tool_call>not json at all</tool_call> after",
    f"{SPAN[:12]} broken span, then a whole one {SPAN}",
    '<tool_call>{"name": "search", "arguments": {"q": [1, 2',
    "   leading and trailing whitespace   \n",
]


def _signature(parsed):
    return (parsed.text, [(c.name, c.arguments, c.raw, c.repaired) for c in parsed.tool_calls],
            parsed.spans, [(m.raw, m.error) for m in parsed.malformed])


def _stream(chunks: list[str]) -> list:
    parser = SignalParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.close()


@pytest.mark.parametrize("message", MESSAGES)
def test_every_split_point_gives_the_same_result(message):
    whole = _signature(parse_message(message))
    for cut in range(len(message) + 1):
        assert _signature(collect(_stream([message[:cut], message[cut:]]))) == whole, cut
    for cut in range(0, len(message), 7):  # three pieces
        pieces = [message[:cut], message[cut:cut + 5], message[cut + 5:]]
        assert _signature(collect(_stream(pieces))) == whole, cut
    assert _signature(collect(_stream(list(message)))) == whole  # one character at a time


def test_text_streams_at_once_and_half_markers_wait():
    parser = SignalParser()
    assert parser.feed("Hello wor") == [TextDelta("Hello wor")]
    assert parser.feed("ld <tool_") == [TextDelta("ld")]  # "<tool_" might open a call; " " waits too
    assert parser.feed("call>") == []
    assert parser.feed('{"name": "x", "arguments": {}}</tool_ca') == []
    events = parser.feed("ll>done")
    assert isinstance(events[0], ToolCallEvent) and events[0].name == "x" and events[0].arguments == {}
    assert events[1:] == [TextDelta(" done")]
    assert parser.close() == []


def test_marker_lookalikes_are_released_once_decided():
    parser = SignalParser()
    assert parser.feed("see [IM") == [TextDelta("see")]
    assert parser.feed("AGE]") == [TextDelta(" [IMAGE]")]
    assert parser.feed(" and <tool") == [TextDelta(" and")]
    assert parser.feed("box>") == [TextDelta(" <toolbox>")]
    assert parser.feed(" [IM") == []
    assert parser.close() == [TextDelta(" [IM")]  # at the end, a half marker is just text


def test_signal_spans_are_numbered_per_modality():
    parsed = parse_message(f"one {SPAN} two {AUDIO_SPAN} three {SPAN}")
    assert parsed.spans == [SignalSpanEvent("image", 0), SignalSpanEvent("audio", 0), SignalSpanEvent("image", 1)]
    assert parsed.text == "one two three"


def test_a_span_arrives_token_by_token():
    parser = SignalParser()
    assert parser.feed("look: [IMG0]") == [TextDelta("look:")]
    assert parser.feed("[IMG1][IMG2]") == []
    assert parser.feed("[IMG3]") == [SignalSpanEvent("image", 0)]


def test_broken_and_stray_span_tokens_are_dropped_without_an_event():
    parsed = parse_message("a [IMG0][IMG1] b [IMG2] c")
    assert parsed.spans == [] and parsed.text == "a b c"


def test_custom_signal_tokens():
    parsed = parse_message("x <v0><v1> y", {"video": ["<v0>", "<v1>"]})
    assert parsed.spans == [SignalSpanEvent("video", 0)] and parsed.text == "x y"


def test_whitespace_is_not_doubled_around_removed_markers():
    assert parse_message(f"Sure.\n{CALL}\nDone.").text == "Sure.\nDone."
    assert parse_message(f"cat: {SPAN} enjoy").text == "cat: enjoy"
    assert parse_message(f"  {CALL}  ").text == ""


def test_tool_call_events_carry_raw_and_unique_ids():
    parsed = parse_message(f"{CALL}{CALL}")
    first, second = parsed.tool_calls
    assert first.raw == '{"name": "transcribe", "arguments": {"audio_id": "audio-1"}}'
    assert first.id != second.id and first.id.startswith("call_")
    assert not first.repaired


@pytest.mark.parametrize("raw, expected", [
    ("{'name': 'search', 'arguments': {'query': 'cats'}}", ("search", {"query": "cats"})),  # single quotes
    ('{"name": "search", "arguments": {"query": "cats",},}', ("search", {"query": "cats"})),  # trailing commas
    ('{name: "search", arguments: {query: "cats", k: 3}}', ("search", {"query": "cats", "k": 3})),  # bare keys
    ('{"name": "search", "arguments": {"query": "cats"', ("search", {"query": "cats"})),  # missing braces
    ('{"name": "search", "arguments": {"tags": ["a", "b"', ("search", {"tags": ["a", "b"]})),  # and brackets
    ('```json\n{"name": "search", "arguments": {"query": "cats"}}\n```', ("search", {"query": "cats"})),
    ('{"name": "search", "arguments": "{\\"query\\": \\"cats\\"}"}', ("search", {"query": "cats"})),  # str args
    ('{"tool": "search", "args": {"query": "cats"}}', ("search", {"query": "cats"})),
    ('{"function": "search", "parameters": {"query": "cats"}}', ("search", {"query": "cats"})),
    ('{"function": {"name": "search", "arguments": "{\\"query\\": \\"cats\\"}"}}', ("search", {"query": "cats"})),
    ("{'name': 'flag', 'arguments': {'on': True, 'off': False, 'none': None}}",
     ("flag", {"on": True, "off": False, "none": None})),
    ('{"name": "search", "arguments": {"query": "cats"}}} trailing', ("search", {"query": "cats"})),
    ('{"name": "noargs"}', ("noargs", {})),
    ('{"name": "search", "arguments": {"query": "line\nbreak"}}', ("search", {"query": "line\nbreak"})),
])
def test_repair(raw, expected):
    call = repair_tool_call(raw)
    assert call is not None and (call["name"], call["arguments"]) == expected


@pytest.mark.parametrize("raw", ["", "not json at all", "[1, 2, 3]", '{"arguments": {"q": 1}}',
                                 '{"name": "", "arguments": {}}', '{"name": "x", "arguments": [1]}'])
def test_unrepairable_is_none(raw):
    assert repair_tool_call(raw) is None


def test_parser_repairs_before_reporting_malformed():
    parsed = parse_message("<tool_call>{'name': 'search', 'arguments': {'query': 'cats',}}</tool_call>")
    assert [(c.name, c.arguments, c.repaired) for c in parsed.tool_calls] == [("search", {"query": "cats"}, True)]
    assert parsed.malformed == []


def test_unrepairable_call_is_a_malformed_event_with_the_raw_text():
    parsed = parse_message("ok <tool_call>please search for cats</tool_call> then")
    assert parsed.tool_calls == [] and parsed.text == "ok then"
    (bad,) = parsed.malformed
    assert isinstance(bad, MalformedToolCall) and bad.raw == "please search for cats" and "JSON" in bad.error


def test_unknown_tool_names_are_malformed_when_tools_are_given():
    parsed = parse_message(CALL, tools=["search"])
    assert parsed.tool_calls == [] and "unknown tool 'transcribe'" in parsed.malformed[0].error


def test_unclosed_call_is_repaired_unless_the_reply_was_cut_off():
    text = '<tool_call>{"name": "search", "arguments": {"query": "ca'
    assert parse_message(text).tool_calls[0].arguments == {"query": "ca"}
    cut = parse_message(text, truncated=True)
    assert cut.tool_calls == [] and "cut off" in cut.malformed[0].error
    # a complete call that only lacks its closing tag stays a call, cut off or not
    assert parse_message(CALL[:-len("</tool_call>")], truncated=True).tool_calls[0].name == "transcribe"


def test_a_new_call_before_the_old_one_closed():
    parsed = parse_message('<tool_call>{"name": "a", "arguments": {}}'
                           '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    assert [c.name for c in parsed.tool_calls] == ["a", "b"]


def test_closed_parser_refuses_more_input():
    parser = SignalParser()
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed("more")
