"""The knowledge base on Postgres with pgvector, so that every replica shares it.

`PgKnowledgeBase` behaves as `KnowledgeBase` (tools/knowledge_base.py), the SQLite store on one
machine: the same methods, ids, upserts, filters, scores and errors. Its rows live in the tables of
tools/migrations/0002_knowledge_base.sql, namespaced by `collection`: several knowledge bases (or
tenants) share one database, and a store never reads, counts or deletes another collection's rows.

Like the SQLite store, a collection records the width of its vectors (and the embedder's name) on
its first write, and refuses embeddings of another width with a `KnowledgeBaseError`. The same
write creates the collection's HNSW index (cosine), a partial index over its rows alone.

Searches go through that index, with `hnsw.ef_search` at least `_EF_SEARCH` and pgvector's
iterative scans, so a filtered search still finds k rows, unless the planner finds a scan cheaper
(a collection of a few thousand chunks, a selective filter): that is exact. `exact=True` always
scans (the baseline). Whenever the index hands back fewer rows than asked (few rows match, the iterative scan
gave up, zero vectors, which it does not hold), the search runs again as a scan, so a search
returns k chunks whenever k match, as the SQLite store's does.

Every call takes its own connection from the database's pool, so one store serves many threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance
from pgvector import Vector
from psycopg import sql

from tools.database import Database
from tools.knowledge_base import _OVERSAMPLE, Filter, KnowledgeBase, KnowledgeBaseError, _embedding_name, _matches
from tools.untrusted import redact

# candidates the HNSW search keeps per query. Random unit vectors, the hard case, measured recall@10
# 0.95 at pgvector's default of 40 (3,000 of 64-d) and 0.79 at 100 (5,000 of 384-d), 1.0 at 200
_EF_SEARCH = 200
_EF_SEARCH_MAX = 1000  # pgvector's limit; past it, the iterative scan goes on
_HNSW_MAX_DIM = 2000  # pgvector indexes no wider vectors: a collection of those is always scanned
_LOCK_COLLECTION = "SELECT pg_advisory_xact_lock(hashtext('signalgraph-kb'), hashtext(%s))"
_UPSERT = (
    "INSERT INTO kb_documents (collection, id, text, metadata, embedding) VALUES (%s, %s, %s, %s::jsonb, %s::vector) "
    "ON CONFLICT (collection, id) DO UPDATE "
    "SET text = excluded.text, metadata = excluded.metadata, embedding = excluded.embedding"
)


def _narrowing(filter: Filter | None) -> tuple[str, list[Any]]:  # noqa: A002
    """SQL (`AND ...`) that keeps every row a dict filter may match, so that the indexes narrow the
    search; `_matches` still decides. Strings and numbers are narrowed (a boolean under a number's
    key is kept, as Python holds `True == 1`); other values are left to `_matches`."""
    if not isinstance(filter, dict):
        return "", []
    clauses, params = [], []
    strings = {key: value for key, value in filter.items() if isinstance(value, str)}
    if strings:
        clauses.append("metadata @> %s::jsonb")
        params.append(json.dumps(strings))
    for key, value in filter.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            clauses.append("(metadata @> %s::jsonb OR jsonb_typeof(metadata -> %s) = 'boolean')")
            params += [json.dumps({key: value}), key]
    return "".join(f" AND {clause}" for clause in clauses), params


class PgKnowledgeBase(VectorStore):
    """A vector store of text chunks in one collection of a shared Postgres database."""

    def __init__(
        self, database: Database, embedding: Embeddings, *, collection: str = "default", exact: bool = False
    ) -> None:
        self.database = database
        self.embedding = embedding
        self.collection = collection
        self.exact = exact
        self._recorded: tuple[int, str | None] | None = None  # (dim, embedder) once the collection has them
        with database.connection() as conn:
            if conn.execute("SELECT to_regclass('public.kb_documents') AS t").fetchone()["t"] is None:
                raise KnowledgeBaseError(
                    f"{database!r} has no knowledge base tables; run `signalgraph db upgrade`"
                )
            with conn.transaction():  # rows loaded in bulk (COPY) get their index here
                self._recorded = self._settle(conn, None)

    # --- the collection ------------------------------------------------------------------------

    def _where(self) -> str:
        return f"the knowledge base {self.collection!r} in {self.database!r}"

    def _index_name(self, dim: int) -> str:
        # collections are any text; the name must be an identifier of at most 63 bytes
        return f"kb_hnsw_{hashlib.sha256(self.collection.encode()).hexdigest()[:20]}_{dim}"

    @property
    def index_name(self) -> str | None:
        """The collection's HNSW index (for EXPLAIN and pg_stat_user_indexes); None before any write."""
        recorded = self._current()
        return None if recorded is None else self._index_name(recorded[0])

    def _read_recorded(self, conn: Any) -> tuple[int, str | None] | None:
        rows = conn.execute("SELECT key, value FROM kb_meta WHERE collection = %s", (self.collection,)).fetchall()
        meta = {row["key"]: row["value"] for row in rows}
        return (int(meta["dim"]), meta.get("embedding")) if "dim" in meta else None

    def _settle(self, conn: Any, dim: int | None) -> tuple[int, str | None] | None:
        """The collection's (dim, embedder), recording `dim` if none is yet, and its HNSW index.
        Call inside a transaction: the collection's lock orders processes doing this at once."""
        conn.execute(_LOCK_COLLECTION, (self.collection,))
        recorded = self._read_recorded(conn)
        if recorded is None and dim is not None:
            recorded = (dim, _embedding_name(self.embedding))
            conn.cursor().executemany(
                "INSERT INTO kb_meta (collection, key, value) VALUES (%s, %s, %s)",
                [(self.collection, "dim", str(dim)), (self.collection, "embedding", recorded[1])],
            )
        if recorded is not None and recorded[0] <= _HNSW_MAX_DIM:
            name = self._index_name(recorded[0])
            if conn.execute("SELECT to_regclass(%s) AS i", (f"public.{name}",)).fetchone()["i"] is None:
                # DDL takes no parameters: the width is an int, the rest quoted by psycopg
                conn.execute(
                    sql.SQL(
                        "CREATE INDEX IF NOT EXISTS {} ON kb_documents USING hnsw "
                        "((embedding::vector({})) vector_cosine_ops) WHERE collection = {}"
                    ).format(sql.Identifier(name), sql.SQL(str(int(recorded[0]))), sql.Literal(self.collection))
                )
        return recorded

    def _current(self) -> tuple[int, str | None] | None:
        """What the collection records; asked again while unknown, as another process may write first."""
        if self._recorded is None:
            with self.database.connection() as conn:
                self._recorded = self._read_recorded(conn)
        return self._recorded

    def _check_dim(self, dim: int, recorded: tuple[int, str | None] | None) -> None:
        if recorded is not None and dim != recorded[0]:
            raise KnowledgeBaseError(
                f"{self._where()} holds {recorded[0]}-dimensional vectors made by {recorded[1]!r}, but "
                f"the embeddings given ({_embedding_name(self.embedding)!r}) make {dim}-dimensional ones; "
                "open it with the embeddings that built it, or ingest the sources again into a new collection"
            )

    def drop_collection(self) -> None:
        """Remove the collection: its chunks, what it records, its index. The store is then empty,
        and its next write records the width again."""
        with self.database.connection() as conn, conn.transaction():
            conn.execute(_LOCK_COLLECTION, (self.collection,))
            recorded = self._read_recorded(conn)
            conn.execute("DELETE FROM kb_documents WHERE collection = %s", (self.collection,))
            conn.execute("DELETE FROM kb_meta WHERE collection = %s", (self.collection,))
            if recorded is not None:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(self._index_name(recorded[0]))))
        self._recorded = None

    def close(self) -> None:
        """Nothing to close: the database belongs to whoever made it, and may serve others."""

    def __enter__(self) -> PgKnowledgeBase:
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
        # an instruction planted in a chunk is not what the chunk is about: it is left out of the
        # vector (and kept in the stored text)
        vectors = self._vectors([redact(t, note="") or t for t in texts])
        dim = vectors.shape[1]
        with self.database.connection() as conn, conn.transaction():
            # read again, not cached: another process may have dropped the collection meanwhile
            recorded = self._read_recorded(conn) or self._settle(conn, dim)
            self._check_dim(dim, recorded)
            # one statement after the other, in order: the same id twice in a call, the last one wins
            conn.cursor().executemany(
                _UPSERT,
                [
                    (self.collection, id_, text, metadata, Vector(vector).to_text())
                    for id_, text, metadata, vector in zip(final_ids, texts, rows, vectors, strict=True)
                ],
            )
        self._recorded = recorded  # once committed: a write that failed recorded nothing
        return final_ids

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """Store documents; `ids=` wins over each `Document.id`, and a missing id is generated."""
        ids = kwargs.pop("ids", None)
        if ids is None:
            ids = [doc.id for doc in documents]
        return self.add_texts(
            [doc.page_content for doc in documents], [doc.metadata for doc in documents], ids=ids, **kwargs
        )

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete the chunks with these ids (unknown ids are ignored); `None` deletes everything."""
        with self.database.connection() as conn:
            if ids is None:
                conn.execute("DELETE FROM kb_documents WHERE collection = %s", (self.collection,))
            else:
                conn.execute(
                    "DELETE FROM kb_documents WHERE collection = %s AND id = ANY(%s)",
                    (self.collection, [str(i) for i in ids]),
                )
        return True

    def delete_where(self, filter: Filter) -> int:  # noqa: A002
        """Delete every chunk whose metadata matches `filter`; returns how many were deleted."""
        ids = self.ids_where(filter)
        self.delete(ids)
        return len(ids)

    # --- reading -------------------------------------------------------------------------------

    @staticmethod
    def _document(row: dict[str, Any]) -> Document:
        return Document(id=row["id"], page_content=row["text"], metadata=row["metadata"])

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents with these ids, in the order asked; unknown ids are left out."""
        wanted = list(dict.fromkeys(ids))
        with self.database.connection() as conn:
            rows = conn.execute(
                "SELECT id, text, metadata FROM kb_documents WHERE collection = %s AND id = ANY(%s)",
                (self.collection, [str(i) for i in wanted]),
            ).fetchall()
        found = {row["id"]: self._document(row) for row in rows}
        return [found[i] for i in wanted if i in found]

    def count(self) -> int:
        with self.database.connection() as conn:
            return conn.execute(
                "SELECT count(*) AS n FROM kb_documents WHERE collection = %s", (self.collection,)
            ).fetchone()["n"]

    def ids_where(self, filter: Filter) -> list[str]:  # noqa: A002
        """Ids of the chunks whose metadata matches `filter` (same rules as the search filter)."""
        narrowing, params = _narrowing(filter)
        with self.database.connection() as conn:
            rows = conn.execute(
                f"SELECT id, text, metadata FROM kb_documents WHERE collection = %s{narrowing} ORDER BY seq",
                (self.collection, *params),
            ).fetchall()
        return [row["id"] for row in rows if _matches(self._document(row), filter)]

    def sources(self) -> dict[str, int]:
        """How many chunks each `source` (metadata key) has, for listings."""
        with self.database.connection() as conn:
            rows = conn.execute(
                "SELECT metadata ->> 'source' AS source, count(*) AS n FROM kb_documents WHERE collection = %s "
                "GROUP BY 1",
                (self.collection,),
            ).fetchall()
        # in code point order, as SQLite sorts (whatever the database's collation)
        return {row["source"]: row["n"] for row in sorted(rows, key=lambda r: r["source"] or "")
                if row["source"] is not None}

    # --- searching -----------------------------------------------------------------------------

    def _nearest(
        self, conn: Any, query: str, dim: int, n: int, narrowing: str, params: list[Any], with_vectors: bool
    ) -> list[dict[str, Any]]:
        """The n nearest rows (that pass the SQL narrowing), nearest first, ties in insertion order."""
        vectors = ", embedding::text AS vector" if with_vectors else ""
        where = f"collection = %s{narrowing}"
        if not self.exact:
            # the ORDER BY must be the index's expression, `vector(<dim>)`, to use the index;
            # unprepared, so each query is planned with its collection (the index is partial).
            # The planner may still prefer a scan, for a small collection: exact, and cheaper
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('hnsw.ef_search', %s, true), "
                    "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                    (str(min(max(_EF_SEARCH, n), _EF_SEARCH_MAX)),),
                )
                # a relaxed-order scan may hand rows back slightly out of order: sorted after
                rows = conn.execute(
                    f"WITH nearest AS MATERIALIZED (SELECT id, text, metadata, seq{vectors}, "
                    f"embedding::vector({dim}) <=> %s::vector({dim}) AS distance "
                    f"FROM kb_documents WHERE {where} ORDER BY distance LIMIT %s) "
                    "SELECT * FROM nearest ORDER BY distance, seq",
                    (query, self.collection, *params, n),
                    prepare=False,
                ).fetchall()
            if len(rows) == n:
                return rows
        # no index on this expression: a scan of the collection's rows
        return conn.execute(
            f"SELECT id, text, metadata, seq{vectors}, embedding <=> %s::vector AS distance "
            f"FROM kb_documents WHERE {where} ORDER BY distance, seq LIMIT %s",
            (query, self.collection, *params, n),
            prepare=False,
        ).fetchall()

    def _search(
        self, embedding: Sequence[float], k: int, filter: Filter | None, with_vectors: bool = False  # noqa: A002
    ) -> list[tuple[Document, float, dict[str, Any]]]:
        """(document, cosine distance, row) of the k nearest chunks that match, nearest first."""
        if k <= 0:
            return []
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        recorded = self._current()
        if recorded is None:  # nothing was ever stored
            return []
        self._check_dim(vector.shape[0], recorded)
        query = Vector(vector).to_text()
        narrowing, params = _narrowing(filter)
        fetch = k if filter is None else k * _OVERSAMPLE
        with self.database.connection() as conn:
            while True:
                rows = self._nearest(conn, query, recorded[0], fetch, narrowing, params, with_vectors)
                hits = []
                for row in rows:
                    doc = self._document(row)
                    if _matches(doc, filter):
                        # a zero vector has no direction: pgvector gives NaN, read as "unrelated"
                        distance = row["distance"]
                        hits.append((doc, 1.0 if math.isnan(distance) else distance, row))
                if len(hits) >= k or len(rows) < fetch:
                    return hits[:k]
                fetch *= _OVERSAMPLE

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

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        """Cosine similarity in [-1, 1] → relevance in [0, 1], as the SQLite store maps it."""
        return KnowledgeBase._similarity_to_relevance

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Filter | None = None,  # noqa: A002
        **kwargs: Any,
    ) -> list[Document]:
        candidates = self._search(embedding, max(fetch_k, k), filter, with_vectors=True)
        if not candidates:
            return []
        vectors = np.stack([Vector.from_text(row["vector"]).to_numpy() for _, _, row in candidates])
        chosen = maximal_marginal_relevance(
            np.asarray(embedding, dtype=np.float32), vectors, lambda_mult=lambda_mult, k=k
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

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        database: Database | None = None,
        collection: str = "default",
        exact: bool = False,
        **kwargs: Any,
    ) -> PgKnowledgeBase:
        """A knowledge base in `collection` of `database` (required) holding `texts`."""
        if database is None:
            raise ValueError("PgKnowledgeBase.from_texts needs database=Database(url)")
        store = cls(database, embedding, collection=collection, exact=exact)
        store.add_texts(texts, metadatas, ids=ids)
        return store
