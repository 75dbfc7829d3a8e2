"""The knowledge base (sqlite-vec in one SQLite file) and ingestion of notes into it.

Most tests here are about storage, filtering and ingestion bookkeeping, not about meaning, so they
use `WordHashEmbeddings`, a deterministic bag-of-words fake (each word adds 1 to a hashed bucket):
texts that share words are near, fast and with no model to load. Meaning is tested once, in the
smoke test at the end, with the real shipped MiniLM.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

from models.errors import CorruptMediaError
from tools.ingest import IngestError, ingest_paths, markdown_sections, split_text
from tools.knowledge_base import KnowledgeBase, KnowledgeBaseError


class WordHashEmbeddings(Embeddings):
    """Fake embeddings (see the module docstring): a normalised histogram of hashed words."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def _one(self, text: str) -> list[float]:
        vector = np.zeros(self.dim, dtype=np.float32)
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norm = float(np.linalg.norm(vector))
        return (vector / norm if norm else vector).tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._one(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._one(text)


@pytest.fixture
def kb(tmp_path):
    store = KnowledgeBase(tmp_path / "kb.sqlite", WordHashEmbeddings())
    yield store
    store.close()


def write_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A minimal valid PDF, by hand: one Helvetica text line per string, one page per list."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects = {
        1: "<< /Type /Catalog /Pages 2 0 R >>",
        3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    kids = []
    for i, lines in enumerate(pages):
        page, contents = 4 + 2 * i, 5 + 2 * i
        kids.append(f"{page} 0 R")
        stream = "BT /F1 12 Tf 72 720 Td 16 TL " + " ".join(f"({esc(line)}) Tj T*" for line in lines) + " ET"
        objects[page] = (
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {contents} 0 R >>"
        )
        objects[contents] = f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream"
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode("latin-1")
    xref = len(out)
    size = max(objects) + 1
    out += f"xref\n0 {size}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offsets[n]:010d} 00000 n \n" for n in range(1, size)).encode()
    out += f"trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
    return path


# --- the store --------------------------------------------------------------------------------


def test_add_search_get_delete(kb):
    ids = kb.add_texts(
        ["the cat sat on the mat", "stock prices fell sharply", "a cat chased a mouse"],
        [{"topic": "pets"}, {"topic": "money"}, {"topic": "pets"}],
    )
    assert len(set(ids)) == 3 and kb.count() == 3
    top = kb.similarity_search("cat mat", k=2)
    assert [d.id for d in top] == [ids[0], ids[2]]
    assert top[0] == Document(id=ids[0], page_content="the cat sat on the mat", metadata={"topic": "pets"})
    assert kb.get_by_ids([ids[2], "missing", ids[0]]) == [kb.get_by_ids([ids[2]])[0], top[0]]

    kb.delete([ids[0], "missing"])
    assert kb.count() == 2
    assert [d.id for d in kb.similarity_search("cat mat", k=5)] == [ids[2], ids[1]]
    assert kb.get_by_ids([ids[0]]) == []


def test_upsert_replaces_instead_of_duplicating(kb):
    kb.add_texts(["old words here", "other"], [{"v": 1}, {"v": 1}], ids=["a", "b"])
    kb.add_texts(["brand new text"], [{"v": 2}], ids=["a"])
    assert kb.count() == 2
    assert kb.get_by_ids(["a"]) == [Document(id="a", page_content="brand new text", metadata={"v": 2})]
    # the vector was replaced too: the old words no longer find "a" first
    assert kb.similarity_search("brand new", k=1)[0].id == "a"
    assert kb.similarity_search("old words here", k=1)[0].id != "a"
    # the same id twice in one call: the last one wins
    kb.add_texts(["first", "second"], ids=["c", "c"])
    assert kb.get_by_ids(["c"])[0].page_content == "second" and kb.count() == 3


