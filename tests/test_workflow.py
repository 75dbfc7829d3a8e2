"""Scripted workflows (graphs/workflow.py, `signalgraph run` and `runs`).

Workflow files are checked before anything runs; templates and conditions read inputs and
earlier steps; steps are retried and timed out; approval steps wait for a person across
processes; a run killed with SIGKILL at each of its steps resumes without redoing finished ones.

Tools, media store, checkpoints and the tiny models are the real ones. Where a test is about the
runner rather than the model's words (conditions, retries, timeouts, approvals), prompt steps get a
scripted thinker, or a thinker that fails or stalls on purpose, and the test says so.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult
from graphs.workflow import WorkflowRunner
from graphs.workflow_runs import RunLog, WorkflowError, session_of
from graphs.workflow_spec import WorkflowSpecError, load_workflow
from graphs.workflow_templates import EvaluationError, SkippedStepError, condition, evaluate, render
from models.errors import ModelOutputError
from tools.expert_tools import ToolContext, build_tools, tool_schemas
from tools.media_store import MediaStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def write(folder: Path, text: str, name: str = "flow.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def make_runner(tmp_path: Path, profile, thinker=None) -> WorkflowRunner:
    store = MediaStore(tmp_path / "media", allowed_dirs=[EXAMPLES, tmp_path])
    built: dict[str, list] = {}

    def tools_for(session: str) -> list:
        if session not in built:
            built[session] = build_tools(ToolContext(session=session, profile=profile, store=store))
        return built[session]

    return WorkflowRunner(tmp_path / "data", store=store, tools_for=tools_for, thinker=lambda: thinker,
                          tool_timeout=60)


def schemas(runner: WorkflowRunner) -> dict[str, dict]:
    return {s["name"]: s["parameters"] for s in tool_schemas(runner.tools_for("check"))}


def start(runner: WorkflowRunner, folder: Path, text: str, **inputs) -> str:
    path = write(folder, text)
    return runner.create(load_workflow(path, schemas(runner)), path, inputs)


def events(runner: WorkflowRunner, run_id: str) -> list[tuple]:
    return [(e["step"], e["event"], e["attempt"]) for e in runner.log.get(run_id).events]


@pytest.fixture
def runner_for(tmp_path, tiny_profile):
    made = []

    def make(thinker=None) -> WorkflowRunner:
        made.append(make_runner(tmp_path, tiny_profile, thinker))
        return made[-1]

    yield make
    for runner in made:
        runner.close()


# --- checked before anything runs ---------------------------------------------------------------

STEPS = """name: flow
inputs:
  topic: {type: text}
