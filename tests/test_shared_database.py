"""Several processes on one Postgres database: the runtime refuses an old schema, and sessions
started in one runtime (a replica) continue in another with the whole history."""

from __future__ import annotations

import pytest

from agent.config import AgentConfig
from agent.runtime import Runtime
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult
from tools.database import Database, SchemaOutOfDateError


def replica(tmp_path, name, url, profile, *replies) -> Runtime:
    """A runtime with its own empty data folder, on the shared database."""
    config = AgentConfig(data_dir=tmp_path / name, allowed_dirs=[tmp_path], database=url)
    return Runtime(config, profile, thinker=ScriptedThinker(*(ThinkResult(text) for text in replies)))


def test_a_database_on_an_older_schema_is_refused_with_the_command_that_fixes_it(tmp_path, postgres_url, tiny_profile):
    with pytest.raises(SchemaOutOfDateError, match=r"version 0.*run `signalgraph db upgrade`"):
        replica(tmp_path, "a", postgres_url, tiny_profile)


def test_a_session_moves_between_replicas_with_its_whole_history(tmp_path, postgres_url, tiny_profile):
    Database(postgres_url).upgrade()
    a = replica(tmp_path, "a", postgres_url, tiny_profile, "Nice to meet you, Ada.")
    b = replica(tmp_path, "b", postgres_url, tiny_profile, "You are Ada.")
    try:
        a.controller.turn("ada", "Hello, I am Ada.")
        assert b.controller.turn("ada", "Who am I?").text == "You are Ada."
        shown = [m.text for m in b.thinker.seen[0]["messages"]]
        assert shown == ["Hello, I am Ada.", "Nice to meet you, Ada.", "Who am I?"]  # history from replica a
        assert a.controller.sessions() == b.controller.sessions() == ["ada"]
        assert not (tmp_path / "b" / "sessions.sqlite").exists()  # nothing of it in the replica's own folder
        b.controller.delete_session("ada")
        assert a.controller.sessions() == []
    finally:
        a.close()
        b.close()
