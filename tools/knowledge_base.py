"""The knowledge base: a LangChain `VectorStore` in one SQLite file, searched with sqlite-vec.

Two tables in one file:

- `chunks(rowid, id, text, metadata)` — the text, its metadata as JSON and the caller's string id;
- `vec_chunks`, a sqlite-vec `vec0` table (`float[dim]`, cosine distance) whose rowids are the
  `chunks` rowids.

The vector table is created on the first write, with the dimension of the vectors the embeddings
produce, and the dimension (with the embeddings' name) is recorded in `kb_meta`; opening the file
later with embeddings of another dimension is refused with a `KnowledgeBaseError` rather than
returning nonsense.

Scores: `similarity_search_with_score` returns the **cosine similarity** (higher is closer, in
[-1, 1]); `similarity_search_with_relevance_scores` maps it to [0, 1] as `(1 + similarity) / 2`.

Filters (`filter=` on every search): a dict is an exact match on metadata keys (every key present
and equal), or a callable `Document -> bool`. Filters are applied after the vector search, which
is oversampled (k × 4, then × 4 again, …) until k matching chunks are found or the store is
exhausted, so a filtered search still returns k results whenever k chunks match.

One connection per store, shared across threads under a lock (LangChain's async methods run the
sync ones in an executor thread); `":memory:"` gives a private in-memory store.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from models.errors import SignalgraphError
from tools.untrusted import redact

if hasattr(sqlite3.Connection, "enable_load_extension"):
    _sqlite = sqlite3
else:  # a Python built without extension loading (pyenv's default): use the bundled SQLite
    try:
        import pysqlite3.dbapi2 as _sqlite  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover - depends on the platform
        _sqlite = None  # type: ignore[assignment]

Filter = dict[str, Any] | Callable[[Document], bool]

SCHEMA_VERSION = "1"
_VEC_K_MAX = 4096  # sqlite-vec refuses a larger k in one KNN query
_OVERSAMPLE = 4
_SQL_VARS = 500  # ids per IN (...) clause, under SQLite's variable limit


class KnowledgeBaseError(SignalgraphError):
    """The knowledge base file cannot be used as asked (not a knowledge base, other embeddings, …)."""


def _embedding_name(embedding: Embeddings) -> str:
    for attr in ("name", "model_name", "model"):
        value = getattr(embedding, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(embedding).__name__


def _matches(doc: Document, filter: Filter | None) -> bool:  # noqa: A002
    if filter is None:
        return True
    if callable(filter):
        return bool(filter(doc))
    return all(key in doc.metadata and doc.metadata[key] == value for key, value in filter.items())


def _batches(items: Sequence[Any], size: int = _SQL_VARS) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _ChunkStore(VectorStore):
    """What the SQLite and the Postgres knowledge bases share: the argument checks and embedding of
    a write, and the searches built on a store's `_search`; each store keeps only its storage."""

    embedding: Embeddings

    @abstractmethod
    def close(self) -> None:
        """Release what the store holds."""

    @abstractmethod
    def _write(self, ids: list[str], texts: list[str], metadatas: list[str], vectors: np.ndarray) -> None:
        """Upsert the chunks (one id, text, JSON metadata and vector each; of an id given twice, the last wins)."""

    @abstractmethod
    def _search(
        self, embedding: Sequence[float], k: int, filter: Filter | None  # noqa: A002
    ) -> list[tuple[Document, float, Any]]:
        """(document, cosine distance, the store's row handle) of the k nearest chunks that match, nearest first."""

    @abstractmethod
    def _nearest_with_vectors(
        self, embedding: Sequence[float], k: int, filter: Filter | None  # noqa: A002
    ) -> list[tuple[Document, np.ndarray]]:
        """The k nearest chunks that match, nearest first, each with its stored vector (for MMR)."""

    @abstractmethod
    def ids_where(self, filter: Filter) -> list[str]:  # noqa: A002
        """Ids of the chunks whose metadata matches `filter` (same rules as the search filter)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing -------------------------------------------------------------------------------

    @property
    def embeddings(self) -> Embeddings:
        return self.embedding

    def _vectors(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self.embedding.embed_documents(texts), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise KnowledgeBaseError(
                f"the embeddings {_embedding_name(self.embedding)!r} returned {vectors.shape} for "
                f"{len(texts)} texts; expected one vector per text"
            )
        return vectors

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Embed and store texts; an id that is already stored is replaced (upsert), not duplicated.
        Sentences that address the agent (tools/untrusted.py) do not count towards a text's vector.

        Ids that are missing or None are generated (uuid4 hex). Metadata is stored as JSON; values
        JSON cannot hold (a `Path`, a datetime) are stored as their `str()`.
        """
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"got {len(metadatas)} metadatas for {len(texts)} texts; give one per text")
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} texts; give one per text")
        if not texts:
            return []
        final_ids = [str(i) if i else uuid.uuid4().hex for i in (ids or [None] * len(texts))]
        rows = [
            json.dumps(dict(metadata or {}), ensure_ascii=False, default=str)
            for metadata in (metadatas or [{}] * len(texts))
        ]
        # before `_write` takes the store's lock: embedding is the slow part. An instruction planted
        # in a chunk is not what the chunk is about: it is left out of the vector (and kept in the
        # stored text)
        vectors = self._vectors([redact(t, note="") or t for t in texts])
        self._write(final_ids, texts, rows, vectors)
        return final_ids

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """Store documents; `ids=` wins over each `Document.id`, and a missing id is generated."""
        ids = kwargs.pop("ids", None)
        if ids is None:
            ids = [doc.id for doc in documents]
        return self.add_texts(
            [doc.page_content for doc in documents], [doc.metadata for doc in documents], ids=ids, **kwargs
        )

    def delete_where(self, filter: Filter) -> int:  # noqa: A002
        """Delete every chunk whose metadata matches `filter`; returns how many were deleted."""
        ids = self.ids_where(filter)
        self.delete(ids)
        return len(ids)

    # --- searching -----------------------------------------------------------------------------

    def similarity_search_with_score_by_vector(
        self, embedding: Sequence[float], k: int = 4, filter: Filter | None = None, **kwargs: Any  # noqa: A002
    ) -> list[tuple[Document, float]]:
        """The k chunks nearest to `embedding` with their cosine similarity, nearest first."""
        return [(doc, 1.0 - distance) for doc, distance, _ in self._search(embedding, k, filter)]

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: Filter | None = None, **kwargs: Any  # noqa: A002
    ) -> list[tuple[Document, float]]:
        """The k chunks nearest to `query` with their cosine similarity (higher is closer)."""
        return self.similarity_search_with_score_by_vector(self.embedding.embed_query(query), k, filter)

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: Filter | None = None, **kwargs: Any  # noqa: A002
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, filter)]

    def similarity_search(
        self, query: str, k: int = 4, filter: Filter | None = None, **kwargs: Any  # noqa: A002
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter)]

    @staticmethod
    def _similarity_to_relevance(similarity: float) -> float:
        return min(1.0, max(0.0, (1.0 + similarity) / 2.0))

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        """Cosine similarity in [-1, 1] → relevance in [0, 1]."""
        return self._similarity_to_relevance

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Filter | None = None,  # noqa: A002
        **kwargs: Any,
    ) -> list[Document]:
        candidates = self._nearest_with_vectors(embedding, max(fetch_k, k), filter)
        if not candidates:
            return []
        chosen = maximal_marginal_relevance(
            np.asarray(embedding, dtype=np.float32),
            np.stack([vector for _, vector in candidates]),
            lambda_mult=lambda_mult,
            k=k,
        )
        return [candidates[i][0] for i in chosen]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Filter | None = None,  # noqa: A002
        **kwargs: Any,
    ) -> list[Document]:
        return self.max_marginal_relevance_search_by_vector(
            self.embedding.embed_query(query), k, fetch_k, lambda_mult, filter
        )


