"""`signalgraph bench load`: many concurrent streaming sessions against a real `signalgraph serve`,
or against several replicas of it on one Postgres database (`--replicas N`), where each session's
turns go to the replicas in turn, so every turn runs on another process than the last.

Bounded in time and turns, loopback only. Each session writes a nonce of its own into every turn;
a fault is any 5xx, any error sent inside a stream, a reply or stored history that holds another
session's nonce, or a stored history that is not exactly the turns the session sent. The server's
resident memory is sampled throughout: start, peak, end and the slope over the run say whether it
is stable.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from pathlib import Path

import numpy as np

from agent.bench.serving import ServeProcess, session_turns, stream_turn, stream_turn_async
from models.errors import ConfigError

MiB = 2**20


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over the second half of the run (the first half holds the
    allocator's and the caches' warm-up); near zero when memory is stable."""
    tail = samples[len(samples) // 2:]
    if len(tail) < 3:
        return 0.0
    t = np.array([s[0] for s in tail])
    rss = np.array([s[1] for s in tail]) / MiB
    return round(float(np.polyfit(t, rss, 1)[0] * 60), 3)


async def _drive(servers: list[ServeProcess], sessions: int, seconds: float, min_turns: int,
                 sample_every: float, progress: bool) -> dict:
    import httpx
    from tqdm import tqdm

    nonces = [secrets.token_hex(4) for _ in range(sessions)]
    names = [f"load-{i}-{n}" for i, n in enumerate(nonces)]
    sent: dict[str, list[str]] = {name: [] for name in names}
    turns: list[dict] = []
    samples: list[tuple[float, int]] = []
    start = time.perf_counter()
    deadline = start + seconds

    def foreign(text: str, own: str) -> list[str]:
        return [n for n in nonces if n != own and n in text]

    async def session(index: int, client: httpx.AsyncClient) -> None:
        name, nonce = names[index], nonces[index]
        k = 0
        while k < min_turns or time.perf_counter() < deadline:
            text = f"Session {nonce}, turn {k}: please repeat the code {nonce}-{k}."
            sent[name].append(text)
            try:
                server = servers[(index + k) % len(servers)]  # the session moves on every turn
                turn = await stream_turn_async(client, server.url, server.model, name, text)
                record = {"session": index, "status": turn.status, "seconds": turn.seconds,
                          "first_token_s": turn.first_token_s, "error": turn.error, "finished": turn.finished,
                          "leaked": foreign(turn.text, nonce), "wrong_session": turn.session != name}
            except httpx.HTTPError as exc:  # a dropped connection is a fault too, not a crash of the driver
                record = {"session": index, "status": 0, "seconds": 0.0, "first_token_s": None,
                          "error": f"{type(exc).__name__}: {exc}", "finished": False, "leaked": [],
                          "wrong_session": False}
            record["at"] = time.perf_counter() - start
            turns.append(record)
            k += 1

    finished = asyncio.Event()

    async def sampler() -> None:
        # on until the last turn ends: the turns still queued at the deadline are load too
        with tqdm(total=round(seconds), desc=f"load: {sessions} sessions", unit="s", disable=not progress) as bar:
            while not finished.is_set():
                now = time.perf_counter() - start
                samples.append((now, sum(server.rss() for server in servers)))
                bar.n = min(round(now), bar.total)
                bar.set_postfix(turns=len(turns), rss=f"{samples[-1][1] / MiB:.0f}MiB", refresh=True)
                try:
                    await asyncio.wait_for(finished.wait(), sample_every)
                except TimeoutError:
                    pass

    async def all_sessions(client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(session(i, client) for i in range(sessions)))
        finished.set()

    limits = httpx.Limits(max_connections=sessions + 4, max_keepalive_connections=sessions + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600, connect=30)) as client:
        await asyncio.gather(sampler(), all_sessions(client))
    samples.append((time.perf_counter() - start, sum(server.rss() for server in servers)))
    return {"nonces": nonces, "names": names, "sent": sent, "turns": turns, "samples": samples,
            "wall_s": time.perf_counter() - start}


def _check_histories(server: ServeProcess, run: dict) -> tuple[list[str], list[str]]:
    """Each stored history must be exactly the turns its session sent, holding no other nonce."""
    mismatched, leaked = [], []
    for name, nonce in zip(run["names"], run["nonces"]):
        stored = session_turns(server.url, name)
        if [t["user"] for t in stored] != run["sent"][name]:
            mismatched.append(name)
        text = json.dumps([[t["user"], t["assistant"]] for t in stored])
        if any(other != nonce and other in text for other in run["nonces"]):
            leaked.append(name)
    return mismatched, leaked


