"""The `signalgraph` command. Heavy libraries load inside the commands, so `--help` stays instant."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signalgraph",
        description="A multimodal LLM agent: a LangGraph controller over an MM-LLM backbone whose signal "
                    "tokens go to expert tools or to its own output projectors and generators.",
    )
    parser.add_argument("--profile", help="profile name (local, tiny, full) or a YAML file; "
                                          "default $SIGNALGRAPH_PROFILE or local")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = commands.add_parser("models", help="list the active profile's models, or prepare them")
    models_sub = models.add_subparsers(dest="action", metavar="ACTION")
    prepare = models_sub.add_parser("prepare", help="make every model of the profile ready (progress bars)")
    prepare.add_argument("--download", action="store_true",
                         help="fetch hub models that are not cached (needs network access to the hub)")

    demo = commands.add_parser("demo", help="a short tour of the components on the active profile, offline")
    demo.add_argument("--out", default="results/demo", help="folder for the files the demo writes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    from models.errors import SignalgraphError

    try:
        if args.command == "models":
            from agent.model_commands import list_models, prepare_models

            if args.action == "prepare":
                return prepare_models(args.profile, download=args.download)
            return list_models(args.profile)
        if args.command == "demo":
            from agent.demo import run_demo

            return run_demo(args.profile, args.out)
    except SignalgraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
