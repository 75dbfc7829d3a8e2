"""Split what the backbone writes into text, tool calls and signal spans, as it streams.

The backbone's protocol: plain text; tool calls `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`; signal spans `[IMG0][IMG1][IMG2][IMG3]`, `[AUD0]..[AUD7]`. The parser is
incremental: `feed(chunk)` returns the events that chunk completes. Text outside markers streams
at once, except text that might be the start of a marker (`<tool_`, `[IM`), which waits until
the next characters decide, so a user never sees half a marker. Whitespace is trimmed at the
message's ends and not doubled around a removed marker (it, too, is held until text follows).

The output is the same however the text is cut into chunks: streaming and parsing the whole
message give the same events (ids aside).

Small models break formats (smolagents #201 #1251, TaskMatrix #324), so a tool call that does
not parse gets one repair attempt (`repair_tool_call`) before it becomes a `MalformedToolCall`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
DEFAULT_SIGNAL_TOKENS = {
    "image": [f"[IMG{i}]" for i in range(4)],
    "audio": [f"[AUD{i}]" for i in range(8)],
}


# --- events ---------------------------------------------------------------------------------

@dataclass
class TextDelta:
    text: str


@dataclass
class ToolCallEvent:
    name: str
    arguments: dict
    raw: str
    id: str
    repaired: bool = False  # the raw text needed repair_tool_call to parse


@dataclass
class SignalSpanEvent:
    modality: str
    index: int  # the nth complete span of this modality in the message, from 0


@dataclass
class MalformedToolCall:
    raw: str
    error: str
    id: str = ""


Event = TextDelta | ToolCallEvent | SignalSpanEvent | MalformedToolCall


@dataclass
class ParsedMessage:
    text: str
    tool_calls: list[ToolCallEvent] = field(default_factory=list)
    spans: list[SignalSpanEvent] = field(default_factory=list)
    malformed: list[MalformedToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# --- tool-call JSON ---------------------------------------------------------------------------

_ARGUMENT_KEYS = ("arguments", "args", "parameters", "params", "input")
_NAME_ALIASES = ("tool", "function", "tool_name", "function_name", "name")
_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n?(.*?)\s*(?:```\s*)?$", re.S)


def parse_tool_call(raw: str) -> tuple[dict | None, str]:
    """Strict parse of the canonical form. Returns (call, "") or (None, why not)."""
    try:
        obj = json.loads(raw, strict=False)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc}"
    if not isinstance(obj, dict):
        return None, f"a tool call must be a JSON object, got {type(obj).__name__}"
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name.strip():
        return None, 'a tool call needs a "name" string'
    if not isinstance(arguments, dict):
        return None, '"arguments" must be a JSON object'
    return {"name": name.strip(), "arguments": arguments}, ""


def _normalize(obj) -> dict | None:
    """Canonical {"name", "arguments"} from the shapes models write instead."""
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    if not isinstance(obj, dict):
        return None
    name = None
    arguments = next((obj[k] for k in _ARGUMENT_KEYS if k in obj), None)
    for alias in _NAME_ALIASES:
        value = obj.get(alias)
        if isinstance(value, str) and value.strip():
            name = value
            break
        if isinstance(value, dict):  # OpenAI's {"function": {"name", "arguments"}}
            inner = _normalize(value)
            if inner is not None:
                name = inner["name"]
                if arguments is None:
                    arguments = inner["arguments"]
                break
    if not isinstance(name, str) or not name.strip():
        return None
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        text = arguments.strip()
        if not text:
            arguments = {}
        else:
            try:
                arguments = json.loads(text, strict=False)
            except json.JSONDecodeError:
                arguments = _loads_lenient(text)
    if not isinstance(arguments, dict):
        return None
    return {"name": name.strip(), "arguments": arguments}


def _loads_lenient(text: str):
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    decoder = json.JSONDecoder(strict=False)
    for candidate in (text[start:], _fix_json(text[start:])):
        try:
            return decoder.raw_decode(candidate)[0]
        except json.JSONDecodeError:
            continue
    return None


_WORDS = {"True": "true", "False": "false", "None": "null", "true": "true", "false": "false",
          "null": "null"}
_CLOSER = {"{": "}", "[": "]"}


def _drop_trailing_comma(out: list[str]) -> None:
    while out and out[-1].isspace():
        out.pop()
    if out and out[-1] == ",":
        out.pop()


def _fix_json(s: str) -> str:
    """One pass over almost-JSON: single quotes, unquoted keys and words, Python literals,
    trailing commas, control characters in strings, unclosed strings/brackets; stops after the
    first complete value."""
    out: list[str] = []
    stack: list[str] = []
    quote = None
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if quote:
            if c == "\\":
                nxt = s[i + 1] if i + 1 < n else ""
                if nxt == "'":
                    out.append("'")
                elif nxt and nxt in '"\\/bfnrtu':
                    out.append(c + nxt)
                elif nxt:
                    out.append("\\\\" + nxt)
                i += 2
                continue
            if c == quote:
                out.append('"')
                quote = None
            elif c == '"':
                out.append('\\"')
            elif c == "\n":
                out.append("\\n")
            elif ord(c) < 0x20:
                out.append(f"\\u{ord(c):04x}")
            else:
                out.append(c)
            i += 1
            continue
        if c in "\"'":
            quote = c
            out.append('"')
        elif c in "{[":
            stack.append(c)
            out.append(c)
        elif c in "}]":
            _drop_trailing_comma(out)
            opener = "{" if c == "}" else "["
            if opener not in stack:
                break  # a stray closer: the value ended before it
            while stack[-1] != opener:
                out.append(_CLOSER[stack.pop()])
            stack.pop()
            out.append(c)
            if not stack:
                break
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (s[j].isalnum() or s[j] in "_-."):
                j += 1
            word = s[i:j]
            k = j
            while k < n and s[k] in " \t\r\n":
                k += 1
            if k < n and s[k] == ":":
                out.append(json.dumps(word))  # an unquoted key
            else:
                out.append(_WORDS.get(word, json.dumps(word)))
            i = j
            continue
        else:
            out.append(c)
        i += 1
    if quote:
        out.append('"')
    while out and out[-1].isspace():
        out.pop()
    if out and out[-1] == ":":
        out.append("null")
    _drop_trailing_comma(out)
    while stack:
        _drop_trailing_comma(out)
        out.append(_CLOSER[stack.pop()])
    return "".join(out)


def repair_tool_call(raw: str) -> dict | None:
    """One repair attempt at a tool call that did not parse: code fences, single quotes,
    unquoted keys, trailing commas, missing closing braces/brackets, `arguments` given as a JSON
    string, {"tool": ...} / {"function": ...} aliases. Returns {"name", "arguments"} or None."""
    text = raw.strip()
    fenced = _FENCE.match(text)
    if fenced and text.startswith("```"):
        text = fenced.group(1)
    text = text.replace(TOOL_CALL_OPEN, "").replace(TOOL_CALL_CLOSE, "").strip()
    start = text.find("{")
    if start < 0:
        return None
    text = text[start:]
    decoder = json.JSONDecoder(strict=False)
    for candidate in (text, _fix_json(text)):
        try:
            obj = decoder.raw_decode(candidate)[0]
        except json.JSONDecodeError:
            continue
        call = _normalize(obj)
        if call is not None:
            return call
    return None


# --- the streaming parser ---------------------------------------------------------------------

_TEXT, _TOOL, _SPAN = "text", "tool", "span"


def _partial_suffix(buffer: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of buffer that is a proper prefix of some marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(buffer)), best, -1):
            if buffer.endswith(marker[:k]):
                best = k
                break
    return best


def _heavier(a: str, b: str) -> str:
    return max(a, b, key=lambda w: (w.count("\n"), len(w)))


class SignalParser:
    """Incremental parser. `feed(chunk) -> [events]`, then `close() -> [events]` once."""

    def __init__(self, signal_tokens: dict[str, list[str]] | None = None, *,
                 tools: Iterable[str | dict] | None = None, id_factory: Callable[[], str] = new_call_id):
        """signal_tokens: {modality: its span's token strings} (default [IMG0..3], [AUD0..7]).
        tools: the callable tool names (or tool dicts): a call of any other is malformed."""
        self.signal_tokens = {m: list(t) for m, t in (signal_tokens or DEFAULT_SIGNAL_TOKENS).items() if t}
        self.tools = None if tools is None else {t["name"] if isinstance(t, dict) else t for t in tools}
        self.id_factory = id_factory
        self._signal_of = {tok: (m, i) for m, toks in self.signal_tokens.items() for i, tok in enumerate(toks)}
        self._text_markers = [TOOL_CALL_OPEN, TOOL_CALL_CLOSE, *self._signal_of]
        self._tool_markers = [TOOL_CALL_CLOSE, TOOL_CALL_OPEN]
        self._pattern = {
            _TEXT: re.compile("|".join(re.escape(m) for m in sorted(self._text_markers, key=len, reverse=True))),
            _TOOL: re.compile("|".join(re.escape(m) for m in self._tool_markers)),
        }
        self._state = _TEXT
        self._buffer = ""
        self._raw = ""  # the tool call being read
        self._span: tuple[str, int] | None = None  # (modality, next position) while reading a span
        self._counts = {m: 0 for m in self.signal_tokens}
        self._ws: list[str] = []  # whitespace runs not yet shown, one per side of removed markers
        self._marker_since_ws = False
        self._started = False
        self._closed = False

    # -- whitespace-aware text output --

    def _add_ws(self, ws: str) -> None:
        if not ws:
            return
        if self._ws and not self._marker_since_ws:
            self._ws[-1] += ws
        else:
            self._ws.append(ws)
        self._marker_since_ws = False

    def _marker(self) -> None:
        self._marker_since_ws = True

    def _text(self, s: str, events: list[Event]) -> None:
        if not s:
            return
        body_start = len(s) - len(s.lstrip())
        self._add_ws(s[:body_start])
        body = s[body_start:].rstrip()
        if not body:
            return
        trailing = s[body_start + len(body):]
        lead = ""
        if self._started and self._ws:
            lead = self._ws[0]
            for w in self._ws[1:]:
                lead = _heavier(lead, w)
        self._ws, self._marker_since_ws = [], False
        self._started = True
        events.append(TextDelta(lead + body))
        self._add_ws(trailing)

    # -- tool calls and spans --

    def _finish_tool(self, raw: str, events: list[Event], *, terminated: bool, truncated: bool = False) -> None:
        call, error = parse_tool_call(raw)
        repaired = False
        if call is None and not truncated:
            call = repair_tool_call(raw)
            repaired = call is not None
        if call is None:
            if truncated:
                error = f"the reply was cut off inside a tool call (token limit reached); {error}"
            elif not terminated:
                error = f"the tool call was not closed with {TOOL_CALL_CLOSE} ({error})"
            events.append(MalformedToolCall(raw, error, self.id_factory()))
        elif self.tools is not None and call["name"] not in self.tools:
            available = ", ".join(sorted(self.tools)) or "none"
            events.append(MalformedToolCall(raw, f"unknown tool {call['name']!r}; available: {available}",
                                            self.id_factory()))
        else:
            events.append(ToolCallEvent(call["name"], call["arguments"], raw, self.id_factory(), repaired))
        self._marker()

    def _signal(self, token: str, events: list[Event]) -> None:
        modality, position = self._signal_of[token]
        if position == 0:
            self._span = (modality, 1)
            self._state = _SPAN
            self._check_span_done(events)
        # a span token out of order outside a span is dropped: it is no text for a user
        self._marker()

    def _check_span_done(self, events: list[Event]) -> None:
        modality, position = self._span
        if position == len(self.signal_tokens[modality]):
            events.append(SignalSpanEvent(modality, self._counts[modality]))
            self._counts[modality] += 1
            self._span = None
            self._state = _TEXT

    # -- the state machine --

    def feed(self, chunk: str) -> list[Event]:
        if self._closed:
            raise RuntimeError("this SignalParser is closed; make a new one per message")
        self._buffer += chunk
        events: list[Event] = []
        self._run(events, final=False)
        return events

    def close(self, *, truncated: bool = False) -> list[Event]:
        """Flush held-back text and end the message. `truncated`: generation was cut off (token
        limit), so an unclosed tool call is not repaired: its arguments may be incomplete."""
        if self._closed:
            return []
        events: list[Event] = []
        self._run(events, final=True)
        if self._state == _TOOL:
            self._finish_tool(self._raw, events, terminated=False, truncated=truncated)
            self._raw = ""
        self._state, self._span, self._closed = _TEXT, None, True  # a broken span is dropped
        self._ws = []
        return events

    def _run(self, events: list[Event], *, final: bool) -> None:
        while self._buffer:
            before = (self._state, len(self._buffer))
            if self._state == _TEXT:
                self._step_text(events, final)
            elif self._state == _TOOL:
                self._step_tool(events, final)
            else:
                self._step_span(events, final)
            if (self._state, len(self._buffer)) == before:
                break  # waiting for more input

    def _step_text(self, events: list[Event], final: bool) -> None:
        match = self._pattern[_TEXT].search(self._buffer)
        if match:
            self._text(self._buffer[:match.start()], events)
            self._buffer = self._buffer[match.end():]
            marker = match.group()
            if marker == TOOL_CALL_OPEN:
                self._state, self._raw = _TOOL, ""
            elif marker == TOOL_CALL_CLOSE:
                self._marker()  # a stray closer: dropped
            else:
                self._signal(marker, events)
            return
        hold = 0 if final else _partial_suffix(self._buffer, self._text_markers)
        self._text(self._buffer[:len(self._buffer) - hold], events)
        self._buffer = self._buffer[len(self._buffer) - hold:]

    def _step_tool(self, events: list[Event], final: bool) -> None:
        match = self._pattern[_TOOL].search(self._buffer)
        if match:
            self._raw += self._buffer[:match.start()]
            self._buffer = self._buffer[match.end():]
            raw, self._raw = self._raw, ""
            if match.group() == TOOL_CALL_CLOSE:
                self._finish_tool(raw, events, terminated=True)
                self._state = _TEXT
            else:  # a new call opened before this one closed
                self._finish_tool(raw, events, terminated=False)
            return
        hold = 0 if final else _partial_suffix(self._buffer, self._tool_markers)
        self._raw += self._buffer[:len(self._buffer) - hold]
        self._buffer = self._buffer[len(self._buffer) - hold:]

    def _step_span(self, events: list[Event], final: bool) -> None:
        modality, position = self._span
        expected = self.signal_tokens[modality][position]
        rest = self._buffer.lstrip()
        if not rest:
            return  # only whitespace so far: wait (close() drops the broken span)
        if rest.startswith(expected):
            self._buffer = rest[len(expected):]
            self._span = (modality, position + 1)
            self._check_span_done(events)
            return
        if not final and expected.startswith(rest):
            return  # maybe the next token, still arriving
        # the span broke off: drop it, and read what follows as text
        self._span, self._state = None, _TEXT


def parse_message(text: str, signal_tokens: dict[str, list[str]] | None = None, *,
                  tools: Iterable[str] | None = None, truncated: bool = False,
                  id_factory: Callable[[], str] = new_call_id) -> ParsedMessage:
    """Parse a whole message at once (same result as streaming it)."""
    parser = SignalParser(signal_tokens, tools=tools, id_factory=id_factory)
    return collect(parser.feed(text) + parser.close(truncated=truncated))


def collect(events: Iterable[Event]) -> ParsedMessage:
    parsed = ParsedMessage("")
    pieces = []
    for event in events:
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        elif isinstance(event, ToolCallEvent):
            parsed.tool_calls.append(event)
        elif isinstance(event, SignalSpanEvent):
            parsed.spans.append(event)
        elif isinstance(event, MalformedToolCall):
            parsed.malformed.append(event)
    parsed.text = "".join(pieces)
    return parsed
