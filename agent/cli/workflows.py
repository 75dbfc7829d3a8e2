"""`signalgraph run` and `signalgraph runs`: scripted workflows that resume after a crash."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from agent.config import AgentConfig, load_config
from models.errors import ConfigError, SignalgraphError

# tools are checked against the config's default allowlist: a run's session has no list of its own yet
CHECK_SESSION = "workflows"
_MEDIA_ID = re.compile(r"^(image|audio|video)-[1-9][0-9]*$")


def _profile_ref(profile: str | None) -> str:
    """The profile as the run records it: a name, or an absolute path to a profile file."""
    profile = profile or os.environ.get("SIGNALGRAPH_PROFILE") or "local"
    path = Path(profile).expanduser()
    return str(path.resolve()) if path.suffix in (".yaml", ".yml") else profile


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--input {item!r}: write it as KEY=VALUE, e.g. --input topic=offsite")
        pairs[key.strip()] = value
    return pairs


def _log(config: AgentConfig):
    from graphs.workflow_runs import PgRunLog, RunLog
    from tools.database import Database, database_url

    url = database_url(config.database)
    if url is None:
        return RunLog(Path(config.data_dir).expanduser() / "workflows.sqlite")
    database = Database(url)
    database.check()
    return PgRunLog(database)


def run(args) -> int:
    config = load_config(args.config)
    if (args.workflow is None) == (args.resume is None):
        raise ConfigError("give a workflow file to start a run, or --resume RUN_ID to continue one (not both)")
    if args.resume is None and (args.approve or args.reject):
        raise ConfigError("--approve and --reject answer a run that waits for approval: use them with --resume RUN_ID")
    if args.resume is not None and args.input:
        raise ConfigError("--input goes with a workflow file; a resumed run keeps the inputs it started with")
    if args.resume is not None:
        log = _log(config)
        try:
            recorded = log.get(args.resume).profile
        finally:
            log.close()
        if args.profile and _profile_ref(args.profile) != recorded:
            raise ConfigError(f"run {args.resume!r} was started with profile {recorded!r}; resume it with that "
                              "profile (or without --profile)")
        config.profile = recorded
    else:
        config.profile = _profile_ref(args.profile or config.profile)

    from agent.runtime import Runtime
    from graphs.workflow import WorkflowRunner
    from graphs.workflow_spec import load_workflow
    from tools.expert_tools import tool_schemas

    runtime = Runtime(config)
    runner = WorkflowRunner(runtime.data_dir, store=runtime.store, tools_for=runtime.tools,
                            thinker=lambda: runtime.thinker, tool_timeout=config.tool_timeout,
                            database=runtime.database)
    try:
        if args.resume is None:
            schemas = {s["name"]: s["parameters"] for s in tool_schemas(runtime.tools(CHECK_SESSION))}
            spec = load_workflow(Path(args.workflow), schemas)
            run_id = runner.create(spec, Path(args.workflow), _pairs(args.input), profile=config.profile)
            print(f"run {run_id}", flush=True)
        else:
            run_id = args.resume
        answer = True if args.approve else False if args.reject else None
        return _execute(runner, run_id, answer)
    finally:
        runner.close()
        runtime.close()


def _execute(runner, run_id: str, answer: bool | None) -> int:
    from tqdm import tqdm

    from graphs.workflow_spec import WorkflowSpec

    before = runner.log.get(run_id)
    steps = WorkflowSpec.model_validate(before.spec).steps
    settled = {e["step"] for e in before.events if e["event"] in ("finished", "skipped", "approved", "rejected")}
    bar = None

    def on_event(step: str, event: str, attempt: int | None, detail: str) -> None:
        nonlocal bar
        if bar is None:  # opened at the first step, after the run has passed its checks
            if settled:
                print(f"resuming {run_id} after {len(settled)} of {len(steps)} steps", flush=True)
            bar = tqdm(total=len(steps), initial=len(settled), unit="step", desc=run_id, leave=False)
        if event == "started":
            bar.set_postfix_str(step if attempt == 1 else f"{step} (attempt {attempt})")
        elif event == "failed":
            bar.write(f"  {step}: attempt {attempt} failed: {detail}")
        elif event in ("finished", "skipped", "approved", "rejected"):
            bar.write(f"  {step}: {event}")
            bar.update()

    started = time.perf_counter()
    try:
        info = runner.execute(run_id, answer, on_event=on_event)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    if info.state == "done":
        print("done" + (f" in {seconds:.1f} s" if bar is not None else ""))
        for name, value in (info.outputs or {}).items():
            print(f"  {name}: {_shown(runner, info, value)}")
        return 0
    if info.state == "waiting for approval":
        print(f"waiting for approval at step {info.step!r}:\n  {info.question}\n"
              f"answer with `signalgraph run --resume {run_id} --approve` (or --reject)")
        return 0
    if info.state == "rejected":
        print(f"rejected at step {info.step!r}; the run stops here")
        return 0
    print(f"error: run {run_id} failed: {info.error}\n"
          f"fix the cause, then continue it with `signalgraph run --resume {run_id}`", file=sys.stderr)
    return 1


def _shown(runner, info, value) -> str:
    """An output as a person reads it: media ids with the file they name."""
    if isinstance(value, str) and _MEDIA_ID.match(value):
        try:
            return f"{value} ({runner.store.get(info.session, value).path})"
        except SignalgraphError:  # an id-like text that is not this run's media is shown as it is
            return value
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def runs(args) -> int:
    log = _log(load_config(args.config))
    try:
        if args.run_id:
            info = log.get(args.run_id)
            if args.json:
                record = {k: v for k, v in vars(info).items() if k not in ("spec", "pid_started")}
                print(json.dumps({**record, "state": info.state}, indent=2, default=str))
                return 0
            _details(info)
            return 0
        listed = log.list()
        if args.json:
            print(json.dumps([{"id": r.id, "workflow": r.workflow, "state": r.state, "step": r.step}
                              for r in listed], indent=2))
            return 0
        if not listed:
            print("no workflow runs yet; start one with `signalgraph run FILE.yaml`")
            return 0
        width = max(len(r.id) for r in listed)
        print(f"{'RUN':<{width}}  {'STATE':<20}  {'STEP':<14}  UPDATED")
        for r in listed:
            print(f"{r.id:<{width}}  {r.state:<20}  {r.step or '-':<14}  "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.updated))}")
        return 0
    finally:
        log.close()


def _details(info) -> None:
    print(f"run       {info.id}\nworkflow  {info.workflow} ({info.source})\nprofile   {info.profile}\n"
          f"state     {info.state}" + (f" at step {info.step!r}" if info.step and info.state != "done" else ""))
    print(f"inputs    {json.dumps(info.inputs, ensure_ascii=False)}")
    for event in info.events:
        attempt = f" #{event['attempt']}" if event["attempt"] else ""
        detail = f"  {event['detail'][:200]}" if event["detail"] else ""
        print(f"  {time.strftime('%H:%M:%S', time.localtime(event['time']))}  {event['step']:<14} "
              f"{event['event']}{attempt}{detail}")
    if info.question and info.state == "waiting for approval":
        print(f"question  {info.question}")
    if info.error:
        print(f"error     {info.error}")
    for name, value in (info.outputs or {}).items():
        print(f"output    {name}: {value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}")
