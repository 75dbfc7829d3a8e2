"""The knowledge base on Postgres (tools/knowledge_base_pg.py), on the real PostgreSQL 18 with
pgvector of tests/conftest.py: LangChain's standard vector-store suite; parity with the SQLite
store (same documents and queries give the same ranking and scores); collections kept apart; HNSW
recall against the exact scan; and two processes on one database.

One database for the module, upgraded once; each test writes to collections of its own, which is
what keeps them apart (and is itself under test).
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from langchain_core.embeddings import Embeddings
from langchain_tests.integration_tests.vectorstores import VectorStoreIntegrationTests
from psycopg.conninfo import make_conninfo
from test_knowledge_base import WordHashEmbeddings

from agent.bench.retrieval import _Stored
from tools.database import Database
from tools.knowledge_base import KnowledgeBase, KnowledgeBaseError
from tools.knowledge_base_pg import PgKnowledgeBase


@pytest.fixture(scope="module")
def database(postgres_server) -> Iterator[Database]:
    db = Database(postgres_server())
    db.upgrade()
    yield db
    db.close()


def fresh() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


# The suite's async tests are plain `async def`s, so they need pytest-asyncio's mark; on the class,
# it also lands on the sync tests, where pytest-asyncio merely warns that it is not needed.
@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'")
class TestPgKnowledgeBaseStandard(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self, database) -> PgKnowledgeBase:  # type: ignore[override]
        return PgKnowledgeBase(database, self.get_embeddings(), collection=fresh())


# --- parity with the SQLite store -------------------------------------------------------------


class WordVectorEmbeddings(Embeddings):
    """Fake embeddings: the normalised sum of a fixed random vector per word. Texts that share words
    are near, as with `WordHashEmbeddings`, but two texts with different words never tie exactly
    (whole-number histograms do, and two stores may then order the tie differently)."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def _word(self, word: str) -> np.ndarray:
        seed = int(hashlib.md5(word.encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).standard_normal(self.dim)

    def embed_query(self, text: str) -> list[float]:
        vector = sum((self._word(w) for w in re.findall(r"[a-z0-9]+", text.lower())), np.zeros(self.dim))
        norm = float(np.linalg.norm(vector))
        return (vector / norm if norm else vector).tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.embed_query(t) for t in texts]


WORDS = ("river boat mountain hike cat mat mouse stock price fell rose garden tomato water aphid "
         "bicycle tyre pressure passport travel bread oven flour milk egg tea apple pie plumber sink").split()


def corpus(n: int = 150) -> tuple[list[str], list[dict]]:
    """`n` short texts over a small vocabulary (so they share words) with assorted metadata."""
    rng = random.Random(7)
    texts = [" ".join(rng.sample(WORDS, rng.randint(2, 7))) + f" item{i}" for i in range(n)]
    metadatas = [{"source": f"notes/{i % 5}.md", "i": i, "even": i % 2 == 0, "tags": ["a", str(i % 3)]}
                 for i in range(n)]
    return texts, metadatas


@pytest.fixture
def sqlite_kb(tmp_path) -> Iterator[KnowledgeBase]:
    with KnowledgeBase(tmp_path / "kb.sqlite", WordVectorEmbeddings()) as kb:
        yield kb


def assert_same_hits(expected: list, got: list) -> None:
    """Same documents in the same order, same scores within float tolerance."""
    assert [doc for doc, _ in got] == [doc for doc, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-5)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "hnsw"])
