"""The shared database: URL rules, versioned migrations on a real Postgres, the schema check."""

from __future__ import annotations

import threading

import pytest

from models.errors import ConfigError
from tools.database import DATABASE_ENV, Database, SchemaOutOfDateError, database_url, migrations


def test_sqlite_stays_the_default_and_only_postgres_urls_are_taken(monkeypatch):
    monkeypatch.delenv(DATABASE_ENV, raising=False)
    assert database_url(None) is None
    monkeypatch.setenv(DATABASE_ENV, "postgresql://u:secret@db/x")
    assert database_url(None) == "postgresql://u:secret@db/x"
    assert database_url("postgresql://a@b/c") == "postgresql://a@b/c"  # the config wins over the environment
    with pytest.raises(ConfigError, match="not a postgresql:// URL") as caught:
        database_url("mysql://u:secret@db/x")
    assert "secret" not in str(caught.value)


def test_migrations_are_numbered_files_in_order():
    found = migrations()
    assert [m.version for m in found] == sorted({m.version for m in found}) and found[0].version == 1
    assert all(m.sql.strip() for m in found)


def test_an_empty_database_is_refused_until_upgraded_then_upgrading_again_changes_nothing(postgres_url):
    db = Database(postgres_url)
    try:
        assert db.version() == 0
        with pytest.raises(SchemaOutOfDateError, match="signalgraph db upgrade"):
            db.check()
        before, after = db.upgrade()
        newest = migrations()[-1].version
        assert (before, after) == (0, newest) and db.check() == newest
        assert db.upgrade() == (newest, newest)
        with db.connection() as conn:
            assert conn.execute("SELECT extname FROM pg_extension WHERE extname = 'vector'").fetchone()
    finally:
        db.close()


def test_processes_upgrading_at_once_apply_each_migration_once(postgres_url):
    results, errors = [], []

    def upgrade():
        db = Database(postgres_url)
        try:
            results.append(db.upgrade())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    newest = migrations()[-1].version
    assert sorted(results)[0] == (0, newest) and all(after == newest for _, after in results)
    db = Database(postgres_url)
    with db.connection() as conn:
        rows = conn.execute("SELECT version FROM signalgraph_migrations ORDER BY version").fetchall()
    db.close()
    assert [r["version"] for r in rows] == [m.version for m in migrations()]


def test_sessions_and_workflow_runs_are_checkpointed_apart(postgres_url):
    from langgraph.graph import END, START, MessagesState, StateGraph

    db = Database(postgres_url)
    db.upgrade()
    try:
        graph = StateGraph(MessagesState)
        graph.add_node("echo", lambda state: {"messages": [("ai", "hi")]})
        graph.add_edge(START, "echo")
        graph.add_edge("echo", END)
        for name, thread in (("sessions", "alice"), ("workflows", "report-1a2b")):
            compiled = graph.compile(checkpointer=db.checkpointer(name))
            compiled.invoke({"messages": [("user", "hello")]}, {"configurable": {"thread_id": thread}})
        assert db.threads("sessions") == ["alice"] and db.threads("workflows") == ["report-1a2b"]
    finally:
        db.close()


def test_an_unreachable_database_is_a_clear_error():
    from tools.database import DatabaseError

    db = Database("postgresql://nobody:pw@127.0.0.1:1/none?connect_timeout=1")
    with pytest.raises(DatabaseError, match="cannot connect") as caught:
        db.version()
    assert "pw@" not in str(caught.value)
