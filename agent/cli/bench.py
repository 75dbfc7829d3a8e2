"""`signalgraph bench [SUITE]`: the benchmark report, or one suite alone (docs/benchmarks.md)."""

from __future__ import annotations

from models.errors import ConfigError

CONTROLLER_PARTS = ["overhead", "overhead-local", "validity", "parallel", "plan"]


def bench(args) -> int:
    if args.suite == "controller":
        from agent.bench.controller import run

        if set(args.only or []) - set(CONTROLLER_PARTS):
            raise ConfigError(f"bench controller --only takes {', '.join(CONTROLLER_PARTS)} "
                              f"(got {', '.join(args.only)})")
        return run(args.out, turns=args.turns or 50, prompts=args.prompts, only=args.only)
    if args.suite == "load":
        from agent.bench.load import run

        return run(args.out, args.profile, sessions=args.sessions, seconds=args.seconds, replicas=args.replicas,
                   database=args.database)
    from agent.bench.report import run

    return run(args.out, args.profile, only=args.only, quick=args.quick, turns=args.turns,
               sessions=args.sessions, seconds=args.seconds)