def test_searches_rank_and_score_as_the_sqlite_store_does(database, sqlite_kb, exact):
    texts, metadatas = corpus()
    ids = [f"doc-{i}" for i in range(len(texts))]
    sqlite_kb.add_texts(texts, metadatas, ids=ids)
    pg = PgKnowledgeBase(database, WordVectorEmbeddings(), collection=fresh(), exact=exact)
    pg.add_texts(texts, metadatas, ids=ids)

    filters = [None, {"source": "notes/2.md"}, {"i": 7}, {"source": "notes/1.md", "even": True},
               {"tags": ["a", "0"]}, {"i": 7.0}, {"source": "nowhere"}, lambda d: d.metadata["i"] % 3 == 0]
    for query in ["river boat", "cat mat mouse", "bread oven flour milk", "passport", "nothing matches zzz"]:
        for k in (1, 4, 10, 200):
            for filter_ in filters:
                assert_same_hits(sqlite_kb.similarity_search_with_score(query, k, filter_),
                                 pg.similarity_search_with_score(query, k, filter_))
        assert_same_hits(sqlite_kb.similarity_search_with_relevance_scores(query, k=5),
                         pg.similarity_search_with_relevance_scores(query, k=5))
        assert (sqlite_kb.max_marginal_relevance_search(query, k=4, fetch_k=20, lambda_mult=0.3)
                == pg.max_marginal_relevance_search(query, k=4, fetch_k=20, lambda_mult=0.3))
    vector = WordVectorEmbeddings().embed_query("garden tomato water")
    assert_same_hits(sqlite_kb.similarity_search_with_score_by_vector(vector, 6),
                     pg.similarity_search_with_score_by_vector(vector, 6))
    assert pg.similarity_search("river", k=0) == [] and pg.similarity_search("river", k=-1) == []


def test_writes_deletes_and_listings_match_the_sqlite_store(database, sqlite_kb):
    pg = PgKnowledgeBase(database, WordVectorEmbeddings(), collection=fresh())
    stores = (sqlite_kb, pg)
    texts, metadatas = corpus(40)
    for store in stores:
        assert store.similarity_search("anything") == [] and store.count() == 0 and store.sources() == {}
        store.add_texts(texts, metadatas, ids=[f"d{i}" for i in range(40)])
        store.add_texts(["brand new words", "first", "second"], [{"source": "x", "path": Path("/a/b")}, {}, {}],
                        ids=["d3", "twice", "twice"])  # an upsert, and the same id twice: the last wins
        generated = store.add_texts(["no id given"], ids=[None])
        assert len(generated[0]) == 32 and store.add_texts([]) == []
        with pytest.raises(ValueError, match="give one per text"):
            store.add_texts(["a", "b"], [{}])

    def state(store) -> tuple:
        return (store.count(), store.sources(), store.ids_where({"source": "notes/3.md"}),
                store.ids_where(lambda d: d.metadata.get("i", 0) > 30), store.get_by_ids(["d3", "missing", "d1", "d3"]),
                store.get_by_ids(["twice"]), [d.id for d in store.similarity_search("brand new", k=2)])

    assert state(sqlite_kb) == state(pg)
    assert pg.get_by_ids(["d3"])[0].metadata == {"source": "x", "path": "/a/b"}
    assert pg.get_by_ids(["twice"])[0].page_content == "second"
    for store in stores:
        assert store.delete_where({"source": "notes/0.md"}) == 8
        store.delete(["d1", "missing"])
        assert store.delete_where({"source": "nowhere"}) == 0
    assert state(sqlite_kb) == state(pg)
    for store in stores:
        store.delete()
    assert state(sqlite_kb) == state(pg) and pg.count() == 0


def test_filter_still_returns_k_when_matches_are_far_down(database):
    kb = PgKnowledgeBase(database, WordHashEmbeddings(), collection=fresh())
    kb.add_texts([f"river boat number {i}" for i in range(60)], [{"source": "a", "i": i} for i in range(60)])
    kb.add_texts([f"mountain hike {i} boat" for i in range(4)], [{"source": "b", "i": i} for i in range(4)])
    found = kb.similarity_search("river boat", k=3, filter={"source": "b"})
    assert len(found) == 3 and {d.metadata["source"] for d in found} == {"b"}
    assert len(kb.similarity_search("river boat", k=10, filter={"source": "b"})) == 4
    odd = kb.similarity_search("river boat", k=5, filter=lambda d: d.metadata["i"] % 2 == 1)
    assert len(odd) == 5 and all(d.metadata["i"] % 2 for d in odd)


