"""What each tool's result says to a person: one sentence, in words.

Every expert tool returns two things (LangChain's `response_format="content_and_artifact"`): this
sentence as its content, which the backbone reads and the controller falls back on when the
backbone's own reply is unusable, and a small dict as its artifact, which programs read (plans,
workflows, the trace). The same functions write the results that training shows the backbone, so
what it learns to reply to is what the tools really say.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any


def _percent(score: float) -> str:
    return f"{round(100 * float(score))}%"


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[:1].lower() in "aeiou" else f"a {phrase}"


def _transcribe(result: dict) -> str:
    text = str(result.get("text", "")).strip()
    if not text:
        return f"I heard no words in {result['audio']}."
    return f'{result["audio"]} says: "{text}"'


def _speak(result: dict) -> str:
    said = result.get("text")
    what = f'"{said}"' if said else "it"
    return f"I said {what} aloud ({result['seconds']:g} s): {result['audio']}."


def _describe_image(result: dict) -> str:
    labels = result.get("labels") or []
    if not labels:
        return f"I could not tell what {result['image']} shows."
    named = [f"{_article(item['label'])} ({_percent(item['score'])})" for item in labels[:2]]
    return f"{result['image']} looks like {' or '.join(named)}."


def _generate_image(result: dict) -> str:
    prompt = result.get("prompt")
    return f'I drew "{prompt}": {result["image"]}.' if prompt else f"I drew {result['image']}."


def _generate_audio(result: dict) -> str:
    prompt = result.get("prompt")
    what = f'the sound of "{prompt}"' if prompt else "a sound"
    return f"I made {what} ({result['seconds']:g} s): {result['audio']}."


def _search_knowledge(result: dict) -> str:
    passages = result.get("passages") or []
    if not passages:
        return f'I found nothing in the knowledge base about "{result["query"]}".'
    best = passages[0]
    where = f" [{PurePath(str(best['source'])).name}#{best['position']}]" if best.get("source") else ""
    return f'Your notes say: "{" ".join(str(best["text"]).split())}"{where}'


SUMMARIES = {
    "transcribe": _transcribe,
    "speak": _speak,
    "describe_image": _describe_image,
    "generate_image": _generate_image,
    "generate_audio": _generate_audio,
    "search_knowledge": _search_knowledge,
}


def summary(name: str, result: Any) -> str:
    """The sentence for people about `name`'s result; a tool without its own sentence (one a user
    registered) gets its result's values in words, never its JSON."""
    if isinstance(result, str):
        return result
    if name in SUMMARIES and isinstance(result, dict):
        try:
            return SUMMARIES[name](result)
        except (KeyError, TypeError, ValueError):
            pass
    return f"{name.replace('_', ' ')} gave {_words(result)}."


def _words(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{key.replace('_', ' ')} {_words(item)}" for key, item in value.items()) or "nothing"
    if isinstance(value, (list, tuple)):
        return ", ".join(_words(item) for item in value) or "nothing"
    return str(value)


def key_fact(name: str, result: Any) -> str | None:
    """The part of a result a reply must state for a person to have the answer: the transcript,
    the best label, the best passage's start, the id of what was made (its link follows)."""
    if not isinstance(result, dict):
        return None
    if name in ("speak", "generate_image", "generate_audio"):
        return result.get("audio") or result.get("image")
    if name == "transcribe":
        return str(result.get("text", "")).strip() or None
    if name == "describe_image" and result.get("labels"):
        return str(result["labels"][0]["label"])
    if name == "search_knowledge" and result.get("passages"):
        return " ".join(str(result["passages"][0]["text"]).split()[:6]) or None
    return None
