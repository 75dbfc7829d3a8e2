"""LangChain's standard vector-store suite (langchain-tests) run against the knowledge base.

The suite brings its own embeddings (`DeterministicFakeEmbedding`, 6 dimensions): its tests are
about storage semantics (upsert, delete, ids, ordering), not meaning. Every test of the suite
runs, sync and async, on a fresh store in a temporary SQLite file.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_tests.integration_tests.vectorstores import VectorStoreIntegrationTests

from tools.knowledge_base import KnowledgeBase

# The suite's async tests are plain `async def`s, so they need pytest-asyncio's mark; a module mark
# also lands on the sync tests, where pytest-asyncio merely warns that it is not needed.
pytestmark = [
    pytest.mark.asyncio(loop_scope="function"),
    pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'"),
]


class TestKnowledgeBaseStandard(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self, tmp_path) -> Iterator[KnowledgeBase]:  # type: ignore[override]
        store = KnowledgeBase(tmp_path / "kb.sqlite", self.get_embeddings())
        try:
            yield store
        finally:
            store.close()
