"""`signalgraph bench`: every benchmark against its baseline, in one process, as one report.

Writes `report.md` (the table, with the machine it ran on), `report.json` (rows and raw figures)
and a PNG per benchmark whose result and baseline are numbers, and prints the table. Each row is
`{"benchmark", "setting", "value", "unit", "baseline", "ratio"}`; `ratio` is value / baseline.

    decode      tokens/s against plain `generate` (agent/bench/decode.py)
    controller  the controller's overhead share of a turn; parallel tools and plan waves vs sequential
    retrieval   the knowledge base's search latency p50/p95 and recall@10 vs exact search, 10k and 100k chunks
    asr         the transcriber's real-time factor
    cold-start  `signalgraph serve` launch -> first token, vs the same turn once warm
    training    PT samples/s with cached encoder features vs the encoder in the loop
    injection   attack success and task utility with the injection defences on vs off (agent/bench/injection.py)
    load        (only when asked) concurrent streaming sessions against a real server
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from models.errors import ConfigError

SUITES = ["decode", "controller", "retrieval", "asr", "cold-start", "training", "injection", "load"]
DEFAULT = SUITES[:-1]  # the load test takes minutes of its own: `--only load` or `signalgraph bench load`


def _row(benchmark: str, setting: str, value, unit: str, baseline=None, ratio=None, **extra) -> dict:
    return {"benchmark": benchmark, "setting": setting, "value": value, "unit": unit, "baseline": baseline,
            "ratio": ratio, **extra}


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 4) if baseline else None


# --- the suites --------------------------------------------------------------------------------


def decode_rows(profile: str, quick: bool) -> tuple[list[dict], dict]:
    from agent.bench.decode import decode_benchmarks

    return decode_benchmarks(profile_name=profile, quick=quick), {}


def controller_rows(profile: str, quick: bool, work: Path, turns: int | None) -> tuple[list[dict], dict]:
    from agent.bench.controller import controller_overhead, parallel_tools, plan_waves

    turns = turns or (3 if quick else 50 if profile == "tiny" else 10)
    overhead = controller_overhead(turns, work, profile)
    parallel = parallel_tools(work)
    plan = plan_waves()
    per_turn = overhead["wall_s"] / overhead["turns"] * 1000
    rows = [
        _row("controller overhead", f"{turns} turns, {overhead['profile']}", overhead["per_turn_ms"],
             "ms a turn outside model and tools", round(per_turn, 1), overhead["overhead_ratio"],
             baseline_unit="ms a turn in all", ratio_as="percent"),
        _row("parallel tools", f"{parallel['calls']} slow tools ({parallel['slowest_s']} s slowest) in one step",
             parallel["turn_s"], "s", parallel["sum_s"], parallel["ratio_to_sequential"],
             baseline_unit="s one after another"),
        _row("parallel plan", f"{plan['tasks']} tasks in {plan['waves']} waves "
                              f"({plan['critical_path_s']} s critical path)",
             plan["wall_s"], "s", plan["sequential_s"], _ratio(plan["wall_s"], plan["sequential_s"]),
             baseline_unit="s one after another"),
    ]
    return rows, {"overhead": overhead, "parallel": parallel, "plan": plan}


def retrieval_rows(quick: bool, work: Path) -> tuple[list[dict], dict]:
    from agent.bench.retrieval import retrieval

    sizes, queries = ((1_000, 2_000), 20) if quick else ((10_000, 100_000), 100)
    rows, raw = [], {}
    for n in sizes:
        r = retrieval(n, work, queries=queries)
        raw[str(n)] = r
        setting = f"{n:,} chunks, {r['dim']}-d, {queries} queries"
        for q in ("p50", "p95"):
            rows.append(_row(f"retrieval latency {q}", setting, r[f"store_{q}_ms"], "ms",
                             r[f"exact_{q}_ms"], _ratio(r[f"store_{q}_ms"], r[f"exact_{q}_ms"]),
                             baseline_unit="ms numpy exact top-10"))
        rows.append(_row(f"retrieval recall@{r['k']}", setting, r["recall_at_k"], "", 1.0, r["recall_at_k"],
                         baseline_unit="exact search"))
    return rows, raw


def asr_rows(profile: str, quick: bool) -> tuple[list[dict], dict]:
    from agent.bench.asr import asr

    r = asr(profile, repeats=1 if quick else 3)
    setting = f"{r['transcriber']}, {r['clips']} clip{'s' * (r['clips'] > 1)} ({r['audio_s']} s of audio), " \
              f"{r['repeats']} pass{'es' * (r['repeats'] > 1)}"
    return [_row("ASR real-time factor", setting, r["rtf"], "x audio duration", 1.0, r["rtf"],
                 baseline_unit="(real time)")], r


def cold_start_rows(profile: str, work: Path) -> tuple[list[dict], dict]:
    from agent.bench.serving import cold_start

    r = cold_start(profile, work)
    return [
        _row("cold start: launch -> ready", f"signalgraph serve, {r['profile']}", r["ready_s"], "s",
             note="GET /v1/models answers; the backbone is loaded"),
        _row("cold start: launch -> first token", f"signalgraph serve, {r['profile']}", r["first_token_s"], "s",
             r["warm_first_token_s"], _ratio(r["first_token_s"], r["warm_first_token_s"]),
             baseline_unit="s first token of the same turn, warm"),
    ], r


def training_rows(profile: str, quick: bool) -> tuple[list[dict], dict]:
    import tempfile

    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from models.training.data import easy_vqa_manifest, read_manifest
    from models.training.throughput import pt_throughput

    base = "local-untrained" if profile == "local" else profile  # PT starts from untrained projectors
    batch_size, batches = (4, 1) if quick else (16, 4)
    with tempfile.TemporaryDirectory(prefix="sg-pt-throughput-") as tmp:
        records = read_manifest(easy_vqa_manifest("train", Path(tmp), limit=16 if quick else 256))
        # a model of its own: the measured steps train its projector
        mm = MMLLM.from_profile(load_profile(base), require_trained=False)
        r = pt_throughput(mm, records, Path(tmp) / "cache", batch_size=batch_size, batches=batches)
    cached, live = round(r.cached, 2), round(r.encoder_in_loop, 2)
    return [_row("PT throughput", f"{base}, easy-vqa, batch {batch_size}", cached, "samples/s, cached features",
                 live, _ratio(cached, live), baseline_unit="samples/s, encoder in the loop", batches=batches)], {}


def injection_rows(profile: str, quick: bool, work: Path) -> tuple[list[dict], dict]:
    from agent.bench.injection import measure

    backbones = ["obedient"] if quick else ["obedient", "model"]  # the model: ~50 turns of the backbone
    results = measure(profile, backbones, work / "injection")
    rows = []
    for backbone, by_guard in results.items():
        on, off = by_guard["on"], by_guard["off"]
        rate = lambda r, key, of: round(100 * r[key] / max(r[of], 1), 1)  # noqa: E731
        rows.append(_row("injection", f"{backbone}: attack success, defences on vs off",
                         rate(on, "attack_success", "injected_cases"), "%",
                         rate(off, "attack_success", "injected_cases"), cases=on["injected_cases"]))
        rows.append(_row("injection", f"{backbone}: utility under attack, defences on vs off",
                         rate(on, "utility_injected", "injected_cases"), "%",
                         rate(off, "utility_injected", "injected_cases")))
        rows.append(_row("injection", f"{backbone}: utility on clean notes, defences on vs off",
                         rate(on, "utility_clean", "clean_cases"), "%", rate(off, "utility_clean", "clean_cases")))
    return rows, {b: {g: {k: v for k, v in r.items() if k != "rows"} for g, r in by.items()}
                  for b, by in results.items()}


def load_rows(profile: str, quick: bool, work: Path, sessions: int, seconds: float) -> tuple[list[dict], dict]:
    from agent.bench.load import load_test, plot_rss

    if quick:
        sessions, seconds = min(sessions, 4), min(seconds, 3.0)
    r = load_test(profile, work, sessions=sessions, seconds=seconds)
    plot_rss(r, work.parent / "load_rss.png")
    setting = f"{sessions} streaming sessions, {seconds:g} s, {r['profile']}"
    return [
        _row("load: turns/s", setting, r["turns_per_s"], "turns/s", note=f"{r['ok_turns']} turns"),
        _row("load: 5xx + stream errors", setting, r["server_errors"] + r["stream_errors"], "", 0),
        _row("load: cross-session leaks", setting, r["reply_leaks"] + r["history_leaks"] + r["history_mismatches"],
             "", 0),
        _row("load: latency p50 / p95", setting, r["latency_p50_s"], "s", note=f"p95 {r['latency_p95_s']} s"),
        _row("load: server RSS start / peak / end", setting, r["rss_end_mib"], "MiB",
             note=f"start {r['rss_start_mib']}, peak {r['rss_peak_mib']}, "
                  f"slope {r['rss_slope_mib_per_min']:+.1f} MiB/min"),
    ], r


# --- writing -----------------------------------------------------------------------------------


def machine() -> dict:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[2], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu, "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "torch": torch.__version__, "commit": commit,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _cells(row: dict) -> list[str]:
    if row["value"] is None:
        return [row["benchmark"], row["setting"], row.get("error") or "not measured", "—", "—"]
    value = f"{_number(row['value'])} {row['unit']}".strip()
    if row.get("note"):
        value += f" ({row['note']})"
    if row.get("of_memory_limit") is not None:  # decode rows: how near the weights' read time they come
        value += (f", {row['of_memory_limit']:.0%} of its memory limit ({_number(row['memory_limit_tokens_s'])} "
                  f"tokens/s: {_number(row['bytes_per_token_mb'])} MB a token at {row['read_bandwidth_gb_s']} GB/s)")
    baseline = "—" if row["baseline"] is None else \
        f"{_number(row['baseline'])} {row.get('baseline_unit', row['unit'])}".strip()
    if row["ratio"] is None:
        ratio = "—"
    elif row.get("ratio_as") == "percent":
        ratio = f"{row['ratio']:.2%}"
    else:
        ratio = f"{row['ratio']:.3g}x"
    return [row["benchmark"], row["setting"], value, baseline, ratio]


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | setting | result | baseline | ratio |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: Path) -> list[str]:
    """One bar chart per benchmark whose rows have a numeric result and baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for row in rows:
        numeric = isinstance(row["value"], (int, float)) and isinstance(row["baseline"], (int, float))
        if numeric and row["baseline"] and not row["benchmark"].startswith("load"):  # load: its RSS plot
            groups.setdefault(row["benchmark"], []).append(row)
    written = []
    for name, members in groups.items():
        fig, ax = plt.subplots(figsize=(7, 0.6 + 0.7 * len(members)))
        y = range(len(members))
        ax.barh([i + 0.2 for i in y], [r["value"] for r in members], height=0.4, label="result")
        ax.barh([i - 0.2 for i in y], [r["baseline"] for r in members], height=0.4, label="baseline")
        ax.set_yticks(list(y), [r["setting"][:48] for r in members], fontsize=8)
        ax.set_xlabel(members[0]["unit"] or "value")
        ax.set_title(name)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def run(out: str, profile: str | None, *, only: list[str] | None = None, quick: bool = False,
        turns: int | None = None, sessions: int = 32, seconds: float = 120.0) -> int:
    from tqdm import tqdm

    unknown = sorted(set(only or []) - set(SUITES))
    if unknown:
        raise ConfigError(f"no benchmark suite named {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    profile = profile or os.environ.get("SIGNALGRAPH_PROFILE") or ("tiny" if quick else "local")
    chosen = [s for s in SUITES if s in (only or DEFAULT)]
    out_dir = Path(out)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    jobs = {"decode": lambda: decode_rows(profile, quick),
            "controller": lambda: controller_rows(profile, quick, work, turns),
            "retrieval": lambda: retrieval_rows(quick, work),
            "asr": lambda: asr_rows(profile, quick),
            "cold-start": lambda: cold_start_rows(profile, work),
            "training": lambda: training_rows(profile, quick),
            "injection": lambda: injection_rows(profile, quick, work),
            "load": lambda: load_rows(profile, quick, work, sessions, seconds)}
    rows, raw, seconds_taken = [], {}, {}
    failed = []
    for name in tqdm(chosen, desc="benchmarks", unit="suite"):
        start = time.perf_counter()
        try:
            suite_rows, raw[name] = jobs[name]()
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not lose the others' figures
            failed.append(name)
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            suite_rows, raw[name] = [_row(name, "failed", None, "", error=message)], {"error": message}
        seconds_taken[name] = round(time.perf_counter() - start, 1)
        rows += suite_rows
        tqdm.write(f"== {name} ({seconds_taken[name]} s)\n" + table(suite_rows))
    host = machine()
    plots = plot(rows, out_dir)
    text = table(rows)
    header = (f"Profile `{profile}`{' (quick)' if quick else ''}; {host['cpu']}, {host['cores']} cores, "
              f"{host['memory_gib']} GiB, GPU: {host['gpu']}; torch {host['torch']} on {host['torch_threads']} "
              f"thread(s); commit {host['commit']}, {host['date']}. Ratio = result / baseline.")
    (out_dir / "report.md").write_text(f"# Benchmarks\n\n{header}\n\n{text}\n")
    (out_dir / "report.json").write_text(json.dumps({"profile": profile, "quick": quick, "machine": host,
                                                     "seconds": seconds_taken, "rows": rows, "raw": raw,
                                                     "plots": plots}, indent=1, default=str))
    print(f"\n{header}\n\n{text}\n\nwritten to {out_dir / 'report.md'} (and report.json, {len(plots)} plots)")
    if failed:
        print(f"error: {', '.join(failed)} failed (see the table)", file=sys.stderr)
    return 1 if failed else 0
