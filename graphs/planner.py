"""Task plans after HuggingGPT: the backbone turns a request into tasks, which are checked and
repaired before anything runs.

A plan is a list of tasks `{"id": 1, "tool": "describe_image", "args": {...}, "deps": [...]}`.
An argument may use an earlier task's output: `"<task-1.image>"` is the `image` field of what
task 1 returned (`"<task-1>"` is all of it); inside longer text the reference is replaced by the
value written out.

The backbone writes the plan as one call of a pseudo-tool, `plan`, whose JSON schema is the
plan's: the constrained decoder then makes a plan that parses the only thing it can write. Each
task is one `anyOf` case per tool (the tool's name as a `const`, its own argument schema), so the
tool names form an enum and the arguments fit the tool chosen; string arguments with a pattern
(media ids) also accept a reference.

`validate_plan` repairs what has one reading (a tool name off by case, `_` or `-`; a reference
to task 2 without a dependency on it; duplicate dependencies) and otherwise raises `PlanError`
listing every problem found, not just the first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import BaseModel, ValidationError

from graphs.prompting import prompts
from graphs.thinker import Thinker
from models.errors import SignalgraphError
from tools.expert_tools import tool_schemas

PLAN_TOOL = "plan"
MAX_TASKS = 8
# Enough for the longest plan the schema allows written in bytes (the tiny profile's tokenizer);
# a subword model closes its plan far sooner, and decoding stops there.
PLAN_MAX_NEW_TOKENS = 2048
# Strings in a plan are short; a bound keeps a wandering model's plan within the token budget.
MAX_STRING = 200
# The most times an open repeat (`+`, `*`) of a pattern may match in a plan: xgrammar ignores
# maxLength beside a pattern, and a model unsure how to end `image-[0-9]+` would go on forever.
MAX_REPEAT = 16
REFERENCE = re.compile(r"<task-(\d+)(?:\.([A-Za-z_][A-Za-z0-9_]*))?>")
_TASK_KEYS = ("id", "tool", "args", "deps")


class PlanError(SignalgraphError):
    """A plan that cannot run; `problems` lists every reason, `raw` is the plan as written."""

    def __init__(self, problems: list[str], raw: Any = None):
        self.problems = problems
        self.raw = raw
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"the plan cannot run ({count}): "
                         + "; ".join(f"{i}) {p}" for i, p in enumerate(problems, 1)))


@dataclass(frozen=True)
class Task:
    id: int
    tool: str
    args: dict
    deps: tuple[int, ...]
    wave: int  # 1 for tasks with no dependencies, else one more than the latest dependency's


@dataclass(frozen=True)
class Plan:
    tasks: tuple[Task, ...]  # in the order they may run: by wave, then as written
    repairs: tuple[str, ...] = ()

    @property
    def waves(self) -> int:
        return max(t.wave for t in self.tasks)

    def to_dict(self) -> dict:
        return {"tasks": [asdict(t) | {"deps": list(t.deps)} for t in self.tasks], "repairs": list(self.repairs)}


# --- what the backbone writes -----------------------------------------------------------------

def plan_schema(tools: Sequence[dict], max_tasks: int = MAX_TASKS) -> dict:
    """The JSON schema of a plan over these tools ({"name", "parameters"} each)."""
    task_id = {"type": "integer", "minimum": 1, "maximum": max_tasks}
    cases = [{
        "type": "object",
        "properties": {"id": task_id, "tool": {"const": tool["name"]},
                       "args": _accepting_references(tool["parameters"], max_tasks),
                       "deps": {"type": "array", "items": task_id, "maxItems": max_tasks - 1}},
        "required": list(_TASK_KEYS),
        "additionalProperties": False,
    } for tool in tools]
    return {"type": "object",
            "properties": {"tasks": {"type": "array", "items": {"anyOf": cases}, "minItems": 1, "maxItems": max_tasks}},
            "required": ["tasks"], "additionalProperties": False}


def _reference_schema(max_tasks: int) -> dict:
    ids = "|".join(str(i) for i in range(1, max_tasks + 1))
    return {"type": "string", "pattern": f"^<task-({ids})(\\.[A-Za-z_][A-Za-z0-9_]{{0,{MAX_REPEAT}}})?>$"}


def _bounded(pattern: str) -> str:
    """`pattern` with its open repeats outside character classes bounded to MAX_REPEAT."""
    out, escaped, in_class = [], False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char in "+*" and not in_class:
            char = f"{{{1 if char == '+' else 0},{MAX_REPEAT}}}"
        out.append(char)
    return "".join(out)


def _accepting_references(parameters: dict, max_tasks: int) -> dict:
    """A tool's argument schema in which patterned strings may also be a reference."""
    properties = {}
    for name, spec in parameters.get("properties", {}).items():
        if spec.get("type") == "string" and "pattern" in spec:
            spec = {"anyOf": [dict(spec, pattern=_bounded(spec["pattern"])), _reference_schema(max_tasks)]}
        elif spec.get("type") == "string":
            spec = dict(spec, maxLength=min(spec.get("maxLength", MAX_STRING), MAX_STRING))
        properties[name] = spec
    return dict(parameters, properties=properties)


