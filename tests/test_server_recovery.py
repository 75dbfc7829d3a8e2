"""Killing `signalgraph serve` with SIGKILL in the middle of a streamed turn loses nothing that was
persisted: restarted on the same data folder, the session holds every completed turn, not the
killed one (no half-written turn), and the next turn continues from the last completed one.

A real server process on the tiny profile, real HTTP over loopback, the real SQLite checkpoints.
The killed turn is made long (many tokens to decode), so the kill lands while it runs."""

from __future__ import annotations

import sqlite3

import httpx

from agent.bench.serving import ServeProcess, session_turns, stream_turn

SESSION = "kept-across-a-crash"


def test_a_kill_mid_stream_keeps_every_completed_turn_and_the_next_turn_continues(tmp_path):
    data = tmp_path / "data"
    config = {"max_new_tokens": 600}  # about a second of decoding per turn on the tiny model
    server = ServeProcess(data, "tiny", config=config)
    try:
        server.start()
        server.wait_ready()
        replies = []
        for text in ("first turn", "second turn"):
            turn = stream_turn(server.url, server.model, SESSION, text)
            assert turn.status == 200 and turn.finished and turn.error is None
            replies.append(turn.text)
        assert [t["user"] for t in session_turns(server.url, SESSION)] == ["first turn", "second turn"]

        # the third turn: kill the server as soon as its stream has opened (the turn is decoding)
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                          headers={"X-Session-Id": SESSION},
                          json={"model": server.model, "stream": True,
                                "messages": [{"role": "user", "content": "third turn, never finished"}]}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"role": "assistant"' in first
            server.kill()
            try:
                rest = "".join(lines)
            except httpx.HTTPError:  # the connection died with the process
                rest = ""
        assert "[DONE]" not in rest and server.process.returncode == -9  # killed before the turn ended
    finally:
        server.kill()

    # the session database is whole: no torn page, nothing of the killed turn
    with sqlite3.connect(data / "sessions.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    restarted = ServeProcess(data, "tiny", config=config)
    try:
        restarted.start()
        restarted.wait_ready()
        turns = session_turns(restarted.url, SESSION)
        assert [t["user"] for t in turns] == ["first turn", "second turn"]
        assert [t["assistant"] for t in turns] == [r.strip() for r in replies]
        assert all(t["trace"][-1]["step"] == "respond" for t in turns)  # each stored turn ran to its end

        after = stream_turn(restarted.url, restarted.model, SESSION, "fourth turn")
        assert after.status == 200 and after.finished and after.error is None
        assert [t["user"] for t in session_turns(restarted.url, SESSION)] == ["first turn", "second turn",
                                                                                "fourth turn"]
    finally:
        restarted.stop()
