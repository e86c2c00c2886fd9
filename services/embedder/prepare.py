"""``python -m services.embedder.prepare [flags]`` — get the configured model ready to serve, then exit.

Loading a model for the first time can do one-off work: the bundled multilingual-e5-small is dequantized and exported
to ONNX (30-60 s on a 2-core CPU), and so is any folder served with the onnx backend. The service does it on its
first start, while its health check says NOT_SERVING; set-up scripts and image builds run this instead, so that the
first start (`make demo`, a test, a fresh container) loads the cached export in seconds. It reads the service's
own flags and BATON_EMBEDDER_* variables — the cache is ``--onnx-cache-dir`` (default home/models/onnx) — and does
nothing more when the export is already there.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from baton.runtime.entrypoint import run_service
from baton.runtime.logging import log_event
from services.embedder.settings import EmbedderSettings

log = logging.getLogger(__name__)

DESCRIPTION = f"""\
{__doc__.split(chr(10), 2)[2].strip()}

examples:
  python -m services.embedder.prepare --onnx-cache-dir var/cache/onnx     # the default multilingual-e5-small
  python -m services.embedder.prepare --model all-minilm-l6-v2
"""


async def prepare(settings: EmbedderSettings) -> None:
    """Load the model as the service would (exporting it if its cache lacks it), then let it go."""
    from services.embedder.backends import load_model
    from services.embedder.server import load_options

    started = time.monotonic()
    model = await asyncio.to_thread(load_model, load_options(settings))
    log_event(
        log, "embedder.prepared", model=model.card.model_id, backend=model.card.backend,
        onnx_cache=str(settings.resolved_onnx_cache_dir()), seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    run_service(
        "embedder", EmbedderSettings, argv, description=DESCRIPTION, serve="services.embedder.prepare:prepare",
        models=True, prog="python -m services.embedder.prepare",
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