def plan_tool(tools: Sequence[dict]) -> dict:
    return {"name": PLAN_TOOL, "description": "write the tasks that answer the request",
            "parameters": plan_schema(tools)}


def planner_prompt(tools: Sequence[dict]) -> str:
    listing = "\n".join(f"- {t['name']}({', '.join(t['parameters'].get('properties', {}))}): {t['description']}"
                        for t in tools)
    return prompts()["planner"].format(tools=listing).strip()


def make_plan(thinker: Thinker, request: str, tools: Sequence, media: Sequence[dict] = ()) -> Plan:
    """Ask the backbone for a plan for `request` over these LangChain tools, and validate it."""
    schemas = tool_schemas(tools)
    messages = [SystemMessage(content=planner_prompt(schemas)), HumanMessage(content=request)]
    result = thinker.think(messages, tools=[plan_tool(schemas)], passages=[], media=list(media), require_tool=True)
    call = next((c for c in result.tool_calls if c["name"] == PLAN_TOOL), None)
    if call is None:
        cut = "<tool_call>" in result.raw  # an unclosed call was cut off by the token limit
        why = "; ".join(result.malformed) or ("it ran out of tokens before the plan was complete" if cut
                                              else f"it wrote {result.text[:120]!r}")
        raise PlanError([f"the backbone wrote no plan ({why})"], raw=result.raw)
    return validate_plan(call["args"], tools)


# --- validation and repair --------------------------------------------------------------------

