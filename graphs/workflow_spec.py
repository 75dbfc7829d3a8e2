"""What a workflow file may say, checked completely before anything runs.

    name: voice-memo
    inputs:
      memo: {type: audio, default: ../data/question.wav}
    steps:
      - name: transcript
        tool: transcribe
        args: {audio: "{{ inputs.memo }}"}
        retries: 1
        timeout: 120
      - name: summary
        prompt: "Summarise in one sentence: {{ steps.transcript.text }}"
      - name: check
        approval: "Read this summary aloud? {{ steps.summary.text }}"
      - name: spoken
        tool: speak
        args: {text: "{{ steps.summary.text }}"}
        when: "len(steps.summary.text) > 0"
    outputs:
      summary: "{{ steps.summary.text }}"
      audio: "{{ steps.spoken.audio }}"

A step is exactly one of: a tool call (`tool`, `args`), a prompt to the backbone (`prompt`; its
output is `{text}`), or a question for a person (`approval`; its output is `{approved}`, and a
rejection ends the run). Every problem is reported as `FILE: step 'NAME': field 'FIELD': what`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from graphs.workflow_templates import ExpressionError, condition, references, template_expressions
from models.config_files import read_mapping
from models.errors import ConfigError
from tools.expert_tools import TOOL_NAMES

_NAME = r"^[a-z][a-z0-9_]*$"
RESERVED = ("inputs", "steps", "rejected")  # keys of the workflow's graph state
STEP_KINDS = ("tool", "prompt", "approval")


class WorkflowSpecError(ConfigError):
    """A workflow file that cannot run as written; the message names file, step and field."""


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "number", "boolean", "image", "audio", "video"] = "text"
    default: str | int | float | bool | None = None  # media: a path, relative to the workflow file
    description: str = ""


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    description: str = ""
    when: str | None = None  # an expression; the step is skipped (output null) when it is false


class _Retrying(_Step):
    retries: int = Field(0, ge=0, le=10)  # further attempts after a failed one
    retry_delay: float = Field(1.0, ge=0, le=600)  # seconds before each further attempt
    timeout: float | None = Field(None, gt=0)  # seconds per attempt; default: the agent's tool_timeout


class ToolStep(_Retrying):
    tool: str
    args: dict[str, Any] = {}


class PromptStep(_Retrying):
    prompt: str = Field(min_length=1)


class ApprovalStep(_Step):
    approval: str = Field(min_length=1)  # the question a person answers with --approve or --reject


def _step_kind(data: Any) -> str | None:
    if isinstance(data, BaseModel):
        return next(kind for kind in STEP_KINDS if hasattr(data, kind))
    kinds = [kind for kind in STEP_KINDS if isinstance(data, dict) and kind in data]
    return kinds[0] if len(kinds) == 1 else None


Step = Annotated[
    Annotated[ToolStep, Tag("tool")] | Annotated[PromptStep, Tag("prompt")] | Annotated[ApprovalStep, Tag("approval")],
    Discriminator(_step_kind, custom_error_type="step_kind",
                  custom_error_message="a step needs exactly one of tool, prompt or approval"),
]


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    description: str = ""
    inputs: dict[str, InputSpec] = {}
    steps: list[Step] = Field(min_length=1)
    outputs: dict[str, Any] = {}  # name -> template; a skipped step's fields give null


def step_kind(step: ToolStep | PromptStep | ApprovalStep) -> str:
    return _step_kind(step)


# --- loading and checking -----------------------------------------------------------------------


def load_workflow(path: Path, tools: dict[str, dict]) -> WorkflowSpec:
    """The checked workflow in `path`. `tools` maps the tool names this agent allows to their
    JSON argument schemas; a step's tool and argument names must fit them."""
    path = Path(path)
    raw = read_mapping(path, "workflow")
    try:
        spec = WorkflowSpec.model_validate(raw)
    except ValidationError as exc:
        raise WorkflowSpecError("; ".join(_pydantic_problem(path.name, raw, e) for e in exc.errors())) from None
    found = check_workflow(spec, tools)
    if found:
        raise WorkflowSpecError("; ".join(f"{path.name}: {problem}" for problem in found))
    return spec


def check_workflow(spec: WorkflowSpec, tools: dict[str, dict]) -> list[str]:
    """What pydantic cannot see: unique names, known tools and arguments, and templates that
    refer only to declared inputs and earlier steps. Each problem as `step 'NAME': field 'F': what`."""
    found: list[str] = []
    for name in spec.inputs:
        if not _identifier(name):
            found.append(f"field 'inputs.{name}': an input name must be a lower-case identifier such as 'topic'")
    earlier: list[str] = []
    for step in spec.steps:
        where = f"step {step.name!r}"
        if step.name in earlier:
            found.append(f"{where}: field 'name': another step is already called {step.name!r}")
        if step.name in RESERVED:
            found.append(f"{where}: field 'name': {step.name!r} is reserved (choose another name)")
        later = [s.name for s in spec.steps if s.name not in earlier and s.name != step.name]
        fields = _templated_fields(step)
        if isinstance(step, ToolStep):
            found += [f"{where}: {problem}" for problem in _tool_problems(step, tools)]
        for field, text in fields:
            try:
                trees = [condition(text)] if field == "when" else template_expressions(text)
            except ExpressionError as exc:
                found.append(f"{where}: field {field!r}: {exc}")
                continue
            found += [f"{where}: field {field!r}: {problem}"
                      for problem in _reference_problems(trees, spec, earlier, later, step.name)]
        earlier.append(step.name)
    for field, text in _strings(spec.outputs, "outputs"):
        try:
            trees = template_expressions(text)
        except ExpressionError as exc:
            found.append(f"field {field!r}: {exc}")
            continue
        found += [f"field {field!r}: {problem}" for problem in _reference_problems(trees, spec, earlier, [], None)]
    return found