def load_test(profile: str, work_dir: Path, *, sessions: int = 32, seconds: float = 120.0,
              min_turns: int = 1, sample_every: float = 1.0, progress: bool = True,
              replicas: int = 1, database: str | None = None) -> dict:
    """Run the load test against fresh servers; returns the figures (see the module doc). With
    several replicas, `database` is their shared Postgres (it must be empty of these sessions)."""
    if sessions < 1 or seconds <= 0 or replicas < 1:
        raise ConfigError(f"the load test needs at least 1 session, 1 replica and some seconds (got {sessions}, "
                          f"{replicas}, {seconds:g})")
    if replicas > 1 and database is None:
        raise ConfigError("several replicas share their sessions only through a Postgres database: give --database")
    data = Path(work_dir) / f"load-{Path(profile).stem}"
    shutil.rmtree(data, ignore_errors=True)  # every run starts from empty sessions
    config = {"database": database} if database else None
    servers = [ServeProcess(data / f"replica-{i}", profile, queue=sessions, config=config) for i in range(replicas)]
    try:
        for server in servers:
            server.start()
        ready_s = max(server.wait_ready() for server in servers)
        for server in servers:
            stream_turn(server.url, server.model, f"load-warm-up-{server.port}", "hello")  # first use is not load
        run = asyncio.run(_drive(servers, sessions, seconds, min_turns, sample_every, progress))
        mismatched, history_leaks = _check_histories(servers[-1], run)
        alive = all(server.process.poll() is None for server in servers)
    finally:
        for server in servers:
            server.stop()
    server = servers[0]
    turns, samples = run["turns"], run["samples"]
    ok = [t for t in turns if t["status"] == 200 and not t["error"] and t["finished"]]
    statuses: dict[str, int] = {}
    for t in turns:
        statuses[str(t["status"])] = statuses.get(str(t["status"]), 0) + 1
    rss = [s[1] for s in samples]
    return {
        "profile": server.model.removeprefix("signalgraph-"), "sessions": sessions, "seconds": seconds,
        "replicas": replicas, "database": "postgres" if database else "sqlite",
        "ready_s": round(ready_s, 3), "wall_s": round(run["wall_s"], 3), "turns": len(turns), "ok_turns": len(ok),
        "turns_per_s": round(len(ok) / run["wall_s"], 3), "statuses": statuses,
        "server_errors": sum(1 for t in turns if t["status"] >= 500 or t["status"] == 0),
        "stream_errors": sum(1 for t in turns if t["status"] == 200 and (t["error"] or not t["finished"])),
        "reply_leaks": sum(1 for t in turns if t["leaked"] or t["wrong_session"]),
        "history_mismatches": len(mismatched), "history_leaks": len(history_leaks),
        "min_turns_per_session": min((len(v) for v in run["sent"].values()), default=0),
        "latency_p50_s": _percentile([t["seconds"] for t in ok], 50),
        "latency_p95_s": _percentile([t["seconds"] for t in ok], 95),
        "first_token_p50_s": _percentile([t["first_token_s"] for t in ok if t["first_token_s"] is not None], 50),
        "first_token_p95_s": _percentile([t["first_token_s"] for t in ok if t["first_token_s"] is not None], 95),
        "rss_start_mib": round(rss[0] / MiB, 1), "rss_peak_mib": round(max(rss) / MiB, 1),
        "rss_end_mib": round(rss[-1] / MiB, 1), "rss_slope_mib_per_min": _slope_mib_per_min(samples),
        "server_alive": alive, "errors": sorted({t["error"] for t in turns if t["error"]})[:5],
        "rss_samples": [(round(t, 2), round(r / MiB, 1)) for t, r in samples],
    }


def plot_rss(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, rss = zip(*result["rss_samples"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(t, rss)
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"{result['sessions']} streaming sessions, {result['profile']} profile: "
                 f"{result['rss_slope_mib_per_min']:+.1f} MiB/min")
    ax.set_ylim(0, max(rss) * 1.1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def passed(result: dict) -> bool:
    return (result["server_errors"] == 0 and result["stream_errors"] == 0 and result["reply_leaks"] == 0
            and result["history_mismatches"] == 0 and result["history_leaks"] == 0 and result["server_alive"])


def run(out: str, profile: str | None, *, sessions: int, seconds: float, replicas: int = 1,
        database: str | None = None) -> int:
    """`signalgraph bench load`: the test, then load.json and load_rss.png under `out`. Several
    replicas without `database` run on an embedded Postgres started here (the test extra)."""
    import os
    from contextlib import ExitStack

    profile = profile or os.environ.get("SIGNALGRAPH_PROFILE") or "local"
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if replicas > 1 and database is None:
            from agent.bench.postgres import embedded_postgres

            database = stack.enter_context(embedded_postgres("load-replicas-"))
        if database is not None:
            from tools.database import Database

            shared = Database(database)
            shared.upgrade()
            shared.close()
        result = load_test(profile, out_dir / "work", sessions=sessions, seconds=seconds, replicas=replicas,
                           database=database)
    name = "load" if replicas == 1 else f"load-{replicas}-replicas"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot_rss(result, out_dir / f"{name}_rss.png")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=1))
    print("PASS" if passed(result) else "FAIL", f"(written to {out_dir / f'{name}.json'})")
    return 0 if passed(result) else 1