steps:
"""


@pytest.mark.parametrize("steps, message", [
    ("  - {name: summarise, prompt: hi, retries: -1}",
     "flow.yaml: step 'summarise': field 'retries': must be >= 0"),
    ("  - {name: summarise, prompt: hi, timeout: 0}",
     "flow.yaml: step 'summarise': field 'timeout': must be > 0"),
    ("  - {name: look, tool: describe, args: {image: image-1}}",
     "flow.yaml: step 'look': field 'tool': unknown tool 'describe' (available tools: transcribe,"),
    ("  - {name: say, tool: speak, args: {text: hi, voice: joe}}",
     "flow.yaml: step 'say': field 'args.voice': speak takes no argument 'voice' (it takes: text)"),
    ("  - {name: say, tool: speak, args: {}}",
     "flow.yaml: step 'say': field 'args': speak needs 'text'"),
    ("  - {name: summarise, prompt: 'About {{ inputs.topc }}'}",
     "flow.yaml: step 'summarise': field 'prompt': unknown input 'inputs.topc' (inputs: topic)"),
    ("  - {name: a, prompt: '{{ steps.b.text }}'}\n  - {name: b, prompt: hi}",
     "flow.yaml: step 'a': field 'prompt': 'steps.b' runs after this step"),
    ("  - {name: a, prompt: hi}\n  - {name: b, prompt: '{{ steps.c.text }}'}",
     "flow.yaml: step 'b': field 'prompt': unknown step 'steps.c' (earlier steps: a)"),
    ("  - {name: say, tool: speak, args: {text: '{{ steps.say.text }}'}}",
     "flow.yaml: step 'say': field 'args.text': 'steps.say' is this step itself"),
    ("  - {name: a, prompt: hi, when: 'foo > 1'}",
     "flow.yaml: step 'a': field 'when': unknown name 'foo'"),
    ("  - {name: a, prompt: \"{{ __import__('os') }}\"}",
     "flow.yaml: step 'a': field 'prompt': \"__import__('os')\": only len, join, lower, upper can be called"),
    ("  - {name: a, prompt: 'hi {{ inputs.topic'}",
     "flow.yaml: step 'a': field 'prompt': 'hi {{ inputs.topic' has an unmatched"),
    ("  - {name: a, prompt: hi, approval: 'ok?'}",
     "flow.yaml: step 'a': a step needs exactly one of tool, prompt or approval"),
    ("  - {name: a, prompt: hi}\n  - {name: a, prompt: again}",
     "flow.yaml: step 'a': field 'name': another step is already called 'a'"),
    ("  - {name: a, approval: 'ok?', retries: 1}",
     "flow.yaml: step 'a': field 'retries': is not a field this takes"),
    ("  - {name: Bad-Name, prompt: hi}",
     "flow.yaml: step 'Bad-Name': field 'name': must be a lower-case name"),
    ("  - {name: a, prompt: hi}\noutputs:\n  x: '{{ steps.nope.text }}'",
     "flow.yaml: field 'outputs.x': unknown step 'steps.nope' (earlier steps: a)"),
])
def test_a_bad_workflow_is_refused_naming_file_step_and_field(tmp_path, runner_for, steps, message):
    runner = runner_for()
    path = write(tmp_path, STEPS + steps + "\n")
    with pytest.raises(WorkflowSpecError) as caught:
        load_workflow(path, schemas(runner))
    assert message in str(caught.value)


@pytest.mark.parametrize("path", sorted((EXAMPLES / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_workflows_are_valid(path, runner_for):
    spec = load_workflow(path, schemas(runner_for()))
    assert spec.steps and spec.outputs


def test_the_shipped_workflows_include_an_approval():
    texts = [p.read_text() for p in (EXAMPLES / "workflows").glob("*.yaml")]
    assert len(texts) >= 3 and any("approval:" in text for text in texts)


def test_a_tool_the_config_does_not_allow_is_named_as_such(tmp_path, runner_for):
    runner = runner_for()
    path = write(tmp_path, STEPS + "  - {name: say, tool: speak, args: {text: hi}}\n")
    allowed = {name: schema for name, schema in schemas(runner).items() if name != "speak"}
    with pytest.raises(WorkflowSpecError, match="step 'say': field 'tool': the tool 'speak' is not allowed"):
        load_workflow(path, allowed)


def test_inputs_are_checked_and_media_inputs_become_ids(tmp_path, runner_for):
    runner = runner_for()
    text = ("name: memo\ninputs:\n  memo: {type: audio, default: question.wav}\n  n: {type: number}\n"
            "steps:\n  - {name: a, prompt: 'x'}\n")
    data = tmp_path / "question.wav"
    data.write_bytes((EXAMPLES / "data" / "question.wav").read_bytes())
    with pytest.raises(WorkflowSpecError, match=r"give --input n=\.\.\."):
        start(runner, tmp_path, text)
    with pytest.raises(WorkflowSpecError, match="input 'n': 'many' is not a number"):
        start(runner, tmp_path, text, n="many")
    with pytest.raises(WorkflowSpecError, match="unknown input 'colour'"):
        start(runner, tmp_path, text, n="2", colour="red")
    with pytest.raises(WorkflowError, match="input 'memo': .*outside"):
        start(runner, tmp_path, text, n="2", memo="/etc/hostname")
    assert runner.log.list() == []  # nothing was created by the refused starts
    run_id = start(runner, tmp_path, text, n="2")
    run = runner.log.get(run_id)
    assert run.inputs == {"memo": "audio-1", "n": 2}
    assert runner.store.get(session_of(run_id), "audio-1").kind == "audio"


# --- templates and conditions -------------------------------------------------------------------

SCOPE = {"inputs": {"topic": "cats", "n": 2},
         "steps": {"look": {"labels": [{"label": "tabby", "score": 0.5}, {"label": "tiger cat", "score": 0.3}]},
                   "skipped": None}}


@pytest.mark.parametrize("template, value", [
    ("{{ inputs.n }}", 2),  # a template that is one expression keeps its type
    ("n={{ inputs.n }}", "n=2"),
    ("{{ steps.look.labels.label }}", ["tabby", "tiger cat"]),  # a field of a list of records
    ("Seen: {{ join(steps.look.labels.label, ', ') }}.", "Seen: tabby, tiger cat."),
    ("{{ steps.look.labels[-1].label }}", "tiger cat"),
    ("{{ steps.look['labels'][0]['score'] }}", 0.5),
    ({"query": ["{{ upper(inputs.topic) }}", 3]}, {"query": ["CATS", 3]}),
    ("{{ steps.look.labels[0] }} and {{ steps.skipped }}", '{"label": "tabby", "score": 0.5} and null'),
])
def test_templates_fill_in_inputs_and_earlier_steps(template, value):
    assert render(template, SCOPE) == value


@pytest.mark.parametrize("template, error, message", [
    ("{{ steps.look.labels[5] }}", EvaluationError, "steps.look.labels has 2 items, so [5] is out of range"),
    ("{{ steps.look.colour }}", EvaluationError, "steps.look has no field 'colour' (it has: labels)"),
    ("{{ steps.skipped.text }}", SkippedStepError, "step 'skipped' was skipped, so steps.skipped has no fields"),
    ("{{ lower(inputs.n) }}", EvaluationError, "lower needs text, not a number"),
])
def test_a_template_that_cannot_be_filled_in_says_why(template, error, message):
    with pytest.raises(error) as caught:
        render(template, SCOPE)
    assert message in str(caught.value)


@pytest.mark.parametrize("text, expected", [
    ("len(steps.look.labels) > 1 and steps.look.labels[0].score >= 0.5", True),
    ("'tabby' in steps.look.labels.label", True),
    ("{{ not steps.skipped }}", True),  # a condition may be written as a template too
    ("inputs.topic == 'dogs' or inputs.n < 0", False),
])
def test_conditions(text, expected):
    assert evaluate(condition(text), SCOPE) is expected


def test_a_false_condition_skips_a_step_and_later_steps_can_see_it(tmp_path, runner_for):
    """About routing, so the backbone is scripted."""
    thinker = ScriptedThinker(ThinkResult("hello"), ThinkResult("hello again"))
    runner = runner_for(thinker)
    run_id = start(runner, tmp_path, """name: cond
