"""Retrieval: the knowledge base's search latency and recall@10 at 10k and 100k chunks, against an
exact top-10 by brute force in numpy over the same vectors.

The store searches a sqlite-vec `vec0` table, which scans every vector (there is no approximate
index), so its top-10 is exact by construction and recall@10 measures that it stays so (float
ties aside). The vectors are synthetic, clustered unit vectors of MiniLM's width (384): embedding
100k real chunks would take this CPU many minutes and is not what is measured here. Latency is
the store's `similarity_search_with_score_by_vector` (query vector given), SQLite join included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from langchain_core.embeddings import Embeddings

DIM = 384

T = TypeVar("T")


class _Stored(Embeddings):
    """The vectors of a synthetic corpus, looked up by text ("chunk-17" -> row 17).

    Stands in for a sentence embedder only to fill the store; the search is the thing measured."""

    name = "synthetic-clustered"

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.vectors[[int(t.rsplit("-", 1)[1]) for t in texts]].tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def corpus(n: int, queries: int, seed: int = 0, clusters: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit vectors around `clusters` topics, and `queries` unit vectors near the same topics."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)

    def around(count: int, spread: float) -> np.ndarray:
        points = centres[rng.integers(0, clusters, count)] + spread * rng.standard_normal((count, DIM))
        return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)

    return around(n, 0.8), around(queries, 0.8)


def exact_top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k highest cosine similarities (the vectors are unit length)."""
    scores = vectors @ query
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def timed_ms(call: Callable[[], T]) -> tuple[T, float]:
    """What `call()` returns, and how long it took in milliseconds: a search's latency."""
    start = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - start) * 1000


def retrieval(n: int, work_dir: Path, *, queries: int = 100, k: int = 10, progress: bool = True) -> dict:
    from tqdm import tqdm

    from tools.knowledge_base import KnowledgeBase

    vectors, probes = corpus(n, queries)
    path = Path(work_dir) / f"retrieval-{n}.sqlite"
    path.unlink(missing_ok=True)
    kb = KnowledgeBase(path, _Stored(vectors))
    try:
        batch = 5000
        start = time.perf_counter()
        for first in tqdm(range(0, n, batch), desc=f"filling {n:,} chunks", unit="batch", disable=not progress):
            texts = [f"chunk-{i}" for i in range(first, min(first + batch, n))]
            kb.add_texts(texts, ids=texts)
        fill_s = time.perf_counter() - start
        kb.similarity_search_with_score_by_vector(probes[0].tolist(), k=k)  # page the table in once
        store_ms, exact_ms, recalls = [], [], []
        for probe in tqdm(probes, desc=f"searching {n:,}", unit="query", disable=not progress):
            query = probe.tolist()
            hits, ms = timed_ms(lambda: kb.similarity_search_with_score_by_vector(query, k=k))
            store_ms.append(ms)
            truth, ms = timed_ms(lambda: exact_top_k(vectors, probe, k))
            exact_ms.append(ms)
            found = {int(doc.page_content.rsplit("-", 1)[1]) for doc, _ in hits}
            recalls.append(len(found & set(truth.tolist())) / k)
    finally:
        kb.close()
    size_mb = path.stat().st_size / 2**20
    path.unlink(missing_ok=True)
    return {"chunks": n, "queries": queries, "k": k, "dim": DIM, "fill_s": round(fill_s, 2),
            "file_mib": round(size_mb, 1), "store_p50_ms": round(float(np.percentile(store_ms, 50)), 3),
            "store_p95_ms": round(float(np.percentile(store_ms, 95)), 3),
            "exact_p50_ms": round(float(np.percentile(exact_ms, 50)), 3),
            "exact_p95_ms": round(float(np.percentile(exact_ms, 95)), 3),
            "recall_at_k": round(float(np.mean(recalls)), 4)}
