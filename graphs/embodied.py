"""Embodied planning in BabyAI as a LangGraph graph: observe -> plan -> act -> check.

    observe -> plan -> act -> check -> act ...   the plan's next skill
                               \\-> observe ...  a skill failed, or the plan ran out and the mission is not done
                               \\-> END          mission done, out of time, or out of planner calls

observe looks around (first visit) and explores toward unseen cells (after a surprise, or while
nothing is in sight), and writes what the agent has seen as text. plan asks the backbone for skill
calls, constrained to the skills' schemas, whose arguments are enums of the objects seen. act runs
one skill. check compares what happened with what the plan expected. The episode (environment,
map) lives in the run's context, not in the state: state holds text and small records only.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, TypedDict

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from graphs.thinker import Thinker
from tools.babyai_skills import Episode, EpisodeOver, build_skills
from tools.babyai_world import render
from tools.expert_tools import tool_schemas

INSTRUCTIONS = ("You control a robot in a grid world. Do the mission with one skill call. "
                "Name objects with the mission's own words.")
MAX_PLAN = 5  # skill calls kept from one plan; a small model may ramble on


@dataclass
class EmbodiedContext:
    episode: Episode
    thinker: Thinker
    max_planner_calls: int = 4
    on_plan: Callable[[list[dict]], None] | None = None  # each new plan, as it is made
    on_skill: Callable[[int], None] | None = None  # index into the plan of the skill about to run


class EmbodiedState(TypedDict, total=False):
    mission: str
    view: str  # what the planner read last
    plan: list[dict]  # skill calls: {"id", "name", "args"}
    next: int  # index of the plan's next call
    failed: bool  # the last skill did not achieve what it should
    notes: Annotated[list[str], operator.add]  # what went wrong so far, shown to the planner
    spent: Annotated[list[list[str]], operator.add]  # [skill, *arguments] done without finishing the mission
    planner_calls: int
    outcome: str  # "success", "out of time", "out of planner calls", "nothing seen to act on"
    trace: Annotated[list[dict], operator.add]


@dataclass
class EmbodiedResult:
    mission: str
    success: bool
    steps: int
    planner_calls: int
    path_replans: int
    outcome: str
    trace: list[dict] = field(default_factory=list)


def call_text(call: dict) -> str:
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in call["args"].items())
    return f"{call['name']}({args})"


# --- nodes ----------------------------------------------------------------------------------------

def observe(state: EmbodiedState, runtime: Runtime[EmbodiedContext]) -> dict:
    episode = runtime.context.episode
    try:
        if "view" not in state:
            episode.look_around()
        if "view" in state or not episode.map.things():
            # a surprise, or nothing in sight yet: walk toward cells not seen until something new shows
            episode.explore()
    except EpisodeOver:
        pass
    view = render(episode.map, episode.pose, episode.carrying)
    return {"view": view, "trace": [{"step": "observe", "at": episode.steps, "view": view}]}


# Worked examples shown before the real request: a 135M model copies a pattern far more reliably
# than it follows an instruction. Their objects are invented (no BabyAI colour or type), so copying
# an example's answer can never yield a real object: the enums leave only the mission's words.
EXAMPLES = [
    ("go to the white lamp", "go_to", {"object": "the white lamp"}),
    ("put the black cup next to the pink chair", "put_next_to",
     {"object": "the black cup", "next_to": "the pink chair"}),
    ("go to a chair on your right", "go_to", {"object": "a chair on your right"}),
    ("put the pink lamp next to the pink cup", "put_next_to", {"object": "the pink lamp", "next_to": "the pink cup"}),
    ("pick up the pink lamp", "pick_up", {"object": "the pink lamp"}),
    ("open the gate behind you", "open", {"door": "the gate behind you"}),
    ("pick up a cup on your left", "pick_up", {"object": "a cup on your left"}),
    ("open the orange gate", "open", {"door": "the orange gate"}),
]


def _prompt(state: EmbodiedState) -> list:
    # what the agent sees goes first, the mission last: the words to copy are then the nearest ones
    system = f"{INSTRUCTIONS}\n\n{state['view']}"
    if state.get("notes"):
        system += "\nWhat went wrong before: " + " ".join(state["notes"][-2:])
    messages: list = [SystemMessage(content=system)]
    for i, (mission, name, args) in enumerate(EXAMPLES):
        messages += [HumanMessage(content=f"Mission:\n{mission}"),
                     AIMessage(content="", tool_calls=[{"id": f"example-{i}", "name": name, "args": args}])]
    return [*messages, HumanMessage(content=f"Mission:\n{state['mission']}")]


def plan(state: EmbodiedState, runtime: Runtime[EmbodiedContext]) -> dict:
    context = runtime.context
    if context.episode.over:
        return {"plan": [], "next": 0}
    schemas = tool_schemas(build_skills(context.episode, state.get("spent", [])))
    if not schemas:  # nothing reachable was ever seen: no skill can name anything
        return {"plan": [], "next": 0, "outcome": "nothing seen to act on"}
    result = context.thinker.think(_prompt(state), tools=schemas, passages=[], media=[], require_tool=True)
    calls = [{"id": c["id"], "name": c["name"], "args": c["args"]} for c in result.tool_calls[:MAX_PLAN]]
    if context.on_plan is not None:
        context.on_plan(calls)
    return {"plan": calls, "next": 0, "planner_calls": state.get("planner_calls", 0) + 1,
            "trace": [{"step": "plan", "at": context.episode.steps, "calls": [call_text(c) for c in calls],
                       "malformed": result.malformed}]}


def act(state: EmbodiedState, runtime: Runtime[EmbodiedContext]) -> dict:
    context = runtime.context
    episode = context.episode
    plan_, index = state.get("plan", []), state.get("next", 0)
    if episode.over or state.get("outcome"):
        return {}
    if index >= len(plan_):
        return {"failed": True, "notes": ["The plan had no skill call."], "next": index}
    call = plan_[index]
    if context.on_skill is not None:
        context.on_skill(index)
    # built afresh: the phrase resolves against the map as it is now, which earlier skills changed
    skills = {s.name: s for s in build_skills(episode)}
    if call["name"] in skills:
        result = skills[call["name"]].invoke(call["args"])
    else:
        result = f"{call['name']} cannot be done now."
    failed = not isinstance(result, dict)
    update = {"next": index + 1, "failed": failed,
              "trace": [{"step": "act", "at": episode.steps, "call": call_text(call), "result": result}]}
    if failed:
        update["notes"] = [f"{call_text(call)} failed: {result}"]
    return update


def check(state: EmbodiedState, runtime: Runtime[EmbodiedContext]) -> dict:
    context = runtime.context
    episode = context.episode
    if state.get("outcome"):
        return {"trace": [{"step": "check", "at": episode.steps, "outcome": state["outcome"]}]}
    if episode.success:
        outcome = "success"
    elif episode.over:
        outcome = "out of time"
    elif (state.get("failed") or state["next"] >= len(state["plan"])) and \
            state.get("planner_calls", 0) >= context.max_planner_calls:
        outcome = "out of planner calls"
    else:
        outcome = ""
    update: dict = {"trace": [{"step": "check", "at": episode.steps, "outcome": outcome or "continue"}]}
    if outcome:
        update["outcome"] = outcome
    elif not state.get("failed") and state["next"] >= len(state["plan"]):
        update["notes"] = [f"The plan {', '.join(call_text(c) for c in state['plan'])} is done "
                           "but the mission is not."]
        update["spent"] = [[c["name"], *c["args"].values()] for c in state["plan"] if c["args"]]
    return update


def _after_check(state: EmbodiedState) -> str:
    if state.get("outcome"):
        return END
    if state.get("failed") or state["next"] >= len(state["plan"]):
        return "observe"
    return "act"


@cache
def build_graph():
    graph = StateGraph(EmbodiedState, context_schema=EmbodiedContext)
    for name, node in [("observe", observe), ("plan", plan), ("act", act), ("check", check)]:
        graph.add_node(name, node)
    graph.add_edge(START, "observe")
    graph.add_edge("observe", "plan")
    graph.add_edge("plan", "act")
    graph.add_edge("act", "check")
    graph.add_conditional_edges("check", _after_check, ["act", "observe", END])
    return graph.compile()


def run_episode(episode: Episode, thinker: Thinker, *, max_planner_calls: int = 4,
                on_plan: Callable[[list[dict]], None] | None = None,
                on_skill: Callable[[int], None] | None = None) -> EmbodiedResult:
    """Plan and act until the mission is done, time runs out, or the planner calls are spent."""
    context = EmbodiedContext(episode, thinker, max_planner_calls, on_plan, on_skill)
    # a planner call costs observe and plan, then act and check for each skill of its plan
    final = build_graph().invoke({"mission": episode.mission, "notes": [], "trace": []}, context=context,
                                 config={"recursion_limit": (2 + 2 * MAX_PLAN) * max_planner_calls + 10})
    return EmbodiedResult(episode.mission, episode.success, episode.steps, final.get("planner_calls", 0),
                          episode.path_replans, final.get("outcome", ""), final.get("trace", []))
