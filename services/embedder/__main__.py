"""``python -m services.embedder [flags]`` — run the embedder (same as ``baton serve embedder``)."""

from __future__ import annotations

import sys

from baton.runtime.entrypoint import run_service
from services.embedder.settings import EmbedderSettings

DESCRIPTION = """\
The embedder: text in, vectors out. Serves the Embedder gRPC contract (Embed, EmbedStream for bulk ingest, Tokenize
with code-point offsets, CountTokens, Info) and a TEI-compatible HTTP API on its own port (POST /embed, GET /info,
GET /health, POST /v1/embeddings in OpenAI's shape, GET /metrics, docs at /docs), over one dynamic batcher that
packs concurrent requests into batches by token budget. Models load from local sentence-transformers folders only
(default: the offline all-MiniLM-L6-v2). On a GPU, bulk streams hold an EMBEDDING_BULK lease from the scheduler.

examples:
  python -m services.embedder                                        # MiniLM on CPU, gRPC :50061, HTTP :8081
  python -m services.embedder --backend onnx                         # ONNX Runtime (exported once, cached)
  python -m services.embedder --model-path /models/bge-m3 --languages '*' --max-batch-tokens 32768
  curl -s localhost:8081/embed -H 'content-type: application/json' -d '{"inputs": "hello"}'
"""


def main(argv: list[str] | None = None) -> None:
    run_service(
        "embedder", EmbedderSettings, argv, description=DESCRIPTION, serve="services.embedder.server:serve", models=True
    )


if __name__ == "__main__":
    main(sys.argv[1:])
