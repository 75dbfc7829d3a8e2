"""The state of one conversational turn, as LangGraph checkpoints it.

It holds messages and small records only: media are ids into the media store, and signal-span
conditioning stays in process memory under a key (tensors would bloat every checkpoint).
"""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages


def append_or_clear(old: list | None, new: list | None) -> list:
    """Parallel nodes append (an empty list appends nothing); a turn starts by writing None to
    clear the last turn's items."""
    return [] if new is None else [*(old or []), *new]


def add_usage(old: dict | None, new: dict | None) -> dict:
    """Token counts summed over a turn's think rounds; a turn starts by writing None."""
    if new is None:
        return {}
    return {key: (old or {}).get(key, 0) + value for key, value in new.items()}


class TurnState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]  # the whole session's conversation
    attachments: list[dict]  # this turn's inputs as given: {"kind": "image", "path": "..."}
    media: list[str]  # media ids attached this turn
    passages: list[dict]  # retrieved: {"text", "source", "position", "score"}
    pending: list[dict]  # tool calls awaiting execution: {"id", "name", "args", "index"}
    results: Annotated[list[dict], append_or_clear]  # tool results from parallel act nodes
    spans: list[dict]  # signal spans to generate: {"modality", "key"}
    outputs: Annotated[list[str], append_or_clear]  # media ids generated this turn
    notices: list[str]  # things the user must be told this turn (a refused attachment, ...)
    steps: int  # think calls this turn
    turn_tools: list[str] | None  # this turn may use only these of the session's tools (None: all)
    intended: list[str]  # the tools the user's own words allow this turn (graphs/tool_policy.py)
    require_tool: bool  # the first think of this turn must call a tool
    max_new_tokens: int | None  # each think round's token budget this turn (None: the thinker's own)
    trace: Annotated[list[dict], operator.add]  # every routing decision and tool call, in order
    usage: Annotated[dict, add_usage]  # {"prompt_tokens", "completion_tokens"} of this turn's think rounds
    truncated: bool  # the last think round stopped at the token limit