inputs:
  loud: {type: boolean, default: false}
steps:
  - {name: draft, prompt: Say something}
  - {name: shout, prompt: "Shout {{ steps.draft.text }}", when: inputs.loud}
  - {name: after, prompt: "{{ steps.draft.text }} once more", when: not steps.shout}
outputs:
  shout: "{{ steps.shout.text }}"
  after: "{{ steps.after.text }}"
""")
    run = runner.execute(run_id)
    assert run.state == "done"
    assert run.outputs == {"shout": None, "after": "hello again"}
    assert [m["messages"][0].content for m in thinker.seen] == ["Say something", "hello once more"]
    assert ("shout", "skipped", None) in events(runner, run_id)


# --- retries and timeouts ------------------------------------------------------------------------


class FlakyThinker:
    """Fails the calls numbered in `fail_on` the way a backbone can (a test double: the retries are under test)."""

    def __init__(self, *fail_on: int):
        self.fail_on = set(fail_on)
        self.calls = 0

    def think(self, messages, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise ModelOutputError(f"unreadable output on call {self.calls}")
        return ThinkResult(f"answer on call {self.calls}")


class StalledThinker:
    """Takes longer than any timeout below (a test double: the timeout is under test)."""

    def think(self, messages, **kwargs):
        time.sleep(2)
        return ThinkResult("too late")


def test_a_step_is_retried_until_it_succeeds(tmp_path, runner_for):
    runner = runner_for(FlakyThinker(1, 2))
    run_id = start(runner, tmp_path, "name: flaky\nsteps:\n  - {name: ask, prompt: hi, retries: 2, retry_delay: 0}\n"
                                     "outputs: {text: '{{ steps.ask.text }}'}\n")
    run = runner.execute(run_id)
    assert run.state == "done" and run.outputs == {"text": "answer on call 3"}
    assert events(runner, run_id) == [("ask", "started", 1), ("ask", "failed", 1), ("ask", "started", 2),
                                      ("ask", "failed", 2), ("ask", "started", 3), ("ask", "finished", 3)]


def test_a_failed_run_says_why_and_resumes_at_the_failed_step(tmp_path, runner_for):
    thinker = FlakyThinker(1, 2, 4)  # first fails twice then succeeds; second fails once
    runner = runner_for(thinker)
    run_id = start(runner, tmp_path, "name: flaky\nsteps:\n  - {name: first, prompt: hi, retries: 2, retry_delay: 0}\n"
                                     "  - {name: second, prompt: hi}\n  - {name: third, prompt: hi}\n")
    run = runner.execute(run_id)
    assert run.state == "failed" and run.step == "second"
    assert run.error == "step 'second' failed: unreadable output on call 4"
    assert runner.log.list()[0].state == "failed"
    run = runner.execute(run_id)  # resuming runs the failed step again, not the finished one
    assert run.state == "done"
    assert [e for e in events(runner, run_id) if e[0] == "first"][-1] == ("first", "finished", 3)
    assert thinker.calls == 6


def test_a_real_tool_error_is_retried_then_reported(tmp_path, runner_for):
    runner = runner_for()
    run_id = start(runner, tmp_path, "name: deaf\nsteps:\n  - name: words\n    tool: transcribe\n"
                                     "    args: {audio: audio-9}\n    retries: 1\n    retry_delay: 0\n")
    run = runner.execute(run_id)
    assert run.state == "failed"
    assert "step 'words' failed: transcribe: there is no audio or video with id 'audio-9'" in run.error
    assert run.error.endswith("(after 2 attempts)")


def test_a_step_that_takes_too_long_times_out(tmp_path, runner_for):
    runner = runner_for(StalledThinker())
    run_id = start(runner, tmp_path, "name: slow\nsteps:\n"
                                     "  - {name: ask, prompt: hi, timeout: 0.1, retries: 1, retry_delay: 0}\n")
    started = time.perf_counter()
    run = runner.execute(run_id)
    assert time.perf_counter() - started < 1.5
    assert run.state == "failed"
    assert run.error == "step 'ask' failed: did not finish within 0.1 s (after 2 attempts)"


# --- approvals -----------------------------------------------------------------------------------

PUBLISH = """name: publish
steps:
  - {name: draft, prompt: Draft a note}
  - {name: review, approval: "Publish '{{ steps.draft.text }}'?"}
  - {name: final, prompt: "Polish {{ steps.draft.text }}"}
