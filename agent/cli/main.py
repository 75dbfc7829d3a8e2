"""The `signalgraph` command: its arguments, and each subcommand's handler (`set_defaults(run=
"module:function")`). Handlers' modules load only when their command runs, so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line and exit 2, like every other user error here."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="signalgraph",
        description="A multimodal LLM agent: a LangGraph controller over an MM-LLM backbone whose signal "
                    "tokens go to expert tools or to its own output projectors and generators.",
    )
    parser.add_argument("--profile", help="profile name (local, tiny, full) or a YAML file; "
                                          "default $SIGNALGRAPH_PROFILE or local")
    parser.add_argument("--config", help="agent config YAML (data folder, allowed folders, tool allowlists); "
                                         "default $SIGNALGRAPH_CONFIG or ./signalgraph.yaml")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    chat = commands.add_parser("chat", help="talk with the assistant; the session persists across runs")
    chat.set_defaults(run="agent.cli.turns:chat")
    chat.add_argument("--session", default="default", help="session name (resumes it if it exists)")
    chat.add_argument("--trace", action="store_true", help="show each turn's routing decisions")

    ask = commands.add_parser("ask", help="one turn, scriptable")
    ask.set_defaults(run="agent.cli.turns:ask")
    ask.add_argument("question")
    for kind in ("image", "audio", "video"):
        ask.add_argument(f"--{kind}", action="append", metavar="PATH", help=f"attach {kind} (repeatable)")
    ask.add_argument("--session", help="session name (default: a new one)")
    ask.add_argument("--json", action="store_true", help="print the reply, media and trace as JSON")
    ask.add_argument("--trace", action="store_true", help="show the routing decisions")
    ask.add_argument("--yes", action="store_true",
                     help="approve the actions that ask for confirmation (default: ask on a terminal)")

    plan = commands.add_parser("plan", help="plan tasks over the tools for a request, check them, run them")
    plan.set_defaults(run="agent.cli.plans:plan")
    plan.add_argument("request")
    for kind in ("image", "audio"):
        plan.add_argument(f"--{kind}", action="append", metavar="PATH", help=f"attach {kind} (repeatable)")
    plan.add_argument("--json", action="store_true", help="print the plan and each task's result as JSON")

    kb = commands.add_parser("kb", help="the knowledge base used for retrieval")
    kb.set_defaults(run="agent.cli.turns:kb")
    kb_sub = kb.add_subparsers(dest="action", metavar="ACTION", required=True)
    kb_add = kb_sub.add_parser("add", help="ingest text, Markdown, PDF, audio and image files or folders")
    kb_add.add_argument("paths", nargs="+")
    kb_search = kb_sub.add_parser("search", help="print the passages closest to a query, with sources")
    kb_search.add_argument("query")
    kb_search.add_argument("-k", type=int, default=5)
    for sub in (kb_add, kb_search):
        sub.add_argument("--tenant", help="that tenant's own knowledge base (default: the server's shared one)")

    sessions = commands.add_parser("sessions", help="list sessions, or delete one")
    sessions.set_defaults(run="agent.cli.turns:sessions")
    sessions_sub = sessions.add_subparsers(dest="action", metavar="ACTION")
    delete = sessions_sub.add_parser("delete", help="delete a session, its messages and its media")
    delete.add_argument("name")

    train = commands.add_parser("train", help="MM pre-training then instruction tuning, from a YAML config")
    train.set_defaults(run="agent.cli.train:train")
    train.add_argument("config", help="training config YAML (profile, stages, data, out_dir)")
    train.add_argument("--resume", action="store_true", help="continue each unfinished stage from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="start again over an earlier run in out_dir")

    evaluate = commands.add_parser("eval", help="exact-match accuracy on a JSONL manifest (VQA-style)")
    evaluate.set_defaults(run="agent.cli.train:evaluate")
    evaluate.add_argument("manifest")
    evaluate.add_argument("--blind", action="store_true", help="drop the media: the baseline to beat")
    evaluate.add_argument("--limit", type=int)

    proof = commands.add_parser("proof", help="the training proofs, each one command (see README)")
    proof.set_defaults(run="agent.cli.proof:proof")
    proof.add_argument("which", choices=["seeing", "drawing", "choosing", "joint", "assistant"],
                       help="joint: one model trained on all three; assistant: the local profile's weights, "
                            "retrained from joint's to answer people")
    proof.add_argument("--out", help="default results/proofs/WHICH")
    proof.add_argument("--pt-steps", type=int, help="seeing's PT steps (seeing, joint)")
    proof.add_argument("--it-steps", type=int, help="IT steps (seeing, joint)")
    proof.add_argument("--test-questions", type=int, default=1000)
    proof.add_argument("--resume", action="store_true")
    proof.add_argument("--install", action="store_true",
                       help="joint: write the weights to models/trained/joint; assistant: to models/trained/local, "
                            "for the local profile")

    bench = commands.add_parser("bench", help="benchmarks against their baselines, written under --out; without "
                                              "a suite, the full report (report.md, report.json, plots)")
    bench.set_defaults(run="agent.cli.bench:bench")
    bench.add_argument("suite", nargs="?", choices=["controller", "load"],
                       help="controller: the controller's figures alone; load: the load test alone")
    bench.add_argument("--out", default="results/bench")
    bench.add_argument("--turns", type=int, help="turns for the overhead figure (default 50; the report: 10, "
                                                 "50 on tiny)")
    bench.add_argument("--prompts", type=int, default=120, help="prompts for the tool-call validity figure")
    bench.add_argument("--only", action="append", metavar="NAME",
                       help="run only this part (repeatable): for the report decode, controller, retrieval, asr, "
                            "cold-start, load; for controller overhead, overhead-local, validity, parallel, plan")
    bench.add_argument("--quick", action="store_true", help="the report in small sizes (tiny profile unless "
                                                            "--profile): a check that it runs, not figures")
    bench.add_argument("--sessions", type=int, default=32, help="load: concurrent streaming sessions")
    bench.add_argument("--replicas", type=int, default=1, help="load: servers on one Postgres database, each "
                       "session's turns sent to them in turn")
    bench.add_argument("--database", help="load: the replicas' postgresql:// URL (default: an embedded Postgres)")
    bench.add_argument("--seconds", type=float, default=120.0,
                       help="load: seconds during which sessions start new turns")

    embodied = commands.add_parser("embodied", help="plan skills in BabyAI with the backbone, against a random "
                                                    "policy and the BabyAI bot")
    embodied.set_defaults(run="agent.cli.embodied:embodied")
    embodied.add_argument("--env", action="append", metavar="LEVEL",
                          help="a BabyAI level, e.g. BabyAI-GoToLocal-v0 (repeatable; default BabyAI-GoToLocal-v0)")
    embodied.add_argument("--episodes", type=int, default=50, help="episodes per level and policy")
    embodied.add_argument("--seed", type=int, default=0, help="seed of the first episode; the others follow")
    embodied.add_argument("--out", default="results/embodied", help="folder for results.json, GIFs and the chart")
    embodied.add_argument("--gif", type=int, default=2, help="episodes per level drawn into its GIF "
                                                             "(the first failure is drawn too)")

    models = commands.add_parser("models", help="list the active profile's models, or prepare them")
    models.set_defaults(run="agent.cli.models:models")
    models_sub = models.add_subparsers(dest="action", metavar="ACTION")
    prepare = models_sub.add_parser("prepare", help="make every model of the profile ready (progress bars)")
    prepare.add_argument("--download", action="store_true",
                         help="fetch hub models that are not cached (needs network access to the hub)")

    db = commands.add_parser("db", help="the shared Postgres database: apply its migrations, or show its schema")
    db.set_defaults(run="agent.cli.db:db")
    db.add_argument("action", choices=["upgrade", "status"],
                    help="upgrade: apply the migrations not yet applied; status: which are applied (exit 1 if any "
                         "is pending)")
    db.add_argument("--url", help="a postgresql:// URL (default: the config's `database`, then "
                                  "$SIGNALGRAPH_DATABASE_URL)")

    keys = commands.add_parser("keys", help="tenants' API keys: add one (shown once), list them, revoke one")
    keys.set_defaults(run="agent.cli.keys:keys")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    keys_add = keys_sub.add_parser("add", help="a new key for a tenant; the server then requires keys")
    keys_add.add_argument("tenant", help="the tenant's name (lowercase letters, digits, '-', '_')")
    keys_add.add_argument("--name", default="", help="a note saying whose key it is")
    keys_sub.add_parser("list", help="every key: id, tenant, name, made, revoked")
    keys_revoke = keys_sub.add_parser("revoke", help="stop a key working, on every replica")
    keys_revoke.add_argument("id")

    run = commands.add_parser("run", help="run a workflow file; every step is checkpointed, so a run resumes "
                                          "after a crash (see `runs`)")
    run.set_defaults(run="agent.cli.workflows:run")
    run.add_argument("workflow", nargs="?", help="workflow YAML (steps: tool calls, prompts, approvals)")
    run.add_argument("--input", action="append", default=[], metavar="KEY=VALUE", help="a workflow input (repeatable)")
    run.add_argument("--resume", metavar="RUN_ID", help="continue a run from its last completed step")
    answer = run.add_mutually_exclusive_group()
    answer.add_argument("--approve", action="store_true", help="with --resume: say yes to the approval it waits for")
    answer.add_argument("--reject", action="store_true", help="with --resume: say no (the run stops)")

    runs = commands.add_parser("runs", help="workflow runs with their state and step, or one run's step log")
    runs.set_defaults(run="agent.cli.workflows:runs")
    runs.add_argument("run_id", nargs="?")
    runs.add_argument("--json", action="store_true")

    demo = commands.add_parser("demo", help="a scripted tour through the controller on the active profile, offline")
    demo.set_defaults(run="agent.cli.demo:demo")
    demo.add_argument("--out", default="results/demo", help="folder for the files the demo writes")
    demo.add_argument("--components", action="store_true", help="instead, run each model of the profile on its own")

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP API and a web chat (at /)")
    serve.set_defaults(run="agent.cli.serve:serve")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API; "
                                         "default $SIGNALGRAPH_API_KEY, else no key")
    serve.add_argument("--queue", type=int, default=8,
                       help="requests that may wait while --max-concurrency turns run; more get 429")
    serve.add_argument("--max-concurrency", type=int, default=8,
                       help="turns that run at once, their decoding batched on the backbone (default 8)")
    serve.add_argument("--drain-seconds", type=float, default=120.0,
                       help="on SIGTERM, how long running turns may take to finish while new ones get 503")
    serve.add_argument("--ray", action="store_true", help="the backbone and each expert model as Ray Serve "
                       "deployments, with their own replicas and resources (docs/scaling.md)")
    serve.add_argument("--address", help="with --ray: a running Ray cluster's address (default: start a local one)")
    serve.add_argument("--deployments", metavar="YAML", help="with --ray: replicas, num_cpus, num_gpus and "
                       "autoscaling per deployment (examples/ray-deployments.yaml)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    from models.errors import SignalgraphError

    module, _, function = args.run.partition(":")
    try:
        return getattr(importlib.import_module(module), function)(args)  # the command's module loads now
    except SignalgraphError as exc:
        if getattr(args, "json", False):  # a script reading --json output gets the error there too
            import json

            print(json.dumps({"error": {"message": str(exc), "type": type(exc).__name__}}))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