def references(value: Any) -> list[tuple[int, str | None]]:
    """Every (task id, field) that `value` refers to, in nested dicts and lists too."""
    if isinstance(value, str):
        return [(int(m.group(1)), m.group(2)) for m in REFERENCE.finditer(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [ref for item in value for ref in references(item)]
    return []


def _task_id(value: Any) -> int | None:
    """1, "1" and "task-1" all name task 1."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and (match := re.fullmatch(r"\s*(?:task-?)?(\d+)\s*", value, re.IGNORECASE)):
        return int(match.group(1)) or None
    return None


def _squash(name: str) -> str:
    return re.sub(r"[\s_-]", "", name.lower())


def _tool_name(name: Any, tools: dict[str, Any]) -> str | None:
    if not isinstance(name, str):
        return None
    if name in tools:
        return name
    matches = [real for real in tools if _squash(real) == _squash(name)]
    return matches[0] if len(matches) == 1 else None


def _argument_problems(tool, args: dict) -> list[str]:
    """What the tool's own pydantic schema refuses, leaving aside arguments that hold references
    (their values are known only when the task runs, and are checked then)."""
    schema = tool.args_schema
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return []
    try:
        schema.model_validate(args)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = error["loc"][0] if error["loc"] else None
            if field in args and references(args[field]):
                continue
            where = ".".join(str(part) for part in error["loc"]) or "arguments"
            problems.append(f"{where}: {error['msg']}")
        return problems
    return []


def _cycles(deps: dict[int, list[int]]) -> list[list[int]]:
    """One cycle through each group of tasks that wait on each other."""
    state: dict[int, str] = {}
    found: list[list[int]] = []
    seen_members: set[int] = set()

    def visit(node: int, path: list[int]) -> None:
        state[node] = "open"
        path.append(node)
        for dep in deps.get(node, []):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):]
                if not seen_members.intersection(cycle):
                    found.append(cycle + [dep])
                    seen_members.update(cycle)
            elif dep in deps and dep not in state:
                visit(dep, path)
        path.pop()
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node, [])
    return found


def validate_plan(raw: Any, tools: Sequence) -> Plan:
    """The runnable plan, with the repairs made; or PlanError listing every problem."""
    by_name = {t.name: t for t in tools}
    tasks = raw.get("tasks") if isinstance(raw, dict) else raw
    if not isinstance(tasks, list) or not tasks:
        raise PlanError(["a plan needs a non-empty list of tasks"], raw=raw)
    problems: list[str] = []
    repairs: list[str] = []
    entries: list[dict] = []  # {"id", "tool", "args", "deps"} of tasks whose id could be read
    for position, item in enumerate(tasks, 1):
        if not isinstance(item, dict):
            problems.append(f"task #{position} is not an object with {', '.join(_TASK_KEYS)}")
            continue
        task_id = _task_id(item.get("id"))
        where = f"task {task_id}" if task_id else f"task #{position}"
        if task_id is None:
            problems.append(f"{where}: id must be a positive whole number, got {item.get('id')!r}")
        elif task_id != item["id"]:
            repairs.append(f"{where}: id {item['id']!r} read as {task_id}")
        unknown = [key for key in item if key not in _TASK_KEYS]
        if unknown:
            problems.append(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")
        tool = _tool_name(item.get("tool"), by_name)
        if tool is None:
            problems.append(f"{where}: there is no tool {item.get('tool')!r}; available: {', '.join(by_name)}")
        elif tool != item["tool"]:
            repairs.append(f"{where}: tool {item['tool']!r} read as {tool!r}")
        args = item.get("args", {})
        if not isinstance(args, dict):
            problems.append(f"{where}: args must be an object, got {type(args).__name__}")
            args = {}
        deps = item.get("deps", [])
        if not isinstance(deps, list):
            problems.append(f"{where}: deps must be a list of task ids, got {deps!r}")
            deps = []
        dep_ids = []
        for dep in deps:
            if _task_id(dep) is None:
                problems.append(f"{where}: dependency {dep!r} is not a task id")
                continue
            if _task_id(dep) != dep:
                repairs.append(f"{where}: dependency {dep!r} read as task {_task_id(dep)}")
            dep_ids.append(_task_id(dep))
        if tool is not None:
            problems += [f"{where}: {tool} argument {p}" for p in _argument_problems(by_name[tool], args)]
        if task_id is not None:
            entries.append({"id": task_id, "tool": tool, "args": args, "deps": dep_ids})

    ids = [e["id"] for e in entries]
    for repeated in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"task id {repeated} is used by {ids.count(repeated)} tasks; ids must be unique")
    for entry in entries:
        me, deps = entry["id"], []
        for dep in entry["deps"]:
            if dep in deps:
                repairs.append(f"task {me}: repeated dependency on task {dep} dropped")
            elif dep == me:
                repairs.append(f"task {me}: dependency on itself dropped")
            elif dep not in ids:
                problems.append(f"task {me} depends on task {dep}, which is not in the plan")
            else:
                deps.append(dep)
        for ref, field in references(entry["args"]):
            written = f"<task-{ref}{'.' + field if field else ''}>"
            if ref == me:
                problems.append(f"task {me} uses its own output {written}")
            elif ref not in ids:
                problems.append(f"task {me} uses {written}, but there is no task {ref}")
            elif ref not in deps:
                deps.append(ref)
                repairs.append(f"task {me}: now depends on task {ref}, whose output {written} it uses")
        entry["deps"] = deps
    for cycle in _cycles({e["id"]: e["deps"] for e in entries}):
        problems.append("tasks wait on each other in a circle: " + " -> ".join(f"task {i}" for i in cycle))
    if problems:
        raise PlanError(list(dict.fromkeys(problems)), raw=raw)  # tasks sharing an id repeat theirs

    waves: dict[int, int] = {}
    by_id = {e["id"]: e for e in entries}

    def wave(task_id: int) -> int:
        if task_id not in waves:
            waves[task_id] = 1 + max((wave(d) for d in by_id[task_id]["deps"]), default=0)
        return waves[task_id]

    ordered = sorted(entries, key=lambda e: wave(e["id"]))  # stable: as written within a wave
    return Plan(tuple(Task(e["id"], e["tool"], e["args"], tuple(e["deps"]), wave(e["id"])) for e in ordered),
                tuple(repairs))


def describe(task: Task) -> str:
    """One line a person reads: `task 2 (wave 2) describe_image(image=<task-1.image>) after 1`."""
    args = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in task.args.items())
    after = f"  after {', '.join(map(str, task.deps))}" if task.deps else ""
    return f"task {task.id} (wave {task.wave}) {task.tool}({args}){after}"
