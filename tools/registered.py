"""Tools a user registers in the config (`extra_tools: ["package.module:attribute"]`): LangChain
tools of their own, such as sending mail or calling a URL, offered to sessions beside the expert
tools. What such a tool does to the world is its own declaration (`tool.metadata`, read by the
controller's tool policy); one that declares nothing asks the user before every run."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from langchain_core.tools import BaseTool

from models.errors import ConfigError
from tools.expert_tools import TOOL_NAMES


def load_tools(specs: Iterable[str]) -> list[BaseTool]:
    tools: list[BaseTool] = []
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ConfigError(f"extra tool {spec!r} must be written 'package.module:attribute'")
        try:
            value = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"extra tool {spec!r} cannot be loaded: {exc}") from None
        found = value if isinstance(value, (list, tuple)) else [value]
        for tool in found:
            if not isinstance(tool, BaseTool):
                raise ConfigError(f"extra tool {spec!r} is a {type(tool).__name__}, not a LangChain tool")
            if tool.name in TOOL_NAMES or tool.name in {t.name for t in tools}:
                raise ConfigError(f"extra tool {spec!r} is called {tool.name!r}, which another tool is called")
            tools.append(tool)
    return tools