outputs:
  final: "{{ steps.final.text }}"
  approved: "{{ steps.review.approved }}"
"""


def test_an_approved_run_goes_on_without_redoing_earlier_steps(tmp_path, runner_for):
    """About the graph's pause and resume, so the backbone is scripted (it fails if asked a third time)."""
    thinker = ScriptedThinker(ThinkResult("Lunch at noon"), ThinkResult("Lunch is at noon."))
    runner = runner_for(thinker)
    run_id = start(runner, tmp_path, PUBLISH)
    run = runner.execute(run_id)
    assert (run.state, run.step, run.question) == ("waiting for approval", "review", "Publish 'Lunch at noon'?")
    with pytest.raises(WorkflowError, match="waiting for approval at step 'review'.*--approve"):
        runner.execute(run_id)
    run = runner.execute(run_id, answer=True)
    assert run.state == "done"
    assert run.outputs == {"final": "Lunch is at noon.", "approved": True}
    assert [m["messages"][0].content for m in thinker.seen] == ["Draft a note", "Polish Lunch at noon"]


def test_a_rejected_run_stops_at_the_approval(tmp_path, runner_for):
    runner = runner_for(ScriptedThinker(ThinkResult("Lunch at noon")))
    run_id = start(runner, tmp_path, PUBLISH)
    runner.execute(run_id)
    run = runner.execute(run_id, answer=False)
    assert (run.state, run.step) == ("rejected", "review")
    assert ("final", "started", 1) not in events(runner, run_id)
    with pytest.raises(WorkflowError, match="is rejected; there is nothing to approve"):
        runner.execute(run_id, answer=True)


