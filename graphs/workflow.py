"""Scripted workflows as LangGraph graphs that survive a crash.

    START -> step 1 -> step 2 -> ... -> END        (an approval step that is rejected goes to END)

Each step of a workflow file (graphs/workflow_spec.py) is one node; its output lands in the state
under its name, where later steps' templates read it. The graph is checkpointed after every step
(`durability="sync"`) in one SQLite file, `data_dir/workflows.sqlite`, with the run id as thread:
a process killed at any point resumes at the step that was running, and completed steps are not
run again. State holds small records only; media are ids into the on-disk media store (session
`workflow-<run id>`), so ids in checkpointed outputs stay valid after a restart.

The same file holds the runs' own record (graphs/workflow_runs.py): status, step, and a log of
every attempt, which `signalgraph runs` reads without loading a model.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from graphs.thinker import Thinker
from graphs.workflow_runs import PgRunLog, RunInfo, RunLog, WorkflowError, session_of
from graphs.workflow_spec import MEDIA_TYPES, ApprovalStep, PromptStep, ToolStep, WorkflowSpec, input_values
from graphs.workflow_templates import EvaluationError, SkippedStepError, condition, evaluate, render
from models.errors import SignalgraphError
from tools.expert_tools import call_tool
from tools.untrusted import neutralise


class StepFailed(SignalgraphError):
    """A step that failed on every attempt, or whose templates could not be filled in."""

    def __init__(self, step: str, reason: str):
        super().__init__(f"step {step!r} failed: {reason}")
        self.step = step


class _AttemptFailed(Exception):
    """One attempt that failed in a way a retry may fix (a tool error, a timeout)."""


def _merge(old: dict | None, new: dict) -> dict:
    return {**(old or {}), **new}


class WorkflowState(TypedDict, total=False):
    inputs: dict[str, Any]  # the run's inputs; media as ids
    steps: Annotated[dict[str, Any], _merge]  # step name -> its output (None: skipped)
    rejected: str | None  # the approval step that was answered no


def _within(seconds: float, work: Callable[[], Any]) -> Any:
    """`work()`, or `_AttemptFailed` after `seconds`. The thread of an attempt that timed out is
    left to finish on its own (a daemon: it does not keep the process alive)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="workflow-step")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _AttemptFailed(f"did not finish within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class WorkflowRunner:
    """Starts, resumes and answers workflow runs; every step is checkpointed before the next.

    `tools_for(session)` gives a session's LangChain tools; `thinker()` gives the backbone's
    thinker, asked for only when a prompt step runs (a workflow of tools loads no LLM)."""

    def __init__(self, data_dir: Path, *, store, tools_for: Callable[[str], list], thinker: Callable[[], Thinker],
                 tool_timeout: float = 120.0, database=None):
        self.store = store
        self.tools_for = tools_for
        self.thinker = thinker
        self.tool_timeout = tool_timeout
        self._conn = None
        if database is not None:  # runs and their checkpoints in the shared database (set up by its migrations)
            self.log = PgRunLog(database)
            self.saver = database.checkpointer("workflows")
        else:
            from langgraph.checkpoint.sqlite import SqliteSaver

            self.log = RunLog(Path(data_dir) / "workflows.sqlite")
            self._conn = sqlite3.connect(self.log.path, check_same_thread=False, timeout=30)
            self.saver = SqliteSaver(self._conn)
            self.saver.setup()
        self._on_event: Callable[[str, str, int | None, str], None] | None = None

    # --- starting and resuming -----------------------------------------------------------------

    def create(self, spec: WorkflowSpec, source: Path, given: dict[str, str], profile: str | None = None) -> str:
        """A new run of a checked workflow: inputs filled in (media stored, as ids); nothing runs yet."""
        values = input_values(spec, given, Path(source))
        run_id = f"{spec.name}-{secrets.token_hex(4)}"
        for name, declared in spec.inputs.items():
            if declared.type in MEDIA_TYPES:
                try:
                    values[name] = self.store.add_file(session_of(run_id), values[name], declared.type).id
                except SignalgraphError as exc:
                    raise WorkflowError(f"input {name!r}: {exc}") from None
        self.log.create(run_id, spec, Path(source).resolve(), values, profile)
        return run_id

    def execute(self, run_id: str, answer: bool | None = None,
                on_event: Callable[[str, str, int | None, str], None] | None = None) -> RunInfo:
        """Run `run_id` from where its checkpoint left off until it is done, fails, or waits for an
        approval; `answer` answers the approval it waits for. `on_event(step, event, attempt, detail)`
        hears every step event as it happens."""
        run = self.log.get(run_id)
        if run.status in ("done", "rejected"):
            if answer is not None:
                raise WorkflowError(f"run {run_id!r} is {run.state}; there is nothing to approve")
            return run
        graph = self._graph(WorkflowSpec.model_validate(run.spec))
        config = {"configurable": {"thread_id": run_id}}
        snapshot = graph.get_state(config)
        waiting = [i.value for i in snapshot.interrupts]
        if waiting and answer is None:
            raise WorkflowError(
                f"run {run_id!r} is waiting for approval at step {waiting[0]['step']!r}: {waiting[0]['question']} "
                f"-- answer with `signalgraph run --resume {run_id} --approve` (or --reject)")
        if answer is not None and not waiting:
            raise WorkflowError(f"run {run_id!r} is not waiting for approval (it is {run.state})")
        self.log.claim(run_id)
        if answer is not None:
            payload: Any = Command(resume=answer)
        elif snapshot.created_at is None:  # killed before its first checkpoint: start from the inputs
            payload = {"inputs": run.inputs, "steps": {}, "rejected": None}
        else:
            payload = None
        self._on_event = on_event
        try:
            for _ in graph.stream(payload, config, stream_mode="updates", durability="sync"):
                pass
        except StepFailed as exc:
            self.log.update(run_id, status="failed", step=exc.step, error=str(exc))
            return self.log.get(run_id)
        except Exception as exc:  # a bug: recorded for `runs`, then shown as itself
            self.log.update(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._on_event = None
        return self._settle(run_id, graph.get_state(config))

    def _settle(self, run_id: str, snapshot) -> RunInfo:
        """Record where the graph stopped: waiting for a person, rejected, or done with outputs."""
        if snapshot.interrupts:
            pending = snapshot.interrupts[0].value
            self.log.event(run_id, pending["step"], "waiting", detail=pending["question"])
            self.log.update(run_id, status="waiting", question=pending["question"])
        elif snapshot.values.get("rejected"):
            self.log.update(run_id, status="rejected", step=snapshot.values["rejected"])
        else:
            spec = WorkflowSpec.model_validate(self.log.get(run_id).spec)
            scope = {"inputs": snapshot.values["inputs"], "steps": snapshot.values.get("steps", {})}
            outputs = {}
            for name, template in spec.outputs.items():
                try:
                    outputs[name] = render(template, scope)
                except SkippedStepError:
                    outputs[name] = None
                except EvaluationError as exc:
                    self.log.update(run_id, status="failed", step=None, error=f"output {name!r}: {exc}")
                    return self.log.get(run_id)
            self.log.update(run_id, status="done", step=None, outputs=outputs)
        return self.log.get(run_id)

    # --- the graph -----------------------------------------------------------------------------

    def _graph(self, spec: WorkflowSpec):
        graph = StateGraph(WorkflowState)
        for step in spec.steps:
            graph.add_node(step.name, self._node(step))
        graph.add_edge(START, spec.steps[0].name)
        following = [s.name for s in spec.steps[1:]] + [END]
        for step, after in zip(spec.steps, following):
            if isinstance(step, ApprovalStep) and after != END:
                graph.add_conditional_edges(step.name, _unless_rejected(after), [after, END])
            else:
                graph.add_edge(step.name, after)
        return graph.compile(checkpointer=self.saver)

    def _node(self, step: ToolStep | PromptStep | ApprovalStep):
        def run_step(state: WorkflowState, config) -> dict:
            run_id = config["configurable"]["thread_id"]
            scope = {"inputs": state["inputs"], "steps": state.get("steps", {})}
            try:
                if step.when is not None and not evaluate(condition(step.when), scope):
                    self._emit(run_id, step.name, "skipped", None, step.when)
                    return {"steps": {step.name: None}}
                if isinstance(step, ApprovalStep):
                    question = str(render(step.approval, scope))
                    # the node runs again from the top when answered; nothing above has side effects
                    approved = bool(interrupt({"step": step.name, "question": question}))
                    self._emit(run_id, step.name, "approved" if approved else "rejected", None, "")
                    return {"steps": {step.name: {"approved": approved}},
                            "rejected": None if approved else step.name}
                work = self._work(step, scope, session_of(run_id))
            except EvaluationError as exc:
                raise StepFailed(step.name, str(exc)) from None
            return {"steps": {step.name: self._attempts(run_id, step, work)}}

        return run_step

    def _work(self, step: ToolStep | PromptStep, scope: dict, session: str) -> Callable[[], Any]:
        """One attempt of a step, its templates already filled in."""
        if isinstance(step, PromptStep):
            # earlier steps' outputs (transcripts, labels) are data inside the prompt, never instructions
            prompt = str(render(step.prompt, {**scope, "steps": _inert(scope["steps"])}))

            def ask() -> dict:
                result = self.thinker().think([HumanMessage(content=prompt)], tools=[], passages=[], media=[])
                return {"text": result.text}

            return ask
        args = render(step.args, scope)
        tool = next((t for t in self.tools_for(session) if t.name == step.tool), None)
        if tool is None:
            raise StepFailed(step.name, f"the tool {step.tool!r} is not available to this agent")

        def call() -> Any:
            outcome = call_tool(tool, args)
            if outcome.error:  # the tool's own error message (see tools/expert_tools.py)
                raise _AttemptFailed(outcome.error)
            return outcome.artifact

        return call

    def _attempts(self, run_id: str, step: ToolStep | PromptStep, work: Callable[[], Any]) -> Any:
        attempts = step.retries + 1
        timeout = step.timeout or self.tool_timeout
        for attempt in range(1, attempts + 1):
            self._emit(run_id, step.name, "started", attempt, "")
            try:
                output = _within(timeout, work)
            except (_AttemptFailed, SignalgraphError) as exc:
                self._emit(run_id, step.name, "failed", attempt, str(exc))
                if attempt == attempts:
                    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
                    raise StepFailed(step.name, f"{exc}{tries}") from None
                time.sleep(step.retry_delay)
                continue
            self._emit(run_id, step.name, "finished", attempt, "")
            return output

    def _emit(self, run_id: str, step: str, event: str, attempt: int | None, detail: str) -> None:
        self.log.event(run_id, step, event, attempt, detail)
        if self._on_event is not None:
            self._on_event(step, event, attempt, detail)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.log.close()


def _unless_rejected(after: str) -> Callable[[WorkflowState], str]:
    def route(state: WorkflowState) -> str:
        return END if state.get("rejected") else after

    return route


def _inert(value):
    """Strings of earlier steps' outputs made inert for a prompt (tools/untrusted.py)."""
    if isinstance(value, str):
        return neutralise(value)
    if isinstance(value, dict):
        return {k: _inert(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_inert(v) for v in value]
    return value
