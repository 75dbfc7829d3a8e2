-- pgvector, for the knowledge base's embeddings
CREATE EXTENSION IF NOT EXISTS vector;