def _identifier(name: str) -> bool:
    return re.fullmatch(_NAME, name) is not None


def _templated_fields(step) -> list[tuple[str, str]]:
    fields = [("when", step.when)] if step.when is not None else []
    if isinstance(step, ToolStep):
        fields += _strings(step.args, "args")
    elif isinstance(step, PromptStep):
        fields.append(("prompt", step.prompt))
    else:
        fields.append(("approval", step.approval))
    return fields


def _strings(value: Any, field: str) -> list[tuple[str, str]]:
    """Every text inside `value` (records and lists too), with its field path."""
    if isinstance(value, str):
        return [(field, value)]
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _strings(item, f"{field}.{key}")]
    if isinstance(value, list):
        return [pair for i, item in enumerate(value) for pair in _strings(item, f"{field}[{i}]")]
    return []


def _tool_problems(step: ToolStep, tools: dict[str, dict]) -> list[str]:
    if step.tool not in tools:
        if step.tool in TOOL_NAMES:
            return [f"field 'tool': the tool {step.tool!r} is not allowed by this agent's config "
                    f"(allowed: {', '.join(tools) or 'none'})"]
        return [f"field 'tool': unknown tool {step.tool!r} (available tools: {', '.join(TOOL_NAMES)})"]
    schema = tools[step.tool]
    known = list(schema.get("properties", {}))
    found = [f"field 'args.{name}': {step.tool} takes no argument {name!r} (it takes: {', '.join(known)})"
             for name in step.args if name not in known]
    missing = [name for name in schema.get("required", []) if name not in step.args]
    if missing:
        found.append(f"field 'args': {step.tool} needs {', '.join(map(repr, missing))}")
    return found


def _reference_problems(trees, spec: WorkflowSpec, earlier: list[str], later: list[str],
                        this: str | None) -> list[str]:
    found = []
    for tree in trees:
        for root, name in references(tree):
            if root == "inputs" and name not in spec.inputs:
                found.append(f"unknown input 'inputs.{name}' (inputs: {', '.join(spec.inputs) or 'none'})")
            elif root == "steps" and name not in earlier:
                if name == this:
                    found.append(f"'steps.{name}' is this step itself (refer to earlier steps only)")
                elif name in later:
                    found.append(f"'steps.{name}' runs after this step (refer to earlier steps only)")
                else:
                    found.append(f"unknown step 'steps.{name}' (earlier steps: {', '.join(earlier) or 'none'})")
    return found


def _pydantic_problem(file: str, raw: dict, error: dict) -> str:
    loc = list(error["loc"])
    where = file
    if loc[:1] == ["steps"] and len(loc) > 1 and isinstance(loc[1], int):
        index = loc[1]
        items = raw.get("steps") if isinstance(raw.get("steps"), list) else []
        name = items[index].get("name") if index < len(items) and isinstance(items[index], dict) else None
        where += f": step {name!r}" if isinstance(name, str) else f": step {index + 1}"
        loc = loc[3:] if len(loc) > 2 and loc[2] in STEP_KINDS else loc[2:]
    if loc:
        where += f": field {'.'.join(map(str, loc))!r}"
    return f"{where}: {_message(error)}"


def _message(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
              "less_than": "< {lt}"}
    if kind in bounds:
        return "must be " + bounds[kind].format(**ctx)
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a field this takes (check the spelling)"
    if kind == "string_pattern_mismatch":
        return "must be a lower-case name such as 'summary' (letters, digits and _, starting with a letter)"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    return error["msg"][:1].lower() + error["msg"][1:]


# --- inputs -------------------------------------------------------------------------------------

MEDIA_TYPES = ("image", "audio", "video")


def input_values(spec: WorkflowSpec, given: dict[str, str], source: Path) -> dict[str, Any]:
    """Every input's value, from `given` (text from the command line) or its default; media
    inputs become absolute paths (given: from the working folder; defaults: from the file's folder)."""
    unknown = [key for key in given if key not in spec.inputs]
    if unknown:
        raise WorkflowSpecError(f"{source.name}: unknown input{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(map(repr, unknown))} (inputs: {', '.join(spec.inputs) or 'none'})")
    values, missing = {}, []
    for name, declared in spec.inputs.items():
        if name in given:
            raw, base = given[name], Path.cwd()
        elif declared.default is not None:
            raw, base = declared.default, source.parent
        else:
            missing.append(name)
            continue
        values[name] = _coerce(name, declared, raw, base)
    if missing:
        raise WorkflowSpecError(f"{source.name}: give {', '.join(f'--input {m}=...' for m in missing)} "
                                f"(no default)")
    return values


def _coerce(name: str, declared: InputSpec, raw: Any, base: Path) -> Any:
    text = str(raw).strip()
    if declared.type in MEDIA_TYPES:
        return str((base / Path(text).expanduser()).resolve())
    if declared.type == "number":
        try:
            number = float(text)
        except ValueError:
            raise WorkflowSpecError(f"input {name!r}: {text!r} is not a number") from None
        return int(number) if number.is_integer() and "." not in text else number
    if declared.type == "boolean":
        if isinstance(raw, bool):
            return raw
        if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise WorkflowSpecError(f"input {name!r}: {text!r} is not true or false")
        return text.lower() in ("true", "yes", "1")
    return str(raw)