def test_scores_are_cosine_similarity_and_relevance_is_in_unit_range(kb):
    kb.add_texts(["alpha beta", "gamma delta", "alpha gamma"], ids=["ab", "gd", "ag"])
    scored = kb.similarity_search_with_score("alpha beta", k=3)
    assert scored[0][0].id == "ab" and scored[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in scored] == sorted((s for _, s in scored), reverse=True)
    relevance = kb.similarity_search_with_relevance_scores("alpha beta", k=3)
    assert all(0.0 <= r <= 1.0 for _, r in relevance)
    assert relevance[0][1] == pytest.approx(1.0, abs=1e-5)


def test_filter_still_returns_k_when_matches_are_far_down(kb):
    # 60 chunks that match the query well, from source a; 4 weak ones from source b
    kb.add_texts([f"river boat number {i}" for i in range(60)], [{"source": "a", "i": i} for i in range(60)])
    kb.add_texts([f"mountain hike {i} boat" for i in range(4)], [{"source": "b", "i": i} for i in range(4)])
    found = kb.similarity_search("river boat", k=3, filter={"source": "b"})
    assert len(found) == 3 and {d.metadata["source"] for d in found} == {"b"}
    assert len(kb.similarity_search("river boat", k=10, filter={"source": "b"})) == 4
    assert kb.similarity_search("river boat", k=3, filter={"source": "nowhere"}) == []
    assert [d.metadata for d in kb.similarity_search("boat", k=1, filter={"source": "a", "i": 7})] == [
        {"source": "a", "i": 7}
    ]
    odd = kb.similarity_search("river boat", k=5, filter=lambda d: d.metadata["i"] % 2 == 1)
    assert len(odd) == 5 and all(d.metadata["i"] % 2 for d in odd)
    assert sorted(kb.ids_where({"source": "b"})) == sorted(d.id for d in kb.similarity_search("x", 10, {"source": "b"}))
    assert kb.sources() == {"a": 60, "b": 4}


def test_persistence_across_reopen(tmp_path):
    path = tmp_path / "notes" / "kb.sqlite"  # the folder is created
    with KnowledgeBase(path, WordHashEmbeddings()) as kb:
        kb.add_texts(["persist me please", "something else"], [{"source": "x"}, {"source": "y"}], ids=["p", "s"])
        before = kb.similarity_search_with_score("persist", k=2)
    with KnowledgeBase(path, WordHashEmbeddings()) as kb:
        assert kb.count() == 2
        assert kb.similarity_search_with_score("persist", k=2) == before
        kb.add_texts(["persist again"], ids=["p2"])  # and it can still be written
        assert kb.count() == 3


def test_refuses_other_embeddings_and_foreign_files(tmp_path):
    path = tmp_path / "kb.sqlite"
    with KnowledgeBase(path, WordHashEmbeddings(dim=64)) as kb:
        kb.add_texts(["hello"])
    with KnowledgeBase(path, WordHashEmbeddings(dim=32)) as kb:
        with pytest.raises(KnowledgeBaseError, match="64-dimensional.*32-dimensional"):
            kb.similarity_search("hello")
        with pytest.raises(KnowledgeBaseError, match="64-dimensional"):
            kb.add_texts(["more"])
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(KnowledgeBaseError, match="not a Signalgraph knowledge base"):
        KnowledgeBase(junk, WordHashEmbeddings())


def test_empty_store_retriever_mmr_and_from_texts():
    store = KnowledgeBase(":memory:", WordHashEmbeddings())
    assert store.similarity_search("anything") == []
    store = KnowledgeBase.from_texts(
        ["red apple pie", "red apple tart", "red apple cake", "green tea"],
        WordHashEmbeddings(),
        metadatas=[{"n": i} for i in range(4)],
    )
    retriever = store.as_retriever(search_kwargs={"k": 2, "filter": {"n": 3}})
    assert [d.page_content for d in retriever.invoke("tea")] == ["green tea"]
    mmr = store.max_marginal_relevance_search("red apple", k=2, fetch_k=4, lambda_mult=0.3)
    assert len(mmr) == 2 and mmr[0].page_content.startswith("red apple")


def test_concurrent_writers_share_one_store(kb):
    def write(n: int) -> None:
        kb.add_texts([f"thread {n} line {i}" for i in range(10)])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kb.count() == 40


# --- splitting --------------------------------------------------------------------------------


