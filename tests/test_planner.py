"""Task plans: validation and repair, references filled in at run time, dependency waves run in
parallel, failures that stop only their dependents, and the tiny backbone writing plans that parse.

The tools here are real LangChain StructuredTools: the session's expert tools (for their argument
schemas) and small workloads that sleep, record or fail on purpose.
"""

import json
import subprocess
import sys
import threading
import time

import jsonschema
import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field

from graphs.plan_runner import PlanRunner, fill_references, report
from graphs.planner import PLAN_TOOL, PlanError, make_plan, plan_schema, plan_tool, validate_plan
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult
from tools.expert_tools import ToolContext, build_tools, tool_schemas
from tools.media_store import MediaStore


@pytest.fixture
def expert_tools(tiny_profile, tmp_path):
    return build_tools(ToolContext("plan-test", tiny_profile, MediaStore(tmp_path / "media")))


class _WaitArgs(BaseModel):
    seconds: float = Field(ge=0)
    note: str = ""


class _EchoArgs(BaseModel):
    text: str


def workload_tools(log: list | None = None):
    """wait (sleeps, returns what it waited), echo (upper-cases; 'boom' is a handled tool error),
    crash (a tool's own bug: an exception the tool does not handle)."""
    lock = threading.Lock()

    def wait(seconds: float, note: str = "") -> dict:
        time.sleep(seconds)
        with lock:
            (log if log is not None else []).append(note)
        return {"waited": seconds, "note": note, "labels": ["cat", "dog"]}

    def echo(text: str) -> str:
        if text == "boom":
            raise ToolException("echo refused 'boom'")
        return text.upper()

    def crash(text: str) -> str:
        raise RuntimeError(f"crashed on {text}")

    return [StructuredTool.from_function(wait, name="wait", description="waits", args_schema=_WaitArgs),
            StructuredTool.from_function(echo, name="echo", description="echoes", args_schema=_EchoArgs,
                                         handle_tool_error=True),
            StructuredTool.from_function(crash, name="crash", description="crashes", args_schema=_EchoArgs)]


def task(id, tool, args=None, deps=()):
    return {"id": id, "tool": tool, "args": args or {}, "deps": list(deps)}


# --- repairs --------------------------------------------------------------------------------------

def test_tool_names_off_by_case_underscore_or_hyphen_map_to_the_real_tool(expert_tools):
    plan = validate_plan([task(1, "Describe-Image", {"image": "image-1"}), task(2, "SPEAK", {"text": "hi"}),
                          task(3, "generate image", {"prompt": "a cat"})], expert_tools)
    assert [t.tool for t in plan.tasks] == ["describe_image", "speak", "generate_image"]
    assert "task 1: tool 'Describe-Image' read as 'describe_image'" in plan.repairs
    assert len(plan.repairs) == 3


def test_a_reference_to_an_output_implies_a_dependency(expert_tools):
    plan = validate_plan({"tasks": [task(1, "generate_image", {"prompt": "a cat"}),
                                    task(2, "describe_image", {"image": "<task-1.image>"})]}, expert_tools)
    second = plan.tasks[1]
    assert second.deps == (1,) and second.wave == 2
    assert plan.repairs == ("task 2: now depends on task 1, whose output <task-1.image> it uses",)


def test_repeated_self_and_spelled_out_dependencies_are_tidied(expert_tools):
    plan = validate_plan([task("task-1", "speak", {"text": "a"}),
                          task(2, "speak", {"text": "b"}, deps=[1, "1", "task-1", 2])], expert_tools)
    assert plan.tasks[1].deps == (1,)
    assert "task 2: repeated dependency on task 1 dropped" in plan.repairs
    assert "task 2: dependency on itself dropped" in plan.repairs
    assert "task 1: id 'task-1' read as 1" in plan.repairs


def test_waves_follow_the_longest_chain_of_dependencies(expert_tools):
    plan = validate_plan([task(3, "speak", {"text": "<task-2.text>"}), task(1, "speak", {"text": "a"}),
                          task(2, "transcribe", {"audio": "<task-1.audio>"}), task(4, "speak", {"text": "d"})],
                         expert_tools)
    assert [(t.id, t.wave) for t in plan.tasks] == [(1, 1), (4, 1), (2, 2), (3, 3)]
    assert plan.waves == 3


