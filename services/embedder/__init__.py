"""Embedder service (Embedder gRPC + TEI-compatible HTTP). Contract: proto/baton/v1/embedder.proto.

Not implemented yet: issue 3 (RAG memory) builds it on the shared runtime in ``baton.runtime``.
"""
