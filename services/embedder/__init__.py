"""The embedder service: the ``Embedder`` gRPC contract (proto/baton/v1/embedder.proto) and a TEI-compatible HTTP
API in one process, over one core.

Modules: ``settings`` (EmbedderSettings) · ``model`` (the EmbeddingModel protocol, the sentence-transformers
backend) · ``onnx_model`` (the ONNX Runtime backend) · ``tokenization`` (prompt, truncation, offsets) ·
``batcher`` (dynamic batching by token budget) · ``core`` (validation and the use cases; no grpc, no fastapi) ·
``lease`` (the EMBEDDING_BULK GPU lease) · ``servicer`` (gRPC) · ``http`` (FastAPI) · ``metrics`` · ``server``
(wiring) · ``__main__`` (``python -m services.embedder``). The client is ``baton.clients.embedder``.
"""