# --- problems that have no one reading ------------------------------------------------------------

@pytest.mark.parametrize("tasks, problem", [
    ([task(1, "paint", {"prompt": "x"})], "task 1: there is no tool 'paint'; available: transcribe, speak"),
    ([task(1, "speak", {"text": "a"}, deps=[7])], "task 1 depends on task 7, which is not in the plan"),
    ([task(1, "speak", {"text": "a"}, deps=[2]), task(2, "speak", {"text": "b"}, deps=[1])],
     "tasks wait on each other in a circle: task 1 -> task 2 -> task 1"),
    ([task(1, "describe_image", {"image": "<task-4.image>"})], "task 1 uses <task-4.image>, but there is no task 4"),
    ([task(1, "speak", {"text": "again: <task-1.text>"})], "task 1 uses its own output <task-1.text>"),
    ([task(1, "describe_image", {"image": "cat.png"})], "task 1: describe_image argument image: String should match"),
    ([task(1, "describe_image", {"image": "image-1", "top_k": 50})], "top_k: Input should be less than or equal to 10"),
    ([task(1, "speak", {})], "task 1: speak argument text: Field required"),
    ([task(1, "speak", {"text": "a", "voice": "x"})], "speak argument voice: Extra inputs are not permitted"),
    ([task(1, "speak", {"text": "a"}), task(1, "speak", {"text": "b"})], "task id 1 is used by 2 tasks"),
    ([task(1, "speak", "hello")], "task 1: args must be an object, got str"),
    ([task(0, "speak", {"text": "a"})], "task #1: id must be a positive whole number, got 0"),
    ([{"id": 1, "tool": "speak", "args": {"text": "a"}, "after": [2]}], "task 1: unknown field 'after'"),
    ([], "a plan needs a non-empty list of tasks"),
])
def test_each_kind_of_problem_is_named(expert_tools, tasks, problem):
    with pytest.raises(PlanError) as caught:
        validate_plan(tasks, expert_tools)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_an_unrepairable_plan_lists_every_problem_at_once(expert_tools):
    tasks = [task(1, "paint", {"prompt": "x"}), task(2, "describe_image", {"image": "cat.png"}, deps=[9]),
             task(3, "speak", {"text": "<task-8.text>"}, deps=[4]), task(4, "speak", {"text": "a"}, deps=[3]),
             "not a task"]
    with pytest.raises(PlanError) as caught:
        validate_plan(tasks, expert_tools)
    problems = caught.value.problems
    assert len(problems) == 6, problems
    message = str(caught.value)
    assert message.startswith("the plan cannot run (6 problems): 1) ")
    for expected in ("no tool 'paint'", "image: String should match", "depends on task 9",
                     "there is no task 8", "task 3 -> task 4 -> task 3", "task #5 is not an object"):
        assert expected in message


def test_arguments_that_hold_references_are_left_for_run_time(expert_tools):
    """`<task-1.image>` does not match image-N; it is checked once filled in."""
    plan = validate_plan([task(1, "generate_image", {"prompt": "a cat"}),
                          task(2, "describe_image", {"image": "<task-1.image>", "top_k": 2}, deps=[1])], expert_tools)
    assert plan.tasks[1].args == {"image": "<task-1.image>", "top_k": 2}


# --- the schema the backbone writes under ---------------------------------------------------------

def test_the_plan_schema_takes_references_and_refuses_unknown_tools_and_paths(expert_tools):
    schema = plan_schema(tool_schemas(expert_tools))
    good = {"tasks": [task(1, "generate_image", {"prompt": "a cat"}),
                      task(2, "describe_image", {"image": "<task-1.image>"}, deps=[1])]}
    jsonschema.validate(good, schema)
    for bad in ([task(1, "paint", {"prompt": "a cat"})], [task(1, "describe_image", {"image": "cat.png"})],
                [task(1, "speak", {"text": "hi", "loud": True})], [task(9, "speak", {"text": "hi"})]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"tasks": bad}, schema)


