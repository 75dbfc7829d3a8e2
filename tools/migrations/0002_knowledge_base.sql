-- The knowledge base on Postgres (tools/knowledge_base_pg.py): chunks with their embeddings, and
-- what each collection records about its embedder. A collection is one knowledge base; several
-- share these tables, so every key starts with it.

-- `embedding` is a `vector` without a fixed dimension: collections may be built by embedders of
-- different widths. A collection holds one width (kb_meta records it and the store refuses any
-- other), and its HNSW index is a partial expression index on `embedding::vector(<width>)` over that
-- collection's rows alone, which the store creates once the width is known.
CREATE TABLE kb_documents (
    collection text NOT NULL,
    id text NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,  -- insertion order, kept by upserts: it breaks distance ties
    text text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    embedding vector NOT NULL,
    PRIMARY KEY (collection, id)
);
-- metadata filters (`source` on every re-ingest, filtered searches) are narrowed by containment
CREATE INDEX kb_documents_metadata ON kb_documents USING gin (metadata jsonb_path_ops);

-- per collection: `dim` (the embedding width) and `embedding` (the embedder's name)
CREATE TABLE kb_meta (
    collection text NOT NULL,
    key text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (collection, key)
);
