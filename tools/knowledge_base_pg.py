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
from collections.abc import Sequence
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from pgvector import Vector
from psycopg import sql

from tools.database import Database
from tools.knowledge_base import _OVERSAMPLE, Filter, KnowledgeBaseError, _ChunkStore, _embedding_name, _matches

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


class PgKnowledgeBase(_ChunkStore):
    """A vector store of text chunks in one collection of a shared Postgres database."""

    def __init__(
        self, database: Database, embedding: Embeddings, *, collection: str = "default", exact: bool = False,
        ef_search: int = _EF_SEARCH,
    ) -> None:
        self.database = database
        self.embedding = embedding
        self.collection = collection
        self.exact = exact
        self.ef_search = ef_search  # candidates the index keeps while it searches: recall against time
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

    # --- writing -------------------------------------------------------------------------------

    def _write(self, ids: list[str], texts: list[str], metadatas: list[str], vectors: np.ndarray) -> None:
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
                    for id_, text, metadata, vector in zip(ids, texts, metadatas, vectors, strict=True)
                ],
            )
        self._recorded = recorded  # once committed: a write that failed recorded nothing

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
                    (str(min(max(self.ef_search, n), _EF_SEARCH_MAX)),),
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

    def _nearest_with_vectors(
        self, embedding: Sequence[float], k: int, filter: Filter | None  # noqa: A002
    ) -> list[tuple[Document, np.ndarray]]:
        return [
            (doc, Vector.from_text(row["vector"]).to_numpy())
            for doc, _, row in self._search(embedding, k, filter, with_vectors=True)
        ]

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