def test_make_plan_asks_for_one_plan_call_and_validates_it(expert_tools):
    written = {"tasks": [task(1, "speak", {"text": "hello"}), task(2, "transcribe", {"audio": "<task-1.audio>"})]}
    thinker = ScriptedThinker(ThinkResult("", [{"id": "c1", "name": PLAN_TOOL, "args": written}]))
    plan = make_plan(thinker, "say hello, then write down what was said", expert_tools)
    assert [t.id for t in plan.tasks] == [1, 2] and plan.tasks[1].deps == (1,)
    seen = thinker.seen[0]
    assert seen["tools"] == [PLAN_TOOL] and seen["require_tool"] is True
    assert "transcribe(audio)" in seen["messages"][0].content  # the planner prompt lists the real tools


def test_no_plan_written_is_a_plan_error(expert_tools):
    thinker = ScriptedThinker(ThinkResult("I would rather chat.", []))
    with pytest.raises(PlanError, match="the backbone wrote no plan \\(it wrote 'I would rather chat.'\\)"):
        make_plan(thinker, "anything", expert_tools)


def test_the_tiny_backbone_always_writes_a_plan_that_parses(tiny_profile, expert_tools):
    """Random weights, constrained decoding: whatever the model picks, the plan is JSON in the schema."""
    from graphs.planner import PLAN_MAX_NEW_TOKENS
    from graphs.thinker import BackboneThinker, ConditioningCache
    from models.mmllm import MMLLM

    thinker = BackboneThinker(MMLLM.from_profile(tiny_profile, require_trained=False), ConditioningCache(),
                              max_new_tokens=PLAN_MAX_NEW_TOKENS)
    schemas = tool_schemas(expert_tools)
    for request in ("draw a cat, then say what the drawing shows", "transcribe audio-1"):
        result = thinker.think([HumanMessage(content=request)], tools=[plan_tool(schemas)], passages=[],
                               media=[], require_tool=True)
        assert result.malformed == []
        calls = [c for c in result.tool_calls if c["name"] == PLAN_TOOL]
        assert calls, result.raw[-300:]
        jsonschema.validate(calls[0]["args"], plan_schema(schemas))
        try:
            validate_plan(calls[0]["args"], expert_tools)
        except PlanError as exc:  # a random plan may be wrong; it must be wrong in words
            assert exc.problems


# --- running --------------------------------------------------------------------------------------

def test_references_are_filled_in_when_the_task_runs():
    outputs = {1: {"image": "image-3", "labels": ["cat", "dog"], "seconds": 1.5}, 2: "plain text"}
    assert fill_references("<task-1.seconds>", outputs) == 1.5  # a whole reference keeps its type
    assert fill_references({"text": "saw <task-1.labels> in <task-1.image>"}, outputs) == \
        {"text": 'saw ["cat", "dog"] in image-3'}
    assert fill_references(["<task-2>"], outputs) == ["plain text"]


def test_outputs_flow_between_tasks_and_strings_get_text():
    tools = workload_tools()
    plan = validate_plan([task(1, "wait", {"seconds": 0, "note": "first"}),
                          task(2, "echo", {"text": "<task-1.labels>"}),
                          task(3, "echo", {"text": "note was <task-1.note>"}),
                          task(4, "wait", {"seconds": "<task-1.waited>"})], tools)
    results = {r.id: r for r in PlanRunner(tools).run(plan)}
    assert results[2].args == {"text": '["cat", "dog"]'}  # a list given to a string argument, as text
    assert results[3].output == "NOTE WAS FIRST"
    assert results[4].args == {"seconds": 0} and results[4].status == "ok"


def test_a_missing_output_field_fails_the_task_and_names_the_fields():
    tools = workload_tools()
    plan = validate_plan([task(1, "wait", {"seconds": 0}), task(2, "echo", {"text": "<task-1.image>"})], tools)
    second = PlanRunner(tools).run(plan)[1]
    assert second.status == "failed"
    assert second.error == "task 1 returned no 'image' (its fields: waited, note, labels)"


