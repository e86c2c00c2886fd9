"""``python -m services.gateway [flags]`` — run the public HTTP API (same as ``baton serve gateway``)."""

from __future__ import annotations

import sys

from baton.runtime.logging import configure_logging
from baton.runtime.settings import settings_from_args
from services.gateway.settings import GatewaySettings

DESCRIPTION = """\
The gateway: baton's only public port. Upload documents or ingest a folder into memory, search it with
citations, embed texts, and chat with cited answers (OpenAI-compatible). Needs the embedder service
(BATON_GATEWAY_EMBEDDER_ADDR); chat and /v1/models need the inference service (BATON_GATEWAY_INFERENCE_ADDR).

examples:
  python -m services.gateway --port 8000 --embedder-addr 127.0.0.1:50061
  BATON_GATEWAY_ALLOWED_ROOTS=$HOME/notes python -m services.gateway   # allow ingesting ~/notes by path
"""


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_args(GatewaySettings, argv, prog="baton serve gateway", description=DESCRIPTION)
    configure_logging("gateway", level=settings.log_level, fmt=settings.log_format)
    import uvicorn

    from services.gateway.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        log_config=None,  # keep our structured logging
    )


if __name__ == "__main__":
    main(sys.argv[1:])
