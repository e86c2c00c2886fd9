"""The ingest pipeline: parse → clean → dedup → chunk by tokens → embed → store (DESIGN.md, "RAG pipeline")."""
