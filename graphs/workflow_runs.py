"""The record of workflow runs, beside their checkpoints: in `data_dir/workflows.sqlite`
(`RunLog(path)`), or in the shared Postgres database (`PgRunLog(database)`), one logic for both.

A `runs` table says which workflow each run is (its checked spec, inputs and profile), its status
as last written, the step it is at, and the process running it (pid and host); an append-only
`events` log holds every attempt, skip and answer of every step. `signalgraph runs` reads them
without importing LangGraph or loading a model. A run marked running whose process is gone was
interrupted; one that a process on another machine runs counts as gone once it falls silent.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import SignalgraphError
from tools.database import CHECKPOINTERS

if TYPE_CHECKING:
    from tools.database import Database


class WorkflowError(SignalgraphError):
    """A run that cannot do what was asked (unknown id, already running, not waiting for an answer)."""


@dataclass
class RunInfo:
    id: str
    workflow: str
    source: str  # the workflow file it was started from
    profile: str | None
    spec: dict  # the checked workflow as it was when the run started
    inputs: dict
    status: str  # running, waiting, done, failed, rejected (as last written)
    step: str | None  # the step it is at
    pid: int | None
    pid_started: float | None
    created: float
    updated: float
    host: str | None = None  # the machine of pid
    error: str | None = None
    question: str | None = None  # the pending approval question
    outputs: dict | None = None
    events: list[dict] = field(default_factory=list)

    @property
    def state(self) -> str:
        """running, interrupted, waiting for approval, done, failed or rejected: a run marked
        running whose process is gone was interrupted."""
        if self.status == "running":
            return "running" if _alive(self.pid, self.pid_started, self.host, self.updated) else "interrupted"
        return "waiting for approval" if self.status == "waiting" else self.status

    @property
    def session(self) -> str:
        return session_of(self.id)


def session_of(run_id: str) -> str:
    """The media store session of a run."""
    return f"workflow-{run_id}"


# A process on another machine cannot be asked whether it is alive (psutil sees this machine
# only): a run claimed there counts as alive until its record has not changed for this long. Every
# attempt of every step writes an event, so only a single step slower than this looks abandoned.
# The machines' clocks are taken to agree to well within it.
OTHER_HOST_SILENCE = 15 * 60
HOST = socket.gethostname()


def _alive(pid: int | None, started: float | None, host: str | None, updated: float | None) -> bool:
    import psutil

    if pid is None:
        return False
    if not _here(host):
        return time.time() - (updated or 0) < OTHER_HOST_SILENCE
    try:
        process = psutil.Process(pid)
        # the same pid with another start time is another process that reused the number
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - (started or 0)) < 1e-3
    except psutil.Error:
        return False


def _here(host: str | None) -> bool:
    """Whether `host` is this machine; None in SQLite logs written before runs recorded their host."""
    return host is None or host == HOST


_COLUMNS = ("id", "workflow", "source", "profile", "spec", "inputs", "status", "step", "pid", "pid_started",
            "host", "created", "updated", "error", "question", "outputs")
_JSON = ("spec", "inputs", "outputs")
_EVENT_COLUMNS = ("step", "event", "attempt", "detail", "time")

# runs one statement; the rows it returns, as dicts
Execute = Callable[..., list[dict]]


class BaseRunLog:
    """The `runs` table and the append-only `events` log, whichever database holds them. A
    subclass says how statements run (`_statements`); they are written with SQLite's `?`
    placeholders."""

    # locks the row a claim reads until the claim commits, where the database locks rows
    _LOCK_ROW = ""

    def _statements(self, *, atomic: bool = False) -> AbstractContextManager[Execute]:
        """A function that runs statements: one transaction with `atomic`, else each on its own."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def create(self, run_id: str, spec, source: Path, inputs: dict, profile: str | None) -> None:
        """`spec` is the checked WorkflowSpec."""
        now = time.time()
        with self._statements() as run:
            run("INSERT INTO runs (id, workflow, source, profile, spec, inputs, status, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (run_id, spec.name, str(source), profile, spec.model_dump_json(), json.dumps(inputs), now, now))

    def get(self, run_id: str) -> RunInfo:
        with self._statements() as run:
            rows = run(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id=?", (run_id,))
            events = run(f"SELECT {', '.join(_EVENT_COLUMNS)} FROM events WHERE run_id=? ORDER BY rowid",
                         (run_id,))
        if not rows:
            raise _unknown(run_id)
        info = self._info(rows[0])
        info.events = events
        return info

    def list(self) -> list[RunInfo]:
        with self._statements() as run:
            rows = run(f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY created")
        return [self._info(row) for row in rows]

    @staticmethod
    def _info(row: dict) -> RunInfo:
        values = dict(row)
        for key in _JSON:
            values[key] = json.loads(values[key]) if values[key] is not None else None
        return RunInfo(**values)

    def claim(self, run_id: str) -> None:
        """Mark the run as running in this process; refuse if another live process runs it."""
        import psutil

        me = psutil.Process()
        with self._statements(atomic=True) as run:
            rows = run(f"SELECT status, pid, pid_started, host, updated FROM runs WHERE id=?{self._LOCK_ROW}",
                       (run_id,))
            if not rows:
                raise _unknown(run_id)
            held = rows[0]
            pid, host = held["pid"], held["host"]
            mine = _here(host) and pid == me.pid
            if held["status"] == "running" and not mine and _alive(pid, held["pid_started"], host, held["updated"]):
                where = f"process {pid}" if _here(host) else f"process {pid} on {host}"
                raise WorkflowError(f"run {run_id!r} is running in {where}; wait for it to finish")
            run("UPDATE runs SET status='running', pid=?, pid_started=?, host=?, error=NULL, question=NULL, "
                "updated=? WHERE id=?", (me.pid, me.create_time(), HOST, time.time(), run_id))

    def update(self, run_id: str, **values: Any) -> None:
        values = {key: json.dumps(value) if key in _JSON and value is not None else value
                  for key, value in values.items()}
        assignments = ", ".join(f"{key}=?" for key in values)
        with self._statements() as run:
            run(f"UPDATE runs SET {assignments}, updated=? WHERE id=?", (*values.values(), time.time(), run_id))

    def event(self, run_id: str, step: str, event: str, attempt: int | None = None, detail: str = "") -> None:
        with self._statements(atomic=True) as run:
            run("INSERT INTO events (run_id, step, event, attempt, detail, time) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, step, event, attempt, detail, time.time()))
            if event in ("started", "waiting"):
                run("UPDATE runs SET step=?, updated=? WHERE id=?", (step, time.time(), run_id))


def _unknown(run_id: str) -> WorkflowError:
    return WorkflowError(f"there is no workflow run {run_id!r}; see `signalgraph runs`")


class RunLog(BaseRunLog):
    """The run log in one SQLite workflows file (the embedded default)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # WAL: readers (`signalgraph runs`, a test) never wait on the process that runs a workflow
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, workflow TEXT, source TEXT, profile TEXT, "
            "spec TEXT, inputs TEXT, status TEXT, step TEXT, pid INTEGER, pid_started REAL, created REAL, "
            "updated REAL, error TEXT, question TEXT, outputs TEXT, host TEXT);"
            "CREATE TABLE IF NOT EXISTS events (run_id TEXT, step TEXT, event TEXT, attempt INTEGER, "
            "detail TEXT, time REAL);"
            "CREATE INDEX IF NOT EXISTS events_run ON events (run_id);"
        )
        with self._statements(atomic=True) as run:
            if "host" not in {column["name"] for column in run("PRAGMA table_info(runs)")}:
                run("ALTER TABLE runs ADD COLUMN host TEXT")  # a file from before runs recorded their host

    @contextmanager
    def _statements(self, *, atomic: bool = False) -> Iterator[Execute]:
        def execute(sql: str, params: tuple = ()) -> list[dict]:
            return [dict(row) for row in self._db.execute(sql, params)]

        with self._lock:
            if not atomic:
                yield execute
                return
            self._db.execute("BEGIN IMMEDIATE")  # the whole file: a claim's read and write in one go
            try:
                yield execute
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class PgRunLog(BaseRunLog):
    """The run log in a shared Postgres database (tools/migrations/0004_workflow_runs.sql), beside
    the workflow checkpoints, for replicas that run and resume each other's workflows."""

    _LOCK_ROW = " FOR UPDATE"

    def __init__(self, database: Database):
        self.database = database
        self._pool = database.pool(CHECKPOINTERS["workflows"])  # its search path finds runs and events

    @contextmanager
    def _statements(self, *, atomic: bool = False) -> Iterator[Execute]:
        with self._pool.connection() as conn, conn.transaction() if atomic else nullcontext():
            def execute(sql: str, params: tuple = ()) -> list[dict]:
                cursor = conn.execute(sql.replace("?", "%s"), params)
                return cursor.fetchall() if cursor.description is not None else []

            yield execute

    def close(self) -> None:
        """Nothing to close: the database belongs to whoever made it, and may serve others."""