def test_a_zero_vector_is_found_last_as_unrelated(database):
    kb = PgKnowledgeBase(database, WordHashEmbeddings(), collection=fresh())
    kb.add_texts(["!!! ???", "river boat", "river"], ids=["zero", "rb", "r"])  # no words: a zero vector
    hits = kb.similarity_search_with_score("river", k=5)
    assert [d.id for d, _ in hits] == ["r", "rb", "zero"] and hits[-1][1] == 0.0


def test_refuses_embeddings_of_another_width_per_collection(database):
    collection = fresh()
    early = PgKnowledgeBase(database, WordHashEmbeddings(dim=32), collection=collection)  # opened before any write
    PgKnowledgeBase(database, WordHashEmbeddings(dim=64), collection=collection).add_texts(["hello"])
    late = PgKnowledgeBase(database, WordHashEmbeddings(dim=32), collection=collection)
    for kb in (early, late):
        with pytest.raises(KnowledgeBaseError, match="64-dimensional.*32-dimensional"):
            kb.similarity_search("hello")
        with pytest.raises(KnowledgeBaseError, match="64-dimensional"):
            kb.add_texts(["more"])
    assert late.count() == 1
    other = PgKnowledgeBase(database, WordHashEmbeddings(dim=32), collection=fresh())  # another collection: fine
    other.add_texts(["hello"])
    assert other.similarity_search_with_score("hello", k=1)[0][1] == pytest.approx(1.0, abs=1e-6)


def test_vectors_too_wide_for_an_index_are_scanned(database):
    kb = PgKnowledgeBase(database, WordVectorEmbeddings(dim=2048), collection=fresh())
    kb.add_texts(["river boat", "cat mat", "river"], ids=["rb", "cm", "r"])
    assert [d.id for d in kb.similarity_search("river", k=2)] == ["r", "rb"]


def test_an_unmigrated_database_and_from_texts_without_one_are_refused(postgres_url, database):
    bare = Database(postgres_url)
    try:
        with pytest.raises(KnowledgeBaseError, match="signalgraph db upgrade"):
            PgKnowledgeBase(bare, WordHashEmbeddings())
    finally:
        bare.close()
    with pytest.raises(ValueError, match="database="):
        PgKnowledgeBase.from_texts(["x"], WordHashEmbeddings())
    store = PgKnowledgeBase.from_texts(["red apple pie", "green tea"], WordHashEmbeddings(), [{"n": 0}, {"n": 1}],
                                       database=database, collection=fresh())
    retriever = store.as_retriever(search_kwargs={"k": 2, "filter": {"n": 1}})
    assert [d.page_content for d in retriever.invoke("tea")] == ["green tea"]


def test_collections_never_see_each_other(database):
    one = PgKnowledgeBase(database, WordHashEmbeddings(), collection=fresh())
    two = PgKnowledgeBase(database, WordHashEmbeddings(dim=16), collection=fresh())  # and of another width
    one.add_texts(["river boat", "cat mat"], [{"source": "a"}, {"source": "b"}], ids=["x", "y"])
    two.add_texts(["river boat again"], [{"source": "a"}], ids=["x"])
    assert (one.count(), two.count()) == (2, 1)
    assert two.get_by_ids(["x", "y"])[0].page_content == "river boat again" and len(two.get_by_ids(["y"])) == 0
    assert [d.id for d in two.similarity_search("river boat cat mat", k=5)] == ["x"]
    assert one.sources() == {"a": 1, "b": 1} and two.sources() == {"a": 1}
    assert two.delete_where({"source": "a"}) == 1 and one.count() == 2
    two.add_texts(["again"], ids=["z"])
    two.delete()
    assert (one.count(), two.count()) == (2, 0)
    one.drop_collection()
    assert one.count() == 0 and one.similarity_search("river") == [] and two.count() == 0
    narrower = PgKnowledgeBase(database, WordHashEmbeddings(dim=16), collection=one.collection)
    narrower.add_texts(["river again"], ids=["w"])  # dropped, the collection may take another width
    assert narrower.similarity_search("river", k=1)[0].id == "w"


