"""Running a validated plan as a LangGraph graph: dependency waves, independent tasks in parallel.

    dispatch -> Send("run", task) for every task whose dependencies succeeded -> dispatch -> ... -> END

Each task is its own graph step, fanned out with `Send` (the controller runs tool calls the same
way), so LangGraph runs a wave's tasks on its thread pool, merges their results through the state's
reducer and streams each one as it finishes. The price of supersteps: a wave lasts as long as its
slowest task, so a task waits for the whole wave before it, not only for its own dependencies.

A task that fails fails only what depends on it: `dispatch` marks those "skipped", naming the
failed task, and the rest of the plan runs on. References to earlier outputs (`<task-1.image>`)
are filled in just before a task runs, and the tool checks the filled-in arguments itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from graphs.planner import REFERENCE, Plan
from models.errors import SignalgraphError
from tools.expert_tools import call_tool


@dataclass
class TaskResult:
    id: int
    tool: str
    status: str  # "ok", "failed" or "skipped"
    output: Any = None  # the tool's artifact: what later tasks' references read
    summary: str = ""  # the tool's sentence for people
    error: str | None = None
    args: dict | None = None  # as run, references filled in
    wave: int = 0
    started: float | None = None  # time.perf_counter() when the tool was called
    ended: float | None = None

    def line(self) -> str:
        """What the final answer says about this task."""
        if self.status == "ok":
            return f"task {self.id} {self.tool}: {self.summary[:300]}"
        if self.status == "skipped":
            return f"task {self.id} {self.tool}: {self.error}"  # "skipped: task-N failed"
        return f"task {self.id} {self.tool}: failed: {self.error}"


class _MissingOutput(Exception):
    """A reference to an output field the earlier task did not return."""


def _merge(old: dict | None, new: dict) -> dict:
    return {**(old or {}), **new}


class PlanState(TypedDict, total=False):
    tasks: list[dict]  # the plan's tasks: {"id", "tool", "args", "deps", "wave"}
    results: Annotated[dict[int, TaskResult], _merge]


def fill_references(value: Any, outputs: dict[int, Any]) -> Any:
    """`value` with each `<task-N.field>` replaced by that output; a string that is only a
    reference becomes the value itself (a number stays a number), inside text it is written out."""
    if isinstance(value, dict):
        return {k: fill_references(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_references(v, outputs) for v in value]
    if not isinstance(value, str):
        return value
    whole = REFERENCE.fullmatch(value)
    if whole:
        return _output(outputs, int(whole.group(1)), whole.group(2))

    def written(match) -> str:
        found = _output(outputs, int(match.group(1)), match.group(2))
        return found if isinstance(found, str) else json.dumps(found, default=str)

    return REFERENCE.sub(written, value)


def _output(outputs: dict[int, Any], task: int, field: str | None) -> Any:
    output = outputs[task]
    if field is None:
        return output
    if not isinstance(output, dict) or field not in output:
        has = f"its fields: {', '.join(output)}" if isinstance(output, dict) else f"it returned {output!r:.80}"
        raise _MissingOutput(f"task {task} returned no {field!r} ({has})")
    return output[field]


class PlanRunner:
    """Runs plans over one session's tools."""

    def __init__(self, tools: Sequence):
        self.tools = {t.name: t for t in tools}
        self.graph = self._build().compile()

    def _dispatch(self, state: PlanState) -> dict:
        """Mark as skipped what can no longer run; the next wave is what `_ready` then finds."""
        results = dict(state.get("results", {}))
        skipped: dict[int, TaskResult] = {}
        changed = True
        while changed:  # until the skips have reached the dependents of dependents
            changed = False
            for task in state["tasks"]:
                if task["id"] in results:
                    continue
                blocked = next((results[d] for d in task["deps"] if d in results and results[d].status != "ok"), None)
                if blocked is not None:
                    # name the task that failed, also for the dependents of a skipped task
                    cause = blocked.error.removeprefix("skipped: ") if blocked.status == "skipped" else \
                        f"task-{blocked.id} failed"
                    results[task["id"]] = skipped[task["id"]] = TaskResult(
                        task["id"], task["tool"], "skipped", error=f"skipped: {cause}", wave=task["wave"])
                    changed = True
        return {"results": skipped}

    def _ready(self, state: PlanState):
        results = state.get("results", {})
        ready = [t for t in state["tasks"] if t["id"] not in results
                 and all(d in results and results[d].status == "ok" for d in t["deps"])]
        if not ready:
            return END
        return [Send("run", {"task": task, "outputs": {d: results[d].output for d in task["deps"]}}) for task in ready]

    def _run(self, payload: dict) -> dict:
        task, outputs = payload["task"], payload["outputs"]
        result = TaskResult(task["id"], task["tool"], "failed", wave=task["wave"])
        tool = self.tools.get(task["tool"])
        if tool is None:
            result.error = f"there is no tool {task['tool']!r} in this session"
            return {"results": {task["id"]: result}}
        try:
            result.args = _as_declared(tool, fill_references(task["args"], outputs))
        except _MissingOutput as exc:
            result.error = str(exc)
            return {"results": {task["id"]: result}}
        result.started = time.perf_counter()
        try:
            outcome = call_tool(tool, result.args, f"task-{task['id']}")
        except SignalgraphError as exc:
            result.error = str(exc)
        except Exception as exc:  # a tool's own bug: report it with the task, the plan runs on
            result.error = f"{type(exc).__name__}: {exc}"
        else:
            if outcome.error:
                result.error = outcome.error
            else:
                result.status, result.output, result.summary = "ok", outcome.artifact, outcome.text
        result.ended = time.perf_counter()
        return {"results": {task["id"]: result}}

    def _build(self) -> StateGraph:
        graph = StateGraph(PlanState)
        graph.add_node("dispatch", self._dispatch)
        graph.add_node("run", self._run)
        graph.add_edge(START, "dispatch")
        graph.add_conditional_edges("dispatch", self._ready, ["run", END])
        graph.add_edge("run", "dispatch")
        return graph

    def run(self, plan: Plan, on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
        """Every task's result, in plan order; `on_result` hears of each as it finishes or is skipped."""
        tasks = [asdict(t) | {"deps": list(t.deps)} for t in plan.tasks]
        widest = max(sum(1 for t in plan.tasks if t.wave == w) for w in range(1, plan.waves + 1))
        config = {"max_concurrency": widest, "recursion_limit": 2 * len(tasks) + 4}
        results: dict[int, TaskResult] = {}
        for update in self.graph.stream({"tasks": tasks, "results": {}}, config, stream_mode="updates"):
            for node in update.values():
                for task_id, result in ((node or {}).get("results") or {}).items():
                    results[task_id] = result
                    if on_result is not None:
                        on_result(result)
        return [results[t.id] for t in plan.tasks]


def _as_declared(tool, args: dict) -> dict:
    """A string argument given a non-string output (a reference to a list of labels, to a number)
    gets it written out as text."""
    declared = tool.args
    return {name: json.dumps(value, default=str)
            if declared.get(name, {}).get("type") == "string" and not isinstance(value, str) else value
            for name, value in args.items()}


def report(results: Sequence[TaskResult]) -> str:
    """The final answer: a count, then each task's result or error."""
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "failed", "skipped")}
    head = f"{len(results)} task{'s' if len(results) != 1 else ''}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    return "\n".join([head, *(r.line() for r in results)])