def test_split_text_respects_size_and_overlaps():
    text = "\n\n".join(" ".join(f"w{p}_{i}" for i in range(60)) + "." for p in range(5))
    chunks = split_text(text, chunk_chars=200, overlap=40)
    assert all(len(c) <= 200 for c in chunks)
    words = text.split()
    assert set(words) == {w for c in chunks for w in c.split()}  # nothing lost
    for a, b in zip(chunks, chunks[1:]):  # each chunk starts with the end of the one before
        assert a.split()[-1] in b.split()[:8]
    assert split_text("   ") == []
    with pytest.raises(IngestError):
        split_text("x", chunk_chars=100, overlap=100)


def test_markdown_sections_follow_headings_not_code():
    md = "intro\n\n# Guide\n## Install\nrun pip\n```\n# a comment\n```\n## Use\nimport it\n"
    assert markdown_sections(md) == [
        (None, "intro\n"),
        ("Guide > Install", "# Guide\n## Install\nrun pip\n```\n# a comment\n```"),
        ("Guide > Use", "## Use\nimport it"),
    ]


# --- ingesting --------------------------------------------------------------------------------


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "todo.txt").write_text("Buy milk and eggs.\n\nCall the plumber about the leaking kitchen sink.")
    (folder / "guide.md").write_text(
        "# Garden\nWater the tomatoes every morning.\n\n## Pests\nAphids are removed with soapy water.\n"
    )
    write_pdf(folder / "sub" / "manual.pdf", [["Page one is about bicycles."], ["Page two explains tyre pressure."]])
    (folder / "data.csv").write_text("a,b\n1,2\n")
    (folder / ".hidden.txt").write_text("never ingested")
    return folder


def test_ingest_folder_chunks_with_sources_positions_pages_and_headings(kb, notes):
    report = ingest_paths(kb, [notes], chunk_chars=200, overlap=30)
    assert {Path(f.source).name: f.chunks for f in report.files} == {"guide.md": 2, "todo.txt": 1, "manual.pdf": 2}
    assert [(Path(s.source).name, s.reason.split(";")[0]) for s in report.skipped] == [
        ("data.csv", "unsupported file type '.csv'")
    ]
    assert kb.count() == 5 and report.chunks_added == 5

    pdf = kb.similarity_search("tyre pressure", k=1)[0]
    assert pdf.metadata == {"source": str(notes / "sub" / "manual.pdf"), "position": 1, "kind": "pdf", "page": 2}
    assert "tyre pressure" in pdf.page_content
    pests = kb.similarity_search("aphids soapy water", k=1)[0]
    assert pests.metadata["heading"] == "Garden > Pests" and pests.metadata["position"] == 1
    assert report.summary().endswith("3 files ingested (5 chunks embedded), 1 skipped")


def test_reingest_keeps_unchanged_replaces_changed_and_never_duplicates(kb, notes):
    ingest_paths(kb, [notes])
    total = kb.count()
    again = ingest_paths(kb, [notes, notes / "todo.txt"])  # a file named twice is ingested once
    assert kb.count() == total and again.chunks_added == 0
    assert all(f.unchanged == f.chunks for f in again.files)

    todo = notes / "todo.txt"
    todo.write_text("Renew the passport before June.")
    changed = ingest_paths(kb, [todo])
    assert (changed.files[0].added, changed.files[0].removed) == (1, 1)
    assert kb.count() == total
    assert [d.page_content for d in kb.similarity_search("x", k=10, filter={"source": str(todo)})] == [
        "Renew the passport before June."
    ]

    todo.write_text("   \n")
    emptied = ingest_paths(kb, [todo])
    assert "no text" in emptied.skipped[0].reason and "1 chunks" in emptied.skipped[0].reason
    assert kb.ids_where({"source": str(todo)}) == []


def test_bad_files_are_reported_and_do_not_stop_the_others(kb, tmp_path):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is no pdf at all")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "ok.txt").write_text("fine text")
    report = ingest_paths(kb, [tmp_path / "broken.pdf", tmp_path / "latin.txt", tmp_path / "blob.txt",
                               tmp_path / "missing.md", tmp_path / "ok.txt"])
    reasons = {Path(s.source).name: s.reason for s in report.skipped}
    assert "not a readable PDF" in reasons["broken.pdf"]
    assert "not UTF-8" in reasons["latin.txt"]
    assert "binary" in reasons["blob.txt"]
    assert "does not exist" in reasons["missing.md"]
    assert [Path(f.source).name for f in report.files] == ["ok.txt"]