def test_tasks_of_one_wave_run_at_the_same_time():
    tools = workload_tools()
    plan = validate_plan([task(i, "wait", {"seconds": 0.3}) for i in (1, 2, 3)]
                         + [task(4, "echo", {"text": "after <task-2.waited>"})], tools)
    results = {r.id: r for r in PlanRunner(tools).run(plan)}
    first_wave = [results[i] for i in (1, 2, 3)]
    # every task of the wave started before any of them ended: they overlapped
    assert max(r.started for r in first_wave) < min(r.ended for r in first_wave)
    assert results[4].wave == 2 and results[4].started >= max(r.ended for r in first_wave)


def test_a_failed_task_stops_only_what_depends_on_it():
    log: list = []
    tools = workload_tools(log)
    plan = validate_plan([task(1, "wait", {"seconds": 0, "note": "one"}),
                          task(2, "echo", {"text": "boom"}),
                          task(3, "echo", {"text": "after <task-2>"}),
                          task(4, "wait", {"seconds": 0, "note": "four"}, deps=[3]),
                          task(5, "wait", {"seconds": 0, "note": "five"}, deps=[1]),
                          task(6, "crash", {"text": "x"}),
                          task(7, "echo", {"text": "<task-6>"})], tools)
    heard = []
    results = {r.id: r for r in PlanRunner(tools).run(plan, on_result=lambda r: heard.append(r.id))}
    assert {i: r.status for i, r in results.items()} == {1: "ok", 2: "failed", 3: "skipped", 4: "skipped",
                                                         5: "ok", 6: "failed", 7: "skipped"}
    assert results[2].error == "echo refused 'boom'"
    assert results[3].error == "skipped: task-2 failed" and results[4].error == "skipped: task-2 failed"
    assert results[6].error == "RuntimeError: crashed on x" and results[7].error == "skipped: task-6 failed"
    assert sorted(log) == ["five", "one"] and sorted(heard) == list(range(1, 8))
    answer = report(list(results.values()))
    assert answer.splitlines()[0] == "7 tasks: 2 ok, 2 failed, 3 skipped"
    assert "task 3 echo: skipped: task-2 failed" in answer and "task 2 echo: failed: echo refused 'boom'" in answer


def test_expert_tool_errors_come_back_as_the_tasks_error(expert_tools):
    """transcribe of an id the session does not have: the tool's own message, not a crash."""
    plan = validate_plan([task(1, "transcribe", {"audio": "audio-7"})], expert_tools)
    (result,) = PlanRunner(expert_tools).run(plan)
    assert result.status == "failed" and "audio-7" in result.error


# --- the command ----------------------------------------------------------------------------------

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**__import__("os").environ,
                                        "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})


def test_plan_command_plans_runs_and_reports_on_the_tiny_profile(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    (tmp_path / "signalgraph.yaml").write_text(f"data_dir: {tmp_path / 'data'}\nallowed_dirs: [{tmp_path}]\n")
    done = _cli("--profile", "tiny", "plan", "describe the picture", "--image", str(tmp_path / "red.png"), "--json",
                cwd=tmp_path)
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
    out = json.loads(done.stdout)
    assert out["request"] == "describe the picture"
    if "problems" in out:  # random weights may plan wrongly: then every problem is listed
        assert out["problems"] and done.stderr.splitlines()[-1].startswith("error: the plan cannot run")
    else:
        assert out["media"] == ["image-1"]
        assert [r["id"] for r in out["results"]] == [t["id"] for t in out["plan"]["tasks"]]


def test_plan_command_user_errors_are_one_line(tmp_path):
    (tmp_path / "signalgraph.yaml").write_text(f"data_dir: {tmp_path / 'data'}\nallowed_dirs: [{tmp_path}]\n")
    done = _cli("--profile", "tiny", "plan", "describe it", "--image", str(tmp_path / "missing.png"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("error:") and "missing.png" in done.stderr