def test_two_processes_on_one_database_see_each_others_writes(postgres_server):
    url = postgres_server()
    first, second = Database(url), Database(url)  # two pools, as two processes would have
    try:
        first.upgrade()
        reader = PgKnowledgeBase(second, WordHashEmbeddings())  # opened while nothing is stored
        writer = PgKnowledgeBase(first, WordHashEmbeddings())
        assert reader.similarity_search("river") == []
        writer.add_texts(["river boat", "cat mat"], [{"source": "a"}, {"source": "b"}], ids=["r", "c"])
        assert reader.count() == 2 and reader.similarity_search("river", k=1)[0].id == "r"
        reader.add_texts(["river changed"], ids=["r"])
        assert writer.get_by_ids(["r"])[0].page_content == "river changed"
        reader.delete(["c"])
        assert writer.sources() == {} and writer.count() == 1

        # first writes to a new collection, from both processes at once: one width, one index
        collection = fresh()
        stores = [PgKnowledgeBase(db, WordHashEmbeddings(), collection=collection) for db in (first, second) * 3]

        def write(n: int) -> None:
            stores[n].add_texts([f"thread {n} line {i}" for i in range(10)])

        threads = [threading.Thread(target=write, args=(n,)) for n in range(len(stores))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert stores[0].count() == stores[1].count() == 60
        assert stores[1].similarity_search_with_score("thread 4 line 7", k=1)[0][1] == pytest.approx(1.0, abs=1e-6)
        with first.connection() as conn:
            assert conn.execute("SELECT count(*) AS n FROM kb_meta WHERE collection = %s AND key = 'dim'",
                                (collection,)).fetchone()["n"] == 1
            assert conn.execute("SELECT count(*) AS n FROM pg_indexes WHERE indexname = %s",
                                (stores[0].index_name,)).fetchone()["n"] == 1
    finally:
        first.close()
        second.close()


# --- HNSW against the exact scan --------------------------------------------------------------


@pytest.fixture
def index_only(database) -> Iterator[Database]:
    """The module's database, where the planner never scans the table: once it has statistics, it
    would rightly scan a table this small rather than search the index, which is what is measured."""
    forced = Database(make_conninfo(database.url, options="-c enable_seqscan=off -c enable_bitmapscan=off"))
    yield forced
    forced.close()


def test_hnsw_recall_at_10_against_the_exact_scan(index_only):
    # random unit vectors are the hard case for a graph index (no clusters to follow)
    n, dim, k = 3000, 64, 10
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n + 40, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = _Stored(vectors)
    collection = fresh()
    hnsw = PgKnowledgeBase(index_only, embeddings, collection=collection)
    exact = PgKnowledgeBase(index_only, embeddings, collection=collection, exact=True)
    for first in range(0, n, 1000):
        texts = [f"chunk-{i}" for i in range(first, first + 1000)]
        metadatas = [{"half": i % 2} | ({"rare": "yes"} if i % 100 == 0 else {}) for i in range(first, first + 1000)]
        hnsw.add_texts(texts, metadatas, ids=texts)
    with index_only.connection() as conn:
        conn.execute("ANALYZE kb_documents")  # statistics now, not whenever autovacuum comes by
    probes = [vectors[n + q].tolist() for q in range(40)]

    def recall(filter_=None) -> float:
        found = []
        for probe in probes:
            truth = [d.id for d in exact.similarity_search_by_vector(probe, k, filter_)]
            got = [d.id for d in hnsw.similarity_search_by_vector(probe, k, filter_)]
            assert len(got) == len(truth) == k
            found.append(len(set(got) & set(truth)) / k)
        return float(np.mean(found))

    assert recall() >= 0.98
    assert recall({"half": 1}) >= 0.98  # an iterative scan: a filter that drops half the rows
    assert recall({"rare": "yes"}) == 1.0  # 30 rows match: the index finds fewer than asked, the scan answers
    truth = exact.similarity_search_with_score_by_vector(probes[0], k)
    assert_same_hits(truth[:3], hnsw.similarity_search_with_score_by_vector(probes[0], k)[:3])
    # the index is really what answers: starved of candidates, its recall drops
    hnsw.ef_search = k
    assert recall() < 0.95
