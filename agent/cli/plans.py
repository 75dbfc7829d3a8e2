"""`signalgraph plan`: the backbone plans tasks over the session's tools, then they run."""

from __future__ import annotations

import json
import sys
import time

from agent.config import load_config
from agent.runtime import Runtime


def plan(args) -> int:
    """0 when every task succeeded; 1 when the plan could not run or a task failed."""
    from tqdm import tqdm

    from graphs.plan_runner import PlanRunner, report
    from graphs.planner import PLAN_MAX_NEW_TOKENS, PlanError, describe, make_plan
    from graphs.thinker import BackboneThinker

    config = load_config(args.config)
    if args.profile:
        config.profile = args.profile
    runtime = Runtime(config)
    session = f"plan-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"
    try:
        media = []
        for kind in ("image", "audio"):
            for path in getattr(args, kind) or []:
                record = runtime.store.add_file(session, path, kind, confine=False)  # the user's own file
                media.append({"id": record.id, "kind": record.kind, "path": str(record.path)})
        tools = runtime.tools(session)
        # the turn's token budget fits a reply; a plan gets its own
        thinker = BackboneThinker(runtime.thinker.mm, runtime.thinker.cache, max_new_tokens=PLAN_MAX_NEW_TOKENS)
        try:
            made = make_plan(thinker, args.request, tools, media)
        except PlanError as exc:
            if args.json:
                print(json.dumps({"session": session, "request": args.request, "error": str(exc),
                                  "problems": exc.problems, "raw": exc.raw}, indent=2, default=str))
            else:
                print(f"the backbone wrote: {json.dumps(exc.raw, default=str)}")
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"plan: {len(made.tasks)} task{'s' if len(made.tasks) > 1 else ''} in {made.waves} "
                  f"wave{'s' if made.waves > 1 else ''}")
            print("\n".join(f"  {describe(t)}" for t in made.tasks))
            if made.repairs:
                print("repaired:\n" + "\n".join(f"  - {r}" for r in made.repairs))
        with tqdm(total=len(made.tasks), desc="running the plan", unit="task") as bar:
            results = PlanRunner(tools).run(made, on_result=lambda r: (bar.set_postfix_str(f"task {r.id}"),
                                                                       bar.update()))
    finally:
        runtime.close()
    if args.json:
        print(json.dumps({"session": session, "request": args.request, "media": [m["id"] for m in media],
                          "plan": made.to_dict(),
                          "results": [{"id": r.id, "tool": r.tool, "status": r.status, "args": r.args,
                                       "output": r.output, "error": r.error} for r in results]},
                         indent=2, default=str))
    else:
        print(report(results))
    return 0 if all(r.status == "ok" for r in results) else 1
