"""The record of workflow runs, beside their checkpoints in `data_dir/workflows.sqlite`.

A `runs` table says which workflow each run is (its checked spec, inputs and profile), its status
as last written, the step it is at, and the process running it; an append-only `events` log holds
every attempt, skip and answer of every step. `signalgraph runs` reads them without importing
LangGraph or loading a model. A run marked running whose process is gone was interrupted.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import SignalgraphError


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
    error: str | None = None
    question: str | None = None  # the pending approval question
    outputs: dict | None = None
    events: list[dict] = field(default_factory=list)

    @property
    def state(self) -> str:
        """running, interrupted, waiting for approval, done, failed or rejected: a run marked
        running whose process is gone was interrupted."""
        if self.status == "running":
            return "running" if _alive(self.pid, self.pid_started) else "interrupted"
        return "waiting for approval" if self.status == "waiting" else self.status

    @property
    def session(self) -> str:
        return session_of(self.id)


def session_of(run_id: str) -> str:
    """The media store session of a run."""
    return f"workflow-{run_id}"


def _alive(pid: int | None, started: float | None) -> bool:
    import psutil

    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        # the same pid with another start time is another process that reused the number
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - (started or 0)) < 1e-3
    except psutil.Error:
        return False


_COLUMNS = ("id", "workflow", "source", "profile", "spec", "inputs", "status", "step", "pid", "pid_started",
            "created", "updated", "error", "question", "outputs")
_JSON = ("spec", "inputs", "outputs")


class RunLog:
    """The `runs` table and the append-only `events` log of one workflows file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        # WAL: readers (`signalgraph runs`, a test) never wait on the process that runs a workflow
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, workflow TEXT, source TEXT, profile TEXT, "
            "spec TEXT, inputs TEXT, status TEXT, step TEXT, pid INTEGER, pid_started REAL, created REAL, "
            "updated REAL, error TEXT, question TEXT, outputs TEXT);"
            "CREATE TABLE IF NOT EXISTS events (run_id TEXT, step TEXT, event TEXT, attempt INTEGER, "
            "detail TEXT, time REAL);"
            "CREATE INDEX IF NOT EXISTS events_run ON events (run_id);"
        )

    def create(self, run_id: str, spec, source: Path, inputs: dict, profile: str | None) -> None:
        """`spec` is the checked WorkflowSpec."""
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO runs (id, workflow, source, profile, spec, inputs, status, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (run_id, spec.name, str(source), profile, spec.model_dump_json(), json.dumps(inputs), now, now),
            )

    def get(self, run_id: str) -> RunInfo:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id=?", (run_id,)).fetchone()
            events = self._db.execute("SELECT step, event, attempt, detail, time FROM events WHERE run_id=? "
                                      "ORDER BY rowid", (run_id,)).fetchall()
        if row is None:
            raise WorkflowError(f"there is no workflow run {run_id!r}; see `signalgraph runs`")
        info = self._info(row)
        info.events = [dict(zip(("step", "event", "attempt", "detail", "time"), e)) for e in events]
        return info

    def list(self) -> list[RunInfo]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY created").fetchall()
        return [self._info(row) for row in rows]

    @staticmethod
    def _info(row: tuple) -> RunInfo:
        values = dict(zip(_COLUMNS, row))
        for key in _JSON:
            values[key] = json.loads(values[key]) if values[key] is not None else None
        return RunInfo(**values)

    def claim(self, run_id: str) -> None:
        """Mark the run as running in this process; refuse if another live process runs it."""
        import psutil

        me = psutil.Process()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                status, pid, started = self._db.execute(
                    "SELECT status, pid, pid_started FROM runs WHERE id=?", (run_id,)).fetchone()
                if status == "running" and pid != me.pid and _alive(pid, started):
                    raise WorkflowError(f"run {run_id!r} is running in process {pid}; wait for it to finish")
                self._db.execute("UPDATE runs SET status='running', pid=?, pid_started=?, error=NULL, "
                                 "question=NULL, updated=? WHERE id=?", (me.pid, me.create_time(), time.time(), run_id))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def update(self, run_id: str, **values: Any) -> None:
        values = {key: json.dumps(value) if key in _JSON and value is not None else value
                  for key, value in values.items()}
        assignments = ", ".join(f"{key}=?" for key in values)
        with self._lock:
            self._db.execute(f"UPDATE runs SET {assignments}, updated=? WHERE id=?",
                             (*values.values(), time.time(), run_id))

    def event(self, run_id: str, step: str, event: str, attempt: int | None = None, detail: str = "") -> None:
        with self._lock:
            self._db.execute("INSERT INTO events (run_id, step, event, attempt, detail, time) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (run_id, step, event, attempt, detail, time.time()))
            if event in ("started", "waiting"):
                self._db.execute("UPDATE runs SET step=?, updated=? WHERE id=?", (step, time.time(), run_id))

    def close(self) -> None:
        self._db.close()
