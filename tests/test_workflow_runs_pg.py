"""The workflow run log on Postgres: the SQLite log's behaviours, shared by replicas, and claims
that a live process holds, on this machine or on another one. Real PostgreSQL, no models."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from graphs.workflow_runs import HOST, OTHER_HOST_SILENCE, PgRunLog, RunLog, WorkflowError
from graphs.workflow_spec import WorkflowSpec
from tools.database import CHECKPOINTERS, Database

REPO = Path(__file__).resolve().parents[1]
SPEC = WorkflowSpec.model_validate({"name": "once", "steps": [{"name": "a", "prompt": "hi"}]})


@pytest.fixture
def runs(database):
    return PgRunLog(database)


@pytest.fixture
def replica(postgres_url):
    """The log as another server process sees it: its own connections to the same database."""
    db = Database(postgres_url)
    yield PgRunLog(db)
    db.close()


def _set(database: Database, run_id: str, **values) -> None:
    """Write columns as another process would have, leaving `updated` alone unless given."""
    assignments = ", ".join(f"{key}=%s" for key in values)
    with database.pool(CHECKPOINTERS["workflows"]).connection() as conn:
        conn.execute(f"UPDATE runs SET {assignments} WHERE id=%s", (*values.values(), run_id))


def test_create_get_list_update_and_events(runs, replica):
    runs.create("once-1", SPEC, Path("/flows/once.yaml"), {"topic": "tea"}, "tiny")
    runs.create("once-2", SPEC, Path("/flows/once.yaml"), {}, None)
    info = replica.get("once-1")
    assert (info.workflow, info.source, info.profile) == ("once", "/flows/once.yaml", "tiny")
    assert info.inputs == {"topic": "tea"}
    assert info.spec == SPEC.model_dump(mode="json") and info.status == "running" and info.pid is None
    assert info.state == "interrupted" and info.events == [] and info.session == "workflow-once-1"
    assert [r.id for r in replica.list()] == ["once-1", "once-2"]

    runs.event("once-1", "a", "started", 1)
    runs.event("once-1", "a", "failed", 1, "timed out")
    runs.event("once-1", "a", "started", 2)
    runs.update("once-1", status="done", step=None, outputs={"answer": "green"})
    info = replica.get("once-1")
    assert [(e["step"], e["event"], e["attempt"], e["detail"]) for e in info.events] == [
        ("a", "started", 1, ""), ("a", "failed", 1, "timed out"), ("a", "started", 2, "")]
    assert (info.state, info.step, info.outputs) == ("done", None, {"answer": "green"})
    assert info.updated >= info.created

    runs.event("once-2", "a", "waiting", detail="publish?")
    runs.update("once-2", status="waiting", question="publish?")
    waiting = replica.get("once-2")
    assert (waiting.state, waiting.step, waiting.question) == ("waiting for approval", "a", "publish?")
    with pytest.raises(WorkflowError, match="there is no workflow run 'nope'"):
        replica.get("nope")


def test_a_claim_records_this_process_and_clears_the_question(runs):
    runs.create("once-1", SPEC, Path("once.yaml"), {}, None)
    runs.update("once-1", status="waiting", question="ok?", error="earlier")
    runs.claim("once-1")
    info = runs.get("once-1")
    me = psutil.Process()
    assert (info.status, info.pid, info.host, info.question, info.error) == ("running", me.pid, HOST, None, None)
    assert info.pid_started == pytest.approx(me.create_time()) and info.state == "running"
    runs.claim("once-1")  # this process again: fine
    with pytest.raises(WorkflowError, match="there is no workflow run"):
        runs.claim("nope")


def test_a_run_that_a_live_process_here_runs_is_not_claimed_twice(runs, replica, database):
    parent = psutil.Process().parent()  # alive for as long as this test runs
    runs.create("once-1", SPEC, Path("once.yaml"), {}, None)
    _set(database, "once-1", status="running", pid=parent.pid, pid_started=parent.create_time(), host=HOST)
    assert replica.get("once-1").state == "running"
    with pytest.raises(WorkflowError, match=f"run 'once-1' is running in process {parent.pid}; wait"):
        replica.claim("once-1")
    _set(database, "once-1", pid_started=parent.create_time() - 60)  # that pid, but another process
    assert replica.get("once-1").state == "interrupted"
    replica.claim("once-1")
    assert replica.get("once-1").pid == psutil.Process().pid


def test_a_run_on_another_machine_counts_as_alive_until_it_falls_silent(runs, replica, database):
    runs.create("once-1", SPEC, Path("once.yaml"), {}, None)
    # pid 1 there, which this machine's psutil cannot speak for
    _set(database, "once-1", status="running", pid=1, pid_started=0.0, host="elsewhere", updated=time.time())
    assert replica.get("once-1").state == "running"
    with pytest.raises(WorkflowError, match="running in process 1 on elsewhere"):
        replica.claim("once-1")
    _set(database, "once-1", updated=time.time() - OTHER_HOST_SILENCE - 1)
    assert replica.get("once-1").state == "interrupted"
    replica.claim("once-1")
    assert replica.get("once-1").host == HOST


CLAIMER = """
import sys, time
from pathlib import Path
from graphs.workflow_runs import PgRunLog, WorkflowError
from tools.database import Database

log = PgRunLog(Database(sys.argv[1]))  # connects
print("ready", flush=True)
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
try:
    log.claim(sys.argv[2])
    print("claimed", flush=True)
except WorkflowError as exc:
    print("refused:", exc, flush=True)
sys.stdin.read()  # alive until the test closes stdin
"""


def test_two_processes_claiming_at_once_let_exactly_one_through(runs, postgres_url, tmp_path):
    runs.create("once-1", SPEC, Path("once.yaml"), {}, None)
    go = tmp_path / "go"
    claimers = [subprocess.Popen([sys.executable, "-c", CLAIMER, postgres_url, "once-1", str(go)],
                                 cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    try:
        assert [claimer.stdout.readline().strip() for claimer in claimers] == ["ready", "ready"]
        go.touch()
        said = sorted(claimer.stdout.readline().strip() for claimer in claimers)
        assert said[0] == "claimed" and said[1].startswith("refused: run 'once-1' is running in process"), said
        winner = runs.get("once-1").pid
        assert winner in {claimer.pid for claimer in claimers}
        with pytest.raises(WorkflowError, match=f"is running in process {winner}"):
            runs.claim("once-1")  # a third object, in this process, while the winner lives
    finally:
        for claimer in claimers:
            claimer.communicate(timeout=30)
    assert runs.get("once-1").state == "interrupted"  # the winner has exited
    runs.claim("once-1")


def test_the_sqlite_log_of_a_file_from_before_hosts_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "workflows.sqlite"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, workflow TEXT, source TEXT, profile TEXT, spec TEXT, "
                    "inputs TEXT, status TEXT, step TEXT, pid INTEGER, pid_started REAL, created REAL, "
                    "updated REAL, error TEXT, question TEXT, outputs TEXT)")
        old.execute("INSERT INTO runs VALUES ('old-1', 'once', 'once.yaml', NULL, ?, '{}', 'done', NULL, NULL, "
                    "NULL, 1.0, 2.0, NULL, NULL, '{}')", (SPEC.model_dump_json(),))
    old.close()
    log = RunLog(path)
    try:
        assert (log.get("old-1").state, log.get("old-1").host) == ("done", None)
        log.claim("old-1")
        assert log.get("old-1").host == HOST
    finally:
        log.close()
    RunLog(path).close()  # opening it again changes nothing
