"""LangChain `Embeddings` over the project's sentence-transformers embedder (MiniLM by default).

The model loads on the first call, once per spec, and is shared by every adapter built from the
same spec in this process (the knowledge base, the retrieval tool, the CLI) — loading it is
seconds, so nothing pays for it until text is actually embedded.
"""

from __future__ import annotations

import threading

from langchain_core.embeddings import Embeddings

from models.embedder import Embedder, build_embedder
from models.specs import EmbedderSpec

DEFAULT_EMBEDDER = EmbedderSpec(source="shipped:all-minilm-l6-v2", device="cpu")

_shared: dict[str, Embedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(spec: EmbedderSpec) -> Embedder:
    """The process-wide `Embedder` for `spec`, built on first use."""
    key = spec.model_dump_json()
    with _shared_lock:  # held while loading, so two threads never load the same model twice
        if key not in _shared:
            _shared[key] = build_embedder(spec)
        return _shared[key]


class MiniLMEmbeddings(Embeddings):
    """`embed_documents` / `embed_query` through `models.embedder` (L2-normalised rows).

    Pass a spec (default: the shipped all-MiniLM-L6-v2 on the CPU) or an already built `Embedder`.
    """

    def __init__(self, spec: EmbedderSpec | None = None, *, embedder: Embedder | None = None) -> None:
        if spec is not None and embedder is not None:
            raise ValueError("pass either an EmbedderSpec or an Embedder, not both")
        self.spec = spec if spec is not None else DEFAULT_EMBEDDER
        self._embedder = embedder

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = shared_embedder(self.spec)
        return self._embedder

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def name(self) -> str:
        """What made these vectors, as a knowledge base records it."""
        return self.spec.source

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed(list(texts)).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.embed([text])[0].tolist()
