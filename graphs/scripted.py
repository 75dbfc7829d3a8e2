"""A thinker that returns canned outputs: for tests and benchmarks about routing, not the model."""

from __future__ import annotations

from graphs.thinker import ConditioningCache, ThinkResult


class ScriptedThinker:
    """Returns the next scripted ThinkResult on each call, and records what it was shown."""

    def __init__(self, *script: ThinkResult):
        self.script = list(script)
        self.cache = ConditioningCache()
        self.seen: list[dict] = []

    def think(self, messages, *, tools, passages, media, on_text=None, require_tool=False, max_new_tokens=None):
        self.seen.append({"messages": list(messages), "tools": [t["name"] for t in tools], "media": media,
                          "passages": passages, "require_tool": require_tool})
        result = self.script.pop(0)
        if on_text and result.text:
            on_text(result.text)
        return result
