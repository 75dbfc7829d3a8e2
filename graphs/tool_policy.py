"""Which tool calls a turn may run: decided by the user's own words, never by what the agent read.

A 135M-parameter backbone follows whatever text sits in its context, so the defence is structural
(AgentDojo's tool filter and a provenance check), applied by the controller before any tool runs:

1. **Intent, fixed before anything is read.** At the start of a turn, from the user's message alone,
   the tools that act on the world (speak, generate_*, any tool a user registers) are allowed only
   if the request asks for what they do; tools that only read (transcribe, describe_image,
   search_knowledge) are always allowed. Nothing read later can widen the set.
2. **Provenance of arguments.** A call whose arguments copy a sentence that addresses the agent in
   untrusted content (an injected instruction, `tools/untrusted.py`) is refused; a call to a tool
   that acts whose arguments copy untrusted text is refused unless the user asked to use that
   content ("read this note aloud", "draw what the note describes").
3. **Confirmation.** Tools marked `confirm` (high-risk ones a user registers: sending mail, calling
   a URL) pause the turn for the user's yes or no.

Tools declare themselves in `tool.metadata`: {"effect": "reads" | "acts", "intent": regex of the
words that ask for them, "confirm": bool}. A tool without the declaration acts, and confirms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tools.untrusted import injected_sentences

# words by which a request refers to content the agent reads, so that copying it is what was asked
_REFERS_TO_CONTENT = re.compile(
    r"\b(note|notes|document|documents|doc|file|passage|transcript|recording|message|text|it|this|that|"
    r"these|those|them|above|result|results|answer|what (it|they|he|she) (says?|said|describes?)|"
    r"what the \w+ (says?|said|describes?))\b", re.IGNORECASE)
_NGRAM = 4  # consecutive words in common that count as copying


def effect(tool) -> str:
    return (getattr(tool, "metadata", None) or {}).get("effect", "acts")


def needs_confirmation(tool) -> bool:
    meta = getattr(tool, "metadata", None) or {}
    return bool(meta.get("confirm", "effect" not in meta))


def _intent(tool) -> re.Pattern:
    meta = getattr(tool, "metadata", None) or {}
    if meta.get("intent"):
        return re.compile(meta["intent"], re.IGNORECASE)
    words = [w for w in re.split(r"[_\W]+", tool.name) if len(w) > 2]  # send_mail -> send, mail
    return re.compile(r"\b(" + "|".join(map(re.escape, words or [tool.name])) + r")", re.IGNORECASE)


def intended_tools(request: str, tools: list) -> list[str]:
    """The tools the user's own words allow this turn: every tool that only reads, and each tool
    that acts whose purpose the request asks for."""
    return [t.name for t in tools if effect(t) == "reads" or _intent(t).search(request)]


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngrams(words: list[str], n: int) -> set[tuple]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def text_values(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in text_values(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in text_values(v)]
    return []


def _copies(args: dict, text: str, request: str) -> bool:
    """Whether the arguments carry a run of words from `text` that the user did not write."""
    arg_words = [w for s in text_values(args) for w in _words(s)]
    n = min(_NGRAM, len(arg_words))
    if n < 2:
        return False
    shared = _ngrams(arg_words, n) & _ngrams(_words(text), n)
    return bool(shared - _ngrams(_words(request), n))


@dataclass
class Verdict:
    allowed: bool
    reason: str = ""  # why not, for the trace and the user
    confirm: bool = False  # allowed once the user says yes


def check(call: dict, tool, *, request: str, intended: list[str], untrusted: list[tuple[str, str]]) -> Verdict:
    """The verdict on one tool call. `untrusted` is [(where it came from, text)] read this turn."""
    name = call["name"]
    if tool is None:  # unknown tools fail in the act step with the list of real ones
        return Verdict(True)
    if name not in intended:
        return Verdict(False, f"your request did not ask me to {_purpose(tool)}")
    for source, text in untrusted:
        if any(_copies(call["args"], sentence, "") for sentence in injected_sentences(text)):
            return Verdict(False, f"its arguments come from an instruction hidden in {source}")
    if effect(tool) == "acts" and not _REFERS_TO_CONTENT.search(request):
        for source, text in untrusted:
            if _copies(call["args"], text, request):
                return Verdict(False, f"its arguments copy text from {source} that you did not ask me to use")
    return Verdict(True, confirm=needs_confirmation(tool))


def _purpose(tool) -> str:
    from graphs.capabilities import TOOL_WORDS

    return TOOL_WORDS.get(tool.name) or f"use {tool.name.replace('_', ' ')}"
