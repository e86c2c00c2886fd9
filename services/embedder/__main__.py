"""``python -m services.embedder [flags]`` — run the embedder (same as ``baton serve embedder``)."""

from __future__ import annotations

import asyncio
import os
import sys

from pydantic import ValidationError

from baton.runtime.errors import BatonError
from baton.runtime.logging import configure_logging
from baton.runtime.settings import settings_from_args
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
    try:
        settings = settings_from_args(EmbedderSettings, argv, prog="baton serve embedder", description=DESCRIPTION)
    except ValidationError as error:
        sys.exit(f"baton serve embedder: invalid settings:\n{error}")
    configure_logging("embedder", level=settings.log_level, fmt=settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub, ever
    from services.embedder.server import serve  # heavy imports after logging is set up

    try:
        asyncio.run(serve(settings))
    except BatonError as error:  # a configuration problem found while loading: say what to do, no traceback
        sys.exit(f"baton serve embedder: {error.message}")


if __name__ == "__main__":
    main(sys.argv[1:])