def test_media_go_through_callbacks_that_return_media_ids(kb, tmp_path):
    (tmp_path / "talk.wav").write_bytes(b"RIFF....")  # the callbacks below never decode the bytes
    (tmp_path / "photo.png").write_bytes(b"\x89PNG....")
    (tmp_path / "noise.ogg").write_bytes(b"OggS")
    skipped = ingest_paths(kb, [tmp_path])  # no callbacks: media are skipped, with a note
    assert sorted(Path(s.source).name for s in skipped.skipped) == ["noise.ogg", "photo.png", "talk.wav"]
    assert "no transcriber" in {Path(s.source).name: s.reason for s in skipped.skipped}["talk.wav"]

    def transcribe(path: Path):
        if path.suffix == ".ogg":
            raise CorruptMediaError("the audio file is cut short; send it again")
        return "audio-1", "we agreed to ship the release on friday"

    report = ingest_paths(kb, [tmp_path], transcribe=transcribe, describe=lambda p: ("image-1", "a red bicycle"))
    assert {Path(f.source).name: (f.kind, f.media) for f in report.files} == {
        "talk.wav": ("audio", "audio-1"), "photo.png": ("image", "image-1")
    }
    assert report.skipped[0].reason == "the audio file is cut short; send it again"
    hit = kb.similarity_search("release friday", k=1)[0]
    assert hit.metadata["media"] == "audio-1" and hit.metadata["kind"] == "audio"


# --- with the real embeddings -----------------------------------------------------------------


@pytest.mark.smoke
def test_smoke_minilm_finds_the_paraphrased_note_and_survives_reopening(tmp_path):
    from tools.embeddings import MiniLMEmbeddings

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "household.txt").write_text(
        "The boiler needs its annual service in October; the engineer's number is on the fridge.\n\n"
        "Recycling goes out on Tuesday evenings, garden waste every other Thursday."
    )
    (notes / "travel.md").write_text(
        "# Travel\n## Passport\nMy passport expires in March 2027, renew it three months ahead.\n\n"
        "## Packing\nAlways pack a universal power adapter and a spare phone charger.\n"
    )
    pdf = write_pdf(notes / "recipes.pdf", [
        ["Pancakes: flour, two eggs, milk, a pinch of salt."],
        ["Bake sourdough bread at 230 degrees for forty minutes."],
    ])
    from pypdf import PdfReader
    assert "sourdough" in PdfReader(pdf).pages[1].extract_text()

    embeddings = MiniLMEmbeddings()
    path = tmp_path / "kb.sqlite"
    with KnowledgeBase(path, embeddings) as kb:
        report = ingest_paths(kb, [notes], chunk_chars=160, overlap=20)
        assert not report.skipped and kb.count() == 6
        cases = {
            "when does my travel document run out?": ("travel.md", 0, {"heading": "Travel > Passport"}),
            "what temperature should the oven be for bread?": ("recipes.pdf", 1, {"page": 2}),
            "which day do I put the bins out?": ("household.txt", 1, {}),
        }
        for query, (name, position, extra) in cases.items():
            (top, score), (_, runner_up) = kb.similarity_search_with_score(query, k=3)[:2]
            assert (Path(top.metadata["source"]).name, top.metadata["position"]) == (name, position), query
            assert extra.items() <= top.metadata.items()
            assert score > runner_up + 0.1, (query, score, runner_up)  # measured margins: 0.17 to 0.39
    with KnowledgeBase(path, MiniLMEmbeddings()) as kb:  # reopened: same answers, nothing re-embedded
        top = kb.similarity_search("when does my travel document run out?", k=1)[0]
        assert top.metadata["source"] == str(notes / "travel.md")
        assert ingest_paths(kb, [notes], chunk_chars=160, overlap=20).chunks_added == 0
