"""Sentence embeddings (sentence-transformers) for retrieval: unit-length float32 rows, so dot = cosine."""

from __future__ import annotations

from typing import Any

import numpy as np

from models.assets import resolve
from models.device import resolve_device
from models.errors import AssetMissingError
from models.specs import EmbedderSpec


class Embedder:
    def __init__(self, model: Any, *, batch_size: int = 32) -> None:
        self.model = model
        self.batch_size = batch_size
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = self.model.get_embedding_dimension() or self.embed(["dimension probe"]).shape[1]
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) L2-normalised float32 rows. A lone string counts as a list of one."""
        if isinstance(texts, str):  # encode() would return a 1-D vector, which callers would misread
            texts = [texts]
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def build_embedder(spec: EmbedderSpec) -> Embedder:
    from sentence_transformers import SentenceTransformer  # seconds to import: only when used

    path = resolve(spec.source)
    if not path.is_dir():
        raise AssetMissingError(f"{str(path)!r} is not a sentence-transformers folder; point the source at one")
    device = resolve_device(spec.device)
    # fp32 unless a dtype is named: embeddings are small and half precision would only blur rankings
    kwargs = {} if spec.dtype == "auto" else {"model_kwargs": {"dtype": spec.dtype}}
    model = SentenceTransformer(str(path), device=str(device), local_files_only=True, **kwargs)
    return Embedder(model)