def test_a_run_that_another_live_process_runs_is_not_run_twice(tmp_path, runner_for):
    import psutil

    runner = runner_for(ScriptedThinker(ThinkResult("hi")))
    run_id = start(runner, tmp_path, "name: once\nsteps:\n  - {name: a, prompt: hi}\n")
    parent = psutil.Process().parent()  # alive for as long as this test runs
    runner.log.update(run_id, status="running", pid=parent.pid, pid_started=parent.create_time())
    assert runner.log.get(run_id).state == "running"
    with pytest.raises(WorkflowError, match=f"run '{run_id}' is running in process {parent.pid}"):
        runner.execute(run_id)
    runner.log.update(run_id, pid_started=parent.create_time() - 60)  # that pid, but another process
    assert runner.log.get(run_id).state == "interrupted"
    assert runner.execute(run_id).state == "done"


# --- the command line: real processes -----------------------------------------------------------


def cli(config: Path, *args: str, wait: bool = True, out: Path | None = None):
    command = [sys.executable, "-m", "agent.cli.main", "--config", str(config), *args]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=out.open("w"), stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def config_file(tmp_path: Path, **extra) -> Path:
    lines = ["profile: tiny", f"data_dir: {tmp_path / 'data'}", f"allowed_dirs: [{EXAMPLES}, {tmp_path}]"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return write(tmp_path, "\n".join(lines) + "\n", "signalgraph.yaml")


def test_approval_across_processes_and_the_runs_listing(tmp_path):
    config = config_file(tmp_path)
    flow = write(tmp_path, """name: ask
inputs:
  topic: {type: text}
steps:
  - {name: ok, approval: "Go ahead with {{ inputs.topic }}?"}
outputs:
  topic: "{{ upper(inputs.topic) }}"
  approved: "{{ steps.ok.approved }}"
""")
    first = cli(config, "run", str(flow), "--input", "topic=lunch")
    assert first.returncode == 0, first.stderr
    run_id = first.stdout.splitlines()[0].removeprefix("run ")
    assert "waiting for approval at step 'ok':\n  Go ahead with lunch?" in first.stdout
    second = cli(config, "run", str(flow), "--input", "topic=tea")
    other = second.stdout.splitlines()[0].removeprefix("run ")

    listing = cli(config, "runs")
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "waiting for approval  ok" in rows[run_id] and "waiting for approval  ok" in rows[other]

    approved = cli(config, "run", "--resume", run_id, "--approve")
    assert approved.returncode == 0, approved.stderr
    assert "  topic: LUNCH\n  approved: true" in approved.stdout
    rejected = cli(config, "run", "--resume", other, "--reject")
    assert "rejected at step 'ok'" in rejected.stdout
    states = {r["id"]: (r["state"], r["step"]) for r in json.loads(cli(config, "runs", "--json").stdout)}
    assert states == {run_id: ("done", None), other: ("rejected", "ok")}

    again = cli(config, "run", "--resume", run_id, "--approve")
    assert again.returncode == 2 and again.stderr.startswith("error: run") and "Traceback" not in again.stderr


def test_a_bad_workflow_is_one_line_of_error_and_creates_no_run(tmp_path):
    config = config_file(tmp_path)
    flow = write(tmp_path, "name: bad\nsteps:\n  - {name: summarise, prompt: hi, retries: -1}\n", "bad.yaml")
    result = cli(config, "run", str(flow))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: bad.yaml: step 'summarise': field 'retries': must be >= 0"
    assert "no workflow runs yet" in cli(config, "runs").stdout


# Four steps, each slow enough on the tiny models to be killed in the middle: the image and audio
# generators and the backbone load on their first use in each process, and the backbone writes
# up to 1200 tokens.
FOUR = """name: four
inputs:
  subject: {type: text, default: a red kite}
steps:
  - name: draw
    tool: generate_image
    args: {prompt: "{{ inputs.subject }}", seed: 7}
  - name: idea
    prompt: "Describe a sound that fits {{ inputs.subject }}."
  - name: sound
    tool: generate_audio
    args: {prompt: "{{ inputs.subject }} {{ steps.idea.text }}", seconds: 0.5, seed: 3}
  - name: caption
    prompt: "Write a caption for {{ steps.draw.image }} with {{ steps.sound.audio }}."
outputs:
  image: "{{ steps.draw.image }}"
  idea: "{{ steps.idea.text }}"
  audio: "{{ steps.sound.audio }}"
  caption: "{{ steps.caption.text }}"
"""
ORDER = ["draw", "idea", "sound", "caption"]


def _events(db: Path, run_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT step, event FROM events WHERE run_id=? ORDER BY rowid", (run_id,)).fetchall()


def _wait_for(predicate, process: subprocess.Popen, log: Path, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert process.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def _media_digests(store: MediaStore, run_id: str, outputs: dict) -> dict:
    return {name: hashlib.sha256(store.get(session_of(run_id), outputs[name]).path.read_bytes()).hexdigest()
            for name in ("image", "audio")}


def test_a_run_killed_at_each_step_resumes_without_redoing_finished_steps(tmp_path, tiny_profile):
    from agent.config import AgentConfig
    from agent.runtime import Runtime

    config = config_file(tmp_path, max_new_tokens=1200)
    flow = write(tmp_path, FOUR)
    db = tmp_path / "data" / "workflows.sqlite"

    # the reference: the same workflow, uninterrupted, in this process
    runtime = Runtime(AgentConfig(profile="tiny", data_dir=tmp_path / "reference", allowed_dirs=[tmp_path],
                                  max_new_tokens=1200), tiny_profile)
    reference = WorkflowRunner(runtime.data_dir, store=runtime.store, tools_for=runtime.tools,
                               thinker=lambda: runtime.thinker)
    spec = load_workflow(flow, schemas(reference))
    expected = reference.execute(reference.create(spec, flow, {}))
    assert expected.state == "done"
    expected_media = _media_digests(runtime.store, expected.id, expected.outputs)
    reference.close()

    log = tmp_path / "run-1.log"
    process = cli(config, "run", str(flow), wait=False, out=log)
    run_id = _wait_for(lambda: log.read_text().startswith("run ") and log.read_text().split()[1], process, log)
    runs = RunLog(db)
    for number, step in enumerate(ORDER, start=1):
        # this process redoes the step the last one was killed in, then starts `step`: kill it there
        _wait_for(lambda: (step, "started") in _events(db, run_id), process, log)
        assert runs.get(run_id).state == "running"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert (step, "finished") not in _events(db, run_id), f"{step} ended before the kill landed"
        killed = runs.get(run_id)
        assert (killed.state, killed.step) == ("interrupted", step)
        log = tmp_path / f"run-{number + 1}.log"
        process = cli(config, "run", "--resume", run_id, wait=False, out=log)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]

    final = runs.get(run_id)
    runs.close()
    assert final.state == "done"
    assert final.outputs == expected.outputs
    seen = _events(db, run_id)
    for step in ORDER:
        assert seen.count((step, "finished")) == 1
        assert seen.count((step, "started")) == 2  # the attempt that was killed, and the one after it
        assert (step, "started") not in seen[seen.index((step, "finished")):]  # never again once finished
    # the media ids in the checkpointed outputs still name the same files after four restarts
    store = MediaStore(tmp_path / "data" / "media", allowed_dirs=[tmp_path])
    assert _media_digests(store, run_id, final.outputs) == expected_media
