"""What the assistant can do, said from what this session really has: its tools and the trained
skills of its model. The system prompt carries both, and "what can you do?" is answered from them
(the answers the model is trained on are written by `describe`, so it learns to read the prompt,
not to recite one list)."""

from __future__ import annotations

import re

# what a person gets from each of the project's tools, in words
TOOL_WORDS = {
    "transcribe": "write down what is said in a recording",
    "speak": "read text aloud",
    "describe_image": "name what a photo shows",
    "generate_image": "draw a picture from a description",
    "generate_audio": "make a sound from a description",
    "search_knowledge": "search your notes",
}

# the end-to-end skills a model can have, each from a trained projector (and a generator for outputs)
SKILL_WORDS = {
    ("input", "image"): "look at the images you attach",
    ("input", "audio"): "listen to the recordings you attach",
    ("output", "image"): "draw simple coloured shapes myself",
    ("output", "audio"): "make simple sounds myself",
}


def tool_words(tool: dict) -> str:
    """A tool's use in words: the project's own phrase, or the first sentence of its description."""
    if tool["name"] in TOOL_WORDS:
        return TOOL_WORDS[tool["name"]]
    first = tool.get("description", "").split(". ")[0].strip().rstrip(".")
    return (first[:1].lower() + first[1:]) if first else tool["name"].replace("_", " ")


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


_ASKS = re.compile(
    r"\bwhat (else )?(can|could|do) you (do|help( me)? with|offer)\b|\bwhat are you (able|capable|good) (to|of|at)\b"
    r"|\bwhat (are|is) your (capabilities|skills|features|tools|abilities)\b|\bhow can you help\b"
    r"|\bwhat (tools|skills|features|capabilities|abilities) do you have\b|\bwhat do you know how to do\b"
    r"|\b(what|which) (things|tasks|kinds? of things|sorts? of things) (can|could) you\b"
    r"|\b(what|which) (things|tasks|kinds? of things|sorts? of things) are you able to\b"
    r"|^\s*/?help\s*[?!.]*\s*$", re.IGNORECASE)


def asks_capabilities(request: str) -> bool:
    """Whether the user asks what the assistant can do (answered from what the session has)."""
    return bool(_ASKS.search(request))


def describe(tools: list[dict], skills: list[str]) -> str:
    """The answer to "what can you do?" for these tools and skills."""
    parts = ["I can answer questions and chat"] + list(skills)
    reply = f"{_listing(parts)}."
    if tools:
        reply += f" With my tools I can {_listing([tool_words(t) for t in tools])}."
    else:
        reply += " I have no tools in this session."
    return reply
