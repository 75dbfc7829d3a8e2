"""`signalgraph bench controller`: the controller's own cost, tool-call validity, and parallel tools.

Each figure is measured against its baseline in the same run and printed as a ratio; the table
is also written as Markdown (and JSON) under the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel

# --- controller overhead ------------------------------------------------------------------------


class _TimedThinker:
    """Wraps a thinker and adds up the time spent inside it."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.cache = getattr(inner, "cache", None)

    def think(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner.think(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def controller_overhead(turns: int, work_dir: Path, profile_name: str = "tiny") -> dict:
    """(turn wall time - time inside the model and tools) / turn wall time."""
    from agent.config import AgentConfig
    from agent.runtime import Runtime
    from graphs.thinker import BackboneThinker, ConditioningCache
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    profile = load_profile(profile_name)
    thinker = _TimedThinker(BackboneThinker(MMLLM.from_profile(profile), ConditioningCache(), max_new_tokens=32))
    config = AgentConfig(profile=profile_name, data_dir=work_dir / f"overhead-{profile_name}", allowed_dirs=[work_dir],
                         retrieve_k=0)
    runtime = Runtime(config, profile, thinker=thinker)
    controller = runtime.controller
    controller.turn("warm-up", "hello")  # load the model once
    thinker.seconds, wall, tools = 0.0, 0.0, 0.0
    for i in range(turns):
        start = time.perf_counter()
        # five sessions in turn, growing histories, checkpointed after every turn
        result = controller.turn(f"s{i % 5}", f"turn {i}: tell me something")
        wall += time.perf_counter() - start
        tools += sum(e.get("seconds", 0.0) for e in result.trace if e["step"] == "act")
    runtime.close()
    inside = thinker.seconds + tools
    return {"profile": profile_name, "turns": turns, "wall_s": round(wall, 3), "model_s": round(thinker.seconds, 3),
            "tools_s": round(tools, 3), "per_turn_ms": round((wall - inside) / turns * 1000, 2),
            "overhead_ratio": round((wall - inside) / wall, 4)}


# --- tool-call validity -------------------------------------------------------------------------

def tool_call_validity(count: int, work_dir: Path) -> dict:
    """Parse rate and right-tool rate of the local backbone's tool calls, constrained decoding on."""
    import jsonschema

    from graphs.signal_parser import parse_message
    from graphs.thinker import system_prompt
    from models.decoding.constrained import ToolCallConstraint
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from tools.expert_tools import ToolContext, build_tools, tool_schemas
    from tools.media_store import MediaStore

    profile = load_profile("local")
    schemas = tool_schemas(build_tools(ToolContext("bench", profile, MediaStore(work_dir / "media"))))
    mm = MMLLM.from_profile(profile)
    constraint_args = dict(force_tool_call=True)
    parsed = right = valid_args = 0
    rows = []
    from agent.proofs.tool_requests import requests

    for item in requests(count, split="heldout", single_only=True):
        request, expected = item["request"], item["calls"][0]["name"]
        chat = [{"role": "system", "content": system_prompt(schemas, [])}, {"role": "user", "content": request}]
        out = mm.generate(chat, max_new_tokens=96,
                          logits_processors=[ToolCallConstraint(mm.backbone.tokenizer, schemas, **constraint_args)])
        message = parse_message(out.text)
        call = message.tool_calls[0] if message.tool_calls else None
        ok_parse = call is not None
        ok_tool = ok_parse and call.name == expected
        ok_args = False
        if ok_parse:
            schema = next(s["parameters"] for s in schemas if s["name"] == call.name)
            try:
                jsonschema.validate(call.arguments, schema)
                ok_args = True
            except jsonschema.ValidationError:
                pass
        parsed += ok_parse
        right += ok_tool
        valid_args += ok_args
        rows.append({"request": request, "expected": expected, "called": call.name if call else None})
    (work_dir / "tool_calls.json").write_text(json.dumps(rows, indent=1))
    return {"prompts": count, "parse_rate": round(parsed / count, 4), "schema_valid_rate": round(valid_args / count, 4),
            "right_tool_rate": round(right / count, 4), "chance_rate": round(1 / len(schemas), 4)}


# --- parallel tools -----------------------------------------------------------------------------


class _Seconds(BaseModel):
    seconds: float


def parallel_tools(work_dir: Path) -> dict:
    """4 independent slow tool calls in one step: wall time of the act phase vs the slowest call."""
    from langchain_core.tools import StructuredTool

    from graphs.controller import Controller
    from graphs.scripted import ScriptedThinker
    from graphs.thinker import ThinkResult
    from tools.media_store import MediaStore

    durations = [0.4, 0.6, 0.8, 1.0]

    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    tools = [StructuredTool.from_function(slow, name=f"slow{i}", description="waits", args_schema=_Seconds)
             for i in range(len(durations))]
    calls = [{"id": f"c{i}", "name": f"slow{i}", "args": {"seconds": d}} for i, d in enumerate(durations)]
    thinker = ScriptedThinker(ThinkResult("", calls), ThinkResult("done"))
    controller = Controller(thinker=thinker, store=MediaStore(work_dir / "parallel-media"),
                            tools_for=lambda s: tools, data_dir=work_dir / "parallel")
    start = time.perf_counter()
    result = controller.turn("p", "run the four")
    wall = time.perf_counter() - start
    controller.close()
    acts = [e for e in result.trace if e["step"] == "act"]
    return {"calls": len(acts), "slowest_s": max(durations), "sum_s": sum(durations), "turn_s": round(wall, 3),
            "ratio_to_slowest": round(wall / max(durations), 3), "ratio_to_sequential": round(wall / sum(durations), 3)}


# --- task plans ----------------------------------------------------------------------------------


class _Wait(BaseModel):
    seconds: float
    after: str = ""  # an earlier task's output, to make the dependency real


def plan_waves() -> dict:
    """4 independent slow tasks and 1 that uses the first one's output: wall time vs critical path."""
    from langchain_core.tools import StructuredTool

    from graphs.plan_runner import PlanRunner
    from graphs.planner import validate_plan

    def wait(seconds: float, after: str = "") -> dict:
        time.sleep(seconds)
        return {"waited": seconds, "after": after}

    tool = StructuredTool.from_function(wait, name="wait", description="waits", args_schema=_Wait)
    independent, dependent = [1.0, 1.0, 1.0, 1.0], 0.5
    raw = [{"id": i, "tool": "wait", "args": {"seconds": s}, "deps": []} for i, s in enumerate(independent, 1)]
    raw.append({"id": 5, "tool": "wait", "args": {"seconds": dependent, "after": "<task-1.waited>"}, "deps": [1]})
    plan = validate_plan(raw, [tool])
    critical = independent[0] + dependent  # the longest chain: task 1 then task 5
    start = time.perf_counter()
    results = PlanRunner([tool]).run(plan)
    wall = time.perf_counter() - start
    assert all(r.status == "ok" for r in results), [r.line() for r in results]
    return {"tasks": len(results), "waves": plan.waves, "wall_s": round(wall, 3), "critical_path_s": critical,
            "sequential_s": sum(independent) + dependent, "ratio_to_critical_path": round(wall / critical, 3)}


def run(out: str, *, turns: int = 50, prompts: int = 120, only: list[str] | None = None) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    results = {}
    jobs = {"parallel": lambda: parallel_tools(work), "overhead": lambda: controller_overhead(turns, work),
            "overhead-local": lambda: controller_overhead(max(turns // 5, 1), work, "local"),
            "validity": lambda: tool_call_validity(prompts, work), "plan": plan_waves}
    for name, job in jobs.items():
        if only and name not in only:
            continue
        work.mkdir(parents=True, exist_ok=True)
        print(f"== {name} ...", flush=True)
        results[name] = job()
        print("   " + json.dumps(results[name]), flush=True)
    lines = ["| benchmark | result | baseline | ratio |", "|---|---|---|---|"]
    for key in ("overhead", "overhead-local"):
        if key in results:
            r = results[key]
            lines.append(f"| controller overhead, {r['turns']} turns ({r['profile']}) | {r['per_turn_ms']} ms a turn "
                         f"outside model and tools | {r['wall_s'] / r['turns'] * 1000:.0f} ms a turn in all | "
                         f"{r['overhead_ratio']:.2%} |")
    if "validity" in results:
        r = results["validity"]
        lines.append(f"| tool calls parse (SmolLM2, constrained, {r['prompts']} prompts) | {r['parse_rate']:.0%} "
                     "| — | — |")
        lines.append(f"| right tool, same prompts | {r['right_tool_rate']:.1%} | {r['chance_rate']:.1%} chance | "
                     f"{r['right_tool_rate'] / r['chance_rate']:.1f}x |")
    if "parallel" in results:
        r = results["parallel"]
        lines.append(f"| 4 slow tools in one step | {r['turn_s']} s | {r['slowest_s']} s slowest, {r['sum_s']} s sum | "
                     f"{r['ratio_to_slowest']}x slowest, {r['ratio_to_sequential']}x sequential |")
    if "plan" in results:
        r = results["plan"]
        lines.append(f"| plan: 4 slow tasks + 1 dependent, {r['waves']} waves | {r['wall_s']} s | "
                     f"{r['critical_path_s']} s critical path, {r['sequential_s']} s sequential | "
                     f"{r['ratio_to_critical_path']}x critical path |")
    table = "\n".join(lines)
    (out_dir / "controller.md").write_text(table + "\n")
    (out_dir / "controller.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)
    return 0
