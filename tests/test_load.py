"""A short load test against a real `signalgraph serve` on the tiny profile: 8 streaming sessions
for a few seconds, each writing its own nonce. No 5xx, no error inside a stream, and no session
sees another's words, in its replies or in its stored history. (`signalgraph bench load` runs the
long version: 32 sessions for 2 minutes.)"""

from __future__ import annotations

from agent.bench.load import load_test, passed


def test_concurrent_streaming_sessions_get_no_5xx_and_only_their_own_content(tmp_path):
    result = load_test("tiny", tmp_path, sessions=8, seconds=4, min_turns=2, sample_every=0.5, progress=False)
    assert result["server_errors"] == 0 and result["stream_errors"] == 0, result["errors"]
    assert result["statuses"] == {"200": result["turns"]}
    assert result["reply_leaks"] == 0 and result["history_leaks"] == 0
    # every session's stored history is exactly the turns it sent, in order, and each got several
    assert result["history_mismatches"] == 0 and result["min_turns_per_session"] >= 2
    assert result["server_alive"] and passed(result)
    assert len(result["rss_samples"]) >= 3  # the server's memory was sampled through the run