class KnowledgeBase(_ChunkStore):
    """A vector store of text chunks in one SQLite file (or `":memory:"`)."""

    def __init__(self, path: str | Path, embedding: Embeddings) -> None:
        if _sqlite is None:  # pragma: no cover - depends on the platform
            raise KnowledgeBaseError(
                "this Python's sqlite3 cannot load extensions and pysqlite3 is not installed; "
                "install it with `pip install pysqlite3-binary` (or use a Python built with "
                "--enable-loadable-sqlite-extensions)"
            )
        self.embedding = embedding
        self.path = path if str(path) == ":memory:" else Path(path).expanduser()
        self._lock = threading.RLock()
        self._conn = self._open()
        self._dim: int | None = None
        self._recorded_name: str | None = None
        self._init_schema()

    # --- the file ------------------------------------------------------------------------------

    def _where(self) -> str:
        return "an in-memory knowledge base" if self.path == ":memory:" else f"the knowledge base {str(self.path)!r}"

    def _open(self) -> Any:
        import sqlite_vec

        if isinstance(self.path, Path):
            if self.path.is_dir():
                raise KnowledgeBaseError(f"{self._where()} is a folder; give a file path (e.g. kb.sqlite)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _sqlite.connect(str(self.path), check_same_thread=False, timeout=30.0)
            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
        except _sqlite.Error as exc:
            raise KnowledgeBaseError(f"cannot open {self._where()}: {exc}") from exc
        return conn

    def _init_schema(self) -> None:
        try:
            with self._lock, self._conn:
                self._conn.executescript(
                    """
                    CREATE TABLE IF NOT EXISTS kb_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                    CREATE TABLE IF NOT EXISTS chunks (
                        rowid INTEGER PRIMARY KEY,
                        id TEXT NOT NULL UNIQUE,
                        text TEXT NOT NULL,
                        metadata TEXT NOT NULL
                    );
                    """
                )
                self._conn.execute(
                    "INSERT OR IGNORE INTO kb_meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
                meta = dict(self._conn.execute("SELECT key, value FROM kb_meta").fetchall())
        except _sqlite.DatabaseError as exc:
            self._conn.close()
            raise KnowledgeBaseError(
                f"{self._where()} is not a Signalgraph knowledge base ({exc}); "
                "point at another file or remove this one"
            ) from exc
        if meta.get("schema_version") != SCHEMA_VERSION:
            self._conn.close()
            raise KnowledgeBaseError(
                f"{self._where()} has schema version {meta.get('schema_version')!r}, this Signalgraph reads "
                f"{SCHEMA_VERSION!r}; rebuild it by ingesting the sources again into a new file"
            )
        if "dim" in meta:
            self._dim = int(meta["dim"])
            self._recorded_name = meta.get("embedding")

    def _ensure_vectors(self, dim: int) -> None:
        """Create the vector table on the first write; refuse vectors of another dimension."""
        if self._dim is None:
            self._conn.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS vec_chunks"
                f" USING vec0(embedding float[{dim}] distance_metric=cosine)"
            )
            name = _embedding_name(self.embedding)
            self._conn.executemany(
                "INSERT OR REPLACE INTO kb_meta(key, value) VALUES (?, ?)", [("dim", str(dim)), ("embedding", name)]
            )
            self._dim, self._recorded_name = dim, name
        else:
            self._check_dim(dim)

    def _check_dim(self, dim: int) -> None:
        if self._dim is not None and dim != self._dim:
            raise KnowledgeBaseError(
                f"{self._where()} holds {self._dim}-dimensional vectors made by {self._recorded_name!r}, but "
                f"the embeddings given ({_embedding_name(self.embedding)!r}) make {dim}-dimensional ones; "
                "open it with the embeddings that built it, or ingest the sources again into a new file"
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- writing -------------------------------------------------------------------------------

    def _write(self, ids: list[str], texts: list[str], metadatas: list[str], vectors: np.ndarray) -> None:
        with self._lock, self._conn:
            self._ensure_vectors(vectors.shape[1])
            for id_, text, metadata, vector in zip(ids, texts, metadatas, vectors, strict=True):
                found = self._conn.execute("SELECT rowid FROM chunks WHERE id = ?", (id_,)).fetchone()
                blob = vector.tobytes()
                if found:
                    rowid = found[0]
                    self._conn.execute(
                        "UPDATE chunks SET text = ?, metadata = ? WHERE rowid = ?", (text, metadata, rowid)
                    )
                    self._conn.execute("UPDATE vec_chunks SET embedding = ? WHERE rowid = ?", (blob, rowid))
                else:
                    cursor = self._conn.execute(
                        "INSERT INTO chunks(id, text, metadata) VALUES (?, ?, ?)", (id_, text, metadata)
                    )
                    self._conn.execute(
                        "INSERT INTO vec_chunks(rowid, embedding) VALUES (?, ?)", (cursor.lastrowid, blob)
                    )

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete the chunks with these ids (unknown ids are ignored); `None` deletes everything."""
        with self._lock, self._conn:
            if ids is None:
                self._conn.execute("DELETE FROM chunks")
                if self._dim is not None:
                    self._conn.execute("DELETE FROM vec_chunks")
                return True
            for batch in _batches(list(ids)):
                marks = ",".join("?" * len(batch))
                rowids = [r[0] for r in self._conn.execute(f"SELECT rowid FROM chunks WHERE id IN ({marks})", batch)]
                if not rowids:
                    continue
                rmarks = ",".join("?" * len(rowids))
                self._conn.execute(f"DELETE FROM chunks WHERE rowid IN ({rmarks})", rowids)
                self._conn.execute(f"DELETE FROM vec_chunks WHERE rowid IN ({rmarks})", rowids)
        return True

    # --- reading -------------------------------------------------------------------------------

    @staticmethod
    def _document(id_: str, text: str, metadata: str) -> Document:
        return Document(id=id_, page_content=text, metadata=json.loads(metadata))

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents with these ids, in the order asked; unknown ids are left out."""
        wanted = list(dict.fromkeys(ids))
        found: dict[str, Document] = {}
        with self._lock:
            for batch in _batches(wanted):
                marks = ",".join("?" * len(batch))
                for row in self._conn.execute(f"SELECT id, text, metadata FROM chunks WHERE id IN ({marks})", batch):
                    found[row[0]] = self._document(*row)
        return [found[i] for i in wanted if i in found]

    def count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def ids_where(self, filter: Filter) -> list[str]:  # noqa: A002
        """Ids of the chunks whose metadata matches `filter` (same rules as the search filter)."""
        sql, params = "SELECT id, text, metadata FROM chunks", []
        if isinstance(filter, dict):  # narrow in SQL on one plain key, then check exactly in Python
            for key, value in filter.items():
                if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
                    sql += " WHERE json_extract(metadata, ?) = ?"
                    params = ["$." + json.dumps(key), value]
                    break
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [row[0] for row in rows if _matches(self._document(*row), filter)]

    def sources(self) -> dict[str, int]:
        """How many chunks each `source` (metadata key) has, for listings."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT json_extract(metadata, '$.source') AS s, count(*) FROM chunks GROUP BY s ORDER BY s"
            ).fetchall()
        return {str(source): n for source, n in rows if source is not None}

    # --- searching -----------------------------------------------------------------------------

    def _query_blob(self, embedding: Sequence[float]) -> bytes | None:
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if self._dim is None:  # nothing was ever stored
            return None
        self._check_dim(vector.shape[0])
        return vector.tobytes()

    def _knn(self, blob: bytes, k: int) -> list[tuple[Document, float, int]]:
        """The k nearest chunks (no filter) as (document, cosine distance, rowid), nearest first."""
        rows = self._conn.execute(
            """
            WITH knn AS (SELECT rowid, distance FROM vec_chunks WHERE embedding MATCH ? AND k = ?)
            SELECT c.id, c.text, c.metadata, knn.distance, c.rowid
            FROM knn JOIN chunks c ON c.rowid = knn.rowid
            ORDER BY knn.distance, c.rowid
            """,
            (blob, k),
        ).fetchall()
        # a zero vector has no direction: sqlite-vec gives NULL, which we read as "unrelated"
        return [(self._document(i, t, m), 1.0 if d is None else float(d), r) for i, t, m, d, r in rows]

    def _scan(self, blob: bytes) -> Iterator[tuple[Document, float, int]]:
        """Every chunk by distance: the fallback when a filter needs more than one KNN query holds."""
        rows = self._conn.execute(
            """
            SELECT c.id, c.text, c.metadata, vec_distance_cosine(v.embedding, ?) AS d, c.rowid
            FROM vec_chunks v JOIN chunks c ON c.rowid = v.rowid
            ORDER BY (d IS NULL), d, c.rowid
            """,
            (blob,),
        )
        for i, t, m, d, r in rows:
            yield self._document(i, t, m), 1.0 if d is None else float(d), r

    def _search(
        self, embedding: Sequence[float], k: int, filter: Filter | None  # noqa: A002
    ) -> list[tuple[Document, float, int]]:
        if k <= 0:
            return []
        with self._lock:
            blob = self._query_blob(embedding)
            if blob is None:
                return []
            total = self._conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
            if total == 0:
                return []
            fetch = k if filter is None else k * _OVERSAMPLE
            while True:
                n = min(fetch, total, _VEC_K_MAX)
                hits = [hit for hit in self._knn(blob, n) if _matches(hit[0], filter)]
                if len(hits) >= k or n >= total:
                    return hits[:k]
                if n == _VEC_K_MAX:  # one KNN query cannot reach further: walk the whole table
                    hits = []
                    for hit in self._scan(blob):
                        if _matches(hit[0], filter):
                            hits.append(hit)
                            if len(hits) == k:
                                break
                    return hits
                fetch *= _OVERSAMPLE

    def _nearest_with_vectors(
        self, embedding: Sequence[float], k: int, filter: Filter | None  # noqa: A002
    ) -> list[tuple[Document, np.ndarray]]:
        candidates = self._search(embedding, k, filter)
        if not candidates:
            return []
        rowids = [rowid for _, _, rowid in candidates]
        with self._lock:
            marks = ",".join("?" * len(rowids))
            sql = f"SELECT rowid, embedding FROM vec_chunks WHERE rowid IN ({marks})"
            blobs = dict(self._conn.execute(sql, rowids))
        return [(doc, np.frombuffer(blobs[rowid], dtype=np.float32)) for doc, _, rowid in candidates]

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        path: str | Path = ":memory:",
        **kwargs: Any,
    ) -> KnowledgeBase:
        """A knowledge base at `path` (default in memory) holding `texts`."""
        store = cls(path, embedding)
        store.add_texts(texts, metadatas, ids=ids)
        return store
