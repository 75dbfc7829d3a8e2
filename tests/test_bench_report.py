"""`signalgraph bench --quick`: the report's parts run against their baselines and land in
report.md, report.json and PNG plots (small sizes, tiny profile: a check that it runs, not figures)."""

from __future__ import annotations

import json

from agent.bench.report import table
from agent.cli.main import main


def test_the_quick_report_writes_the_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["--profile", "tiny", "bench", "--quick", "--out", str(out),
                 "--only", "retrieval", "--only", "asr", "--only", "cold-start", "--only", "training"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    names = [row["benchmark"] for row in report["rows"]]
    assert names == ["retrieval latency p50", "retrieval latency p95", "retrieval recall@10"] * 2 + \
        ["ASR real-time factor", "cold start: launch -> ready", "cold start: launch -> first token", "PT throughput"]
    # the store scans every vector: its top-10 is the exact top-10
    assert all(row["value"] == 1.0 for row in report["rows"] if row["benchmark"] == "retrieval recall@10")
    for row in report["rows"]:
        assert row["value"] > 0
        if row["baseline"]:
            assert row["ratio"] == round(row["value"] / row["baseline"], 4)
    cold = report["raw"]["cold-start"]
    assert cold["first_token_s"] >= cold["ready_s"] > cold["warm_first_token_s"] > 0  # loaded once, at start
    assert report["machine"]["cores"] >= 1 and report["profile"] == "tiny"
    text = (out / "report.md").read_text()
    assert "| retrieval recall@10 | 1,000 chunks" in text and "cores" in text
    assert {"retrieval-latency-p50.png", "asr-real-time-factor.png"} <= set(report["plots"])
    assert all((out / name).stat().st_size > 1000 for name in report["plots"])
    assert "| ASR real-time factor |" in capsys.readouterr().out


def test_a_missing_measurement_reads_not_measured_and_shares_as_percent():
    rows = [{"benchmark": "decode tokens/s", "setting": "not measured", "value": None, "unit": "", "baseline": None,
             "ratio": None},
            {"benchmark": "controller overhead", "setting": "3 turns", "value": 5.0, "unit": "ms", "baseline": 50.0,
             "ratio": 0.1, "ratio_as": "percent", "baseline_unit": "ms a turn in all"}]
    lines = table(rows).splitlines()
    assert lines[2] == "| decode tokens/s | not measured | not measured | — | — |"
    assert lines[3] == "| controller overhead | 3 turns | 5 ms | 50 ms a turn in all | 10.00% |"


def test_an_unknown_suite_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: no benchmark suite named nope; choose from decode, controller, "
                                               "retrieval, asr, cold-start, training, injection, load")


def test_a_failing_benchmark_is_a_row_with_its_error_and_the_report_still_lands(tmp_path, capsys):
    profile = tmp_path / "no-asr.yaml"
    profile.write_text("extends: tiny\ntranscriber: null\n")
    assert main(["--profile", str(profile), "bench", "--only", "asr", "--out", str(tmp_path / "out")]) == 1
    row = json.loads((tmp_path / "out" / "report.json").read_text())["rows"][0]
    assert row["setting"] == "failed" and "has no transcriber" in row["error"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| asr | failed | ConfigError: profile 'no-asr' has no transcriber" in text
    assert capsys.readouterr().err.strip().endswith("error: asr failed (see the table)")
