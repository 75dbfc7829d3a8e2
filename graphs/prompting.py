"""The backbone's prompt, in one home: the prompts (prompts.yaml, as smolagents keeps them), and
LangChain messages and tools turned into chat-template turns.

Tool calls of an AIMessage are written back in the protocol's own notation (`<tool_call>...`);
everything else an assistant or a tool said is made inert first (tools/untrusted.py), so only
real calls are calls.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from models.errors import ConfigError, MediaError
from tools.untrusted import inert

PROMPTS = Path(__file__).with_name("prompts.yaml")


@cache
def prompts() -> dict[str, str]:
    return yaml.safe_load(PROMPTS.read_text())


# --- tools ------------------------------------------------------------------------------------

def tool_spec(tool: Any) -> dict:
    """{"name", "description", "parameters"} from anything convert_to_openai_tool takes."""
    function = convert_to_openai_tool(tool)["function"]
    return {"name": function["name"], "description": function.get("description", ""),
            "parameters": function.get("parameters") or {"type": "object", "properties": {}}}


def resolve_tool_choice(tools: list[dict], tool_choice: Any) -> tuple[list[dict], str]:
    """(tools the model may call, mode) where mode is "auto", "none", "any" or "named"."""
    if not tools or tool_choice in (None, "auto", False):
        return tools, "auto" if tools else "none"
    if tool_choice == "none":
        return [], "none"
    if tool_choice in ("any", "required", True):
        return tools, "any"
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    chosen = [t for t in tools if t["name"] == name]
    if not chosen:
        raise ConfigError(f"tool_choice names {name!r}, which is not a bound tool; bound: "
                          f"{', '.join(t['name'] for t in tools)}")
    return chosen, "named"


def describe_tools(tools: list[dict], mode: str) -> str:
    """The system-prompt text that teaches the call format and lists the tools."""
    lines = []
    for t in tools:
        arguments = {name: {k: v for k, v in prop.items() if k != "title"} if isinstance(prop, dict) else prop
                     for name, prop in t["parameters"].get("properties", {}).items()}
        description = " ".join((t.get("description") or "").split())
        lines.append(f"- {t['name']}: {description} Arguments: {json.dumps(arguments, ensure_ascii=False)}")
    rule = {"any": prompts()["tool_choice_any"],
            "named": prompts()["tool_choice_named"].format(name=tools[0]["name"] if tools else "")
            }.get(mode, prompts()["tool_choice_auto"])
    return prompts()["bound_tools"].format(tools="\n".join(lines), rule=rule)


def render_tool_calls(message: AIMessage) -> str:
    calls = [{"name": c["name"], "arguments": c["args"]} for c in message.tool_calls]
    return "".join(f"<tool_call>{json.dumps(c, ensure_ascii=False)}</tool_call>" for c in calls)


# --- messages -------------------------------------------------------------------------------

def _image_from_block(block: dict):
    """A PIL image from an image content block holding a data URL or base64 data."""
    from PIL import Image

    data = None
    if block.get("type") == "image_url":
        url = block["image_url"]["url"] if isinstance(block.get("image_url"), dict) else block.get("image_url")
        if not isinstance(url, str) or not url.startswith("data:"):
            raise MediaError("only images given inline as data URLs (data:image/png;base64,...) can be read; "
                             "store the image and pass its id instead")
        data = url.split(",", 1)[1]
    elif block.get("type") == "image":
        data = block.get("base64") or block.get("data")
        if data is None and isinstance(block.get("url"), str) and block["url"].startswith("data:"):
            data = block["url"].split(",", 1)[1]
        if data is None:
            raise MediaError("an image block needs base64 data or a data URL")
    try:
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise MediaError(f"an image content block could not be decoded: {exc}") from None


def _content(message: BaseMessage, images: list) -> str:
    """Text of a message; image blocks become <image> placeholders and go to `images`."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") in ("image_url", "image"):
            images.append(_image_from_block(block))
            parts.append("<image>")
    return "".join(parts)


def template_knows_tool_role(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "'tool'" in template or '"tool"' in template


def to_chat(messages: Sequence[BaseMessage], *, system_prefix: str = "", system_suffix: str = "",
            tool_role: bool = False, plain_tool_results: bool = False) -> tuple[list[dict], list]:
    """LangChain messages -> chat-template dicts (+ the images, in order).

    All system text goes into one system turn first: prefix, the SystemMessages, suffix.
    Tool calls of an AIMessage are written back in the protocol's own notation; a ToolMessage
    becomes a "tool" turn, or (tool_role False) a user turn tagged <tool_response name=.. id=..>,
    or (plain_tool_results) a user turn in plain prose, which very small models answer from
    instead of copying the tagged JSON back.
    """
    images: list = []
    systems: list[str] = []
    chat: list[dict] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            systems.append(_content(message, images))
        elif isinstance(message, HumanMessage):
            chat.append({"role": "user", "content": _content(message, images)})
        elif isinstance(message, AIMessage):
            # its words may quote a note or a transcript: inert, so only its real calls are calls
            chat.append({"role": "assistant", "content": inert(_content(message, images))
                         + render_tool_calls(message)})
        elif isinstance(message, ToolMessage):
            text = inert(_content(message, images))  # a tool's output is data: it cannot close its turn
            if tool_role:
                chat.append({"role": "tool", "content": text})
                continue
            if plain_tool_results:
                chat.append({"role": "user", "content": prompts()["tool_result"].format(
                    tool=message.name or "the tool", result=_prose(text))})
                continue
            turn = (f'<tool_response name="{message.name or "tool"}" id="{message.tool_call_id}">\n'
                    f"{text}\n</tool_response>")
            if chat and chat[-1]["role"] == "user" and chat[-1]["content"].startswith("<tool_response"):
                chat[-1]["content"] += "\n" + turn  # results of parallel calls share one turn
            else:
                chat.append({"role": "user", "content": turn})
        elif isinstance(message, ChatMessage):
            chat.append({"role": message.role, "content": _content(message, images)})
        else:
            raise ConfigError(f"cannot put a {type(message).__name__} into the backbone's prompt")
    system = "\n\n".join(s for s in (system_prefix, *systems, system_suffix) if s)
    if system:
        chat.insert(0, {"role": "system", "content": system})
    return chat, images


def _prose(result: str) -> str:
    """A tool's JSON result as short `key: value` prose."""
    try:
        value = json.loads(result)
    except ValueError:
        return result
    if not isinstance(value, dict):
        return result
    return "; ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items())
