"""Where shared state lives: SQLite files under the data folder (the embedded default), or one
Postgres database that any number of processes share.

`database:` in the agent config, or $SIGNALGRAPH_DATABASE_URL, names a `postgresql://` URL; without
one, everything stays in SQLite files under `data_dir` as before. On Postgres, Signalgraph's own
tables are created by versioned migrations (`tools/migrations/NNNN_name.sql`, applied in order by
`signalgraph db upgrade`, recorded in `signalgraph_migrations`); LangGraph's checkpoint tables are
set up by LangGraph's own migrations, each checkpointer in a schema of its own (sessions and
workflow runs never share a thread id space). A process refuses to start on a database whose
schema is older than its code and says which command brings it up to date.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from models.errors import ConfigError, SignalgraphError

DATABASE_ENV = "SIGNALGRAPH_DATABASE_URL"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# LangGraph checkpointers, each in its own Postgres schema: name -> schema
CHECKPOINTERS = {"sessions": "signalgraph_sessions", "workflows": "signalgraph_workflows"}


class DatabaseError(SignalgraphError):
    """The database cannot be reached or used."""


class SchemaOutOfDateError(DatabaseError):
    """The database's schema is older than this code."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def migrations() -> list[Migration]:
    """Signalgraph's own migrations, in order of their unique version numbers."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = _MIGRATION.match(path.name)
        if match is None:
            raise ConfigError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migrations share a number in {MIGRATIONS_DIR}")
    return found


def database_url(configured: str | None) -> str | None:
    """The configured URL, else $SIGNALGRAPH_DATABASE_URL, else None (SQLite). Anything else than a
    Postgres URL is a configuration error."""
    url = configured or os.environ.get(DATABASE_ENV) or None
    if url is not None and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"database {_redacted(url)!r} is not a postgresql:// URL; leave it unset for the embedded "
                          "SQLite default")
    return url


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class Database:
    """One Postgres database: a connection pool, migrations, and the checkpointers on it."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 16):
        self.url = url
        self._pools: dict[str | None, object] = {}
        self._sizes = (min_size, max_size)
        self._lock = threading.Lock()
        self._held = threading.local()  # advisory locks this thread holds: key -> depth

    def __repr__(self) -> str:
        return f"Database({_redacted(self.url)!r})"

    def pool(self, schema: str | None = None):
        """A shared connection pool; with `schema`, its connections look there first (LangGraph's
        tables have fixed names, so each checkpointer lives in a schema of its own)."""
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise ConfigError("a Postgres database needs the postgres extra: pip install 'signalgraph[postgres]'"
                              ) from None

        with self._lock:
            if schema not in self._pools:
                kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
                if schema is not None:
                    kwargs["options"] = f"-c search_path={schema},public"
                try:  # one plain connection first: the pool would retry a wrong URL until its timeout
                    psycopg.connect(self.url, connect_timeout=10).close()
                except psycopg.Error as exc:
                    raise DatabaseError(f"cannot connect to the database {_redacted(self.url)}: "
                                        f"{' '.join(_redacted(str(exc)).split())}") from None
                pool = ConnectionPool(self.url, min_size=self._sizes[0], max_size=self._sizes[1], kwargs=kwargs,
                                      open=False, name=schema or "signalgraph")
                try:
                    pool.open(wait=True, timeout=15)
                except Exception as exc:  # psycopg_pool.PoolTimeout and connection errors alike
                    pool.close()
                    raise DatabaseError(f"cannot connect to the database {_redacted(self.url)}: {exc}") from None
                self._pools[schema] = pool
            return self._pools[schema]

    def connection(self):
        """A pooled connection (context manager), autocommit, rows as dicts."""
        return self.pool().connection()

    # --- schema ------------------------------------------------------------------------------

    def version(self) -> int:
        """The newest migration applied; 0 on an empty database."""
        with self.connection() as conn:
            exists = conn.execute("SELECT to_regclass('public.signalgraph_migrations') AS t").fetchone()["t"]
            if exists is None:
                return 0
            return conn.execute("SELECT coalesce(max(version), 0) AS v FROM signalgraph_migrations").fetchone()["v"]

    def upgrade(self) -> tuple[int, int]:
        """Apply every migration not yet applied, each in its own transaction, and set up LangGraph's
        checkpoint tables. Safe to run from several processes at once (an advisory lock orders them).
        Returns (version before, version after)."""
        from langgraph.checkpoint.postgres import PostgresSaver

        with self.connection() as conn:
            # polled, not waited for: a waiting statement would hold a snapshot, and LangGraph's
            # CREATE INDEX CONCURRENTLY in the process that holds the lock waits for every snapshot
            deadline = time.monotonic() + 300
            while not conn.execute("SELECT pg_try_advisory_lock(hashtext('signalgraph-migrations')) AS ok"
                                   ).fetchone()["ok"]:
                if time.monotonic() > deadline:
                    raise DatabaseError("another process has been upgrading the database for 5 minutes")
                time.sleep(0.2)
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS signalgraph_migrations (version integer PRIMARY KEY, "
                             "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
                before = conn.execute("SELECT coalesce(max(version), 0) AS v FROM signalgraph_migrations"
                                      ).fetchone()["v"]
                for migration in migrations():
                    if migration.version <= before:
                        continue
                    with conn.transaction():
                        conn.execute(migration.sql, prepare=False)  # several statements: never prepared
                        conn.execute("INSERT INTO signalgraph_migrations (version, name) VALUES (%s, %s)",
                                     (migration.version, migration.name))
                for schema in CHECKPOINTERS.values():
                    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                    PostgresSaver(self.pool(schema)).setup()  # LangGraph's own versioned migrations
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext('signalgraph-migrations'))")
        return before, self.version()

    def check(self) -> int:
        """Refuse an out-of-date schema; return the version."""
        current, wanted = self.version(), max((m.version for m in migrations()), default=0)
        if current < wanted:
            raise SchemaOutOfDateError(
                f"the database {_redacted(self.url)} is at schema version {current}, and this Signalgraph needs "
                f"{wanted}: run `signalgraph db upgrade`")
        if current > wanted:
            raise SchemaOutOfDateError(
                f"the database {_redacted(self.url)} is at schema version {current}, newer than this Signalgraph "
                f"({wanted}): upgrade Signalgraph")
        return current

    # --- ordering across processes -------------------------------------------------------------

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold a Postgres advisory lock on `key` for the block: one session's turns run one at a
        time across every process on the database. Re-entrant within a thread. If the process dies,
        its connection closes and Postgres releases the lock, so no replica waits on a dead one."""
        held = self._held.__dict__.setdefault("keys", {})
        if key in held:
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        with self.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
            held[key] = 1
            try:
                yield
            finally:
                del held[key]
                conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))

    # --- LangGraph ---------------------------------------------------------------------------

    def checkpointer(self, name: str):
        """LangGraph's Postgres checkpointer for `name` (sessions, workflows), on the shared pool."""
        from langgraph.checkpoint.postgres import PostgresSaver

        return PostgresSaver(self.pool(CHECKPOINTERS[name]))

    def threads(self, name: str) -> list[str]:
        """The thread ids `name`'s checkpointer holds (the sessions, the workflow runs)."""
        with self.pool(CHECKPOINTERS[name]).connection() as conn:
            return [r["thread_id"] for r in conn.execute("SELECT DISTINCT thread_id FROM checkpoints ORDER BY 1")]

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
