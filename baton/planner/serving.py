"""The memory and speed of serving a model with its LoRA adapters (the inference service).

- **weights** — bf16: 2 B per parameter (fp32 on a CPU: 4 B); fp8: 1 B per linear-layer parameter (embeddings
  and head stay bf16); int4 (AWQ/GPTQ): 0.5 B plus a bf16 scale and zero per group of 128.
- **KV cache** — 2 (keys and values) x layers x KV heads x head size x dtype bytes per token, for
  ``context_len x concurrent_seqs`` tokens (vLLM pages it; the hf engine allocates per request, the same total).
- **LoRA slots** — vLLM preallocates ``max_loras`` adapters of ``max_lora_rank`` over every adaptable layer, bf16.
- **activations** — the largest forward vLLM profiles: ``max_batched_tokens`` tokens through one layer (hidden
  states, q/k/v, the MLP's widths) plus the sampler's fp32 logits for ``max_num_seqs`` sequences.
- **CUDA graphs** (vLLM) and the **CUDA context**.

Speed: decoding reads every active weight once per step, so one stream runs at about ``bandwidth x 0.8 / (active
weight bytes + its KV bytes)`` tokens/s; N streams share the weight reads (a MoE batch touches more experts) until
compute (``bf16 rate x 0.5 / 2 FLOPs per active parameter``) caps them. A rough figure, good to 2x.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from baton.planner.catalog import GpuSpec
from baton.planner.models import ModelArch
from baton.planner.plan import Breakdown, Item, LeaseAdvice, Plan, Saver, TimeEstimate, Verdict, gib, verdict
from baton.planner.training import DEFAULT_TARGETS, TrainingJob, lora_params

MIB = 1 << 20
GIB = 1 << 30
CUDA_CONTEXT_BYTES = 600 * MIB
CUDA_GRAPHS_BYTES = 1 * GIB  # vLLM's captured graphs for its batch sizes (logs show 0.3-1.5 GiB)
BANDWIDTH_EFFICIENCY = 0.8
DECODE_MFU = 0.5
INT4_GROUP = 128
HOST_BASE_BYTES = 4 * GIB  # Python, torch, vLLM's processes


class ServingJob(BaseModel):
    model_config = ConfigDict(frozen=True)

    engine: Literal["vllm", "hf"] = "vllm"
    weights: Literal["float32", "bfloat16", "fp8", "int4"] = "bfloat16"
    kv_dtype: Literal["bfloat16", "fp8"] = "bfloat16"
    context_len: int = Field(32768, ge=16)
    concurrent_seqs: int = Field(4, ge=1)
    max_loras: int = Field(4, ge=0, description="Adapters resident at once.")
    max_lora_rank: int = Field(16, ge=1)
    max_batched_tokens: int = Field(8192, ge=16, description="vLLM's chunked-prefill budget per step.")
    max_num_seqs: int = Field(256, ge=1, description="vLLM's scheduler limit (the sampler's logits).")
    prompt_tokens: int = Field(4096, ge=1, description="A typical prompt, for the time to first token.")


def weight_bytes(model: ModelArch, weights: str) -> int:
    if weights in ("float32", "bfloat16"):
        return model.total_params * (4 if weights == "float32" else 2)
    other = model.total_params - model.linear_params
    if weights == "fp8":
        return model.linear_params + other * 2
    return int(model.linear_params * (0.5 + 4 / INT4_GROUP)) + other * 2  # int4: bf16 scale and zero per group


def serving_memory(model: ModelArch, job: ServingJob, *, cpu: bool = False) -> Breakdown:
    kv_bytes = 1 if job.kv_dtype == "fp8" else 2
    kv_tokens = job.context_len * job.concurrent_seqs
    lora_job = TrainingJob(rank=job.max_lora_rank, targets=DEFAULT_TARGETS)
    width = model.intermediate_size if not model.is_moe else model.moe_intermediate_size * model.experts_per_token
    activations = job.max_batched_tokens * (6 * model.hidden_size + 2 * model.q_dim + 3 * width) * 2
    logits = min(job.max_num_seqs, job.max_batched_tokens) * model.vocab_size * 4 * 2
    items = [
        Item(name="weights", bytes=weight_bytes(model, job.weights), note=job.weights),
        Item(
            name="KV cache",
            bytes=kv_tokens * model.kv_bytes_per_token(kv_bytes),
            note=f"{job.context_len:,} tokens x {job.concurrent_seqs} sequences x "
            f"{model.kv_bytes_per_token(kv_bytes) / 1024:,.0f} KiB",
        ),
        Item(
            name="LoRA slots",
            bytes=job.max_loras * lora_params(model, lora_job) * 2,
            note=f"{job.max_loras} x rank {job.max_lora_rank}, bf16",
        ),
        Item(name="activations and sampler", bytes=activations + logits),
    ]
    if job.engine == "vllm" and not cpu:
        items.append(Item(name="CUDA graphs", bytes=CUDA_GRAPHS_BYTES))
    if not cpu:
        items.append(Item(name="CUDA context", bytes=CUDA_CONTEXT_BYTES))
    return Breakdown.of(items)


def serving_speed(model: ModelArch, job: ServingJob, gpu: GpuSpec) -> TimeEstimate:
    weights = weight_bytes(model, job.weights)
    kv_per_stream = job.context_len / 2 * model.kv_bytes_per_token(1 if job.kv_dtype == "fp8" else 2)
    bandwidth = gpu.bandwidth_gb_s * 1e9 * BANDWIDTH_EFFICIENCY
    compute_cap = gpu.bf16_tflops * 1e12 * DECODE_MFU / (2 * model.active_params)
    one = min(compute_cap, bandwidth / (_active_weight_bytes(model, weights, 1) + kv_per_stream))
    n = job.concurrent_seqs
    many = min(compute_cap, n * bandwidth / (_active_weight_bytes(model, weights, n) + n * kv_per_stream))
    ttft = 2 * model.active_params * job.prompt_tokens / (gpu.bf16_tflops * 1e12 * DECODE_MFU)
    return TimeEstimate(
        seconds=0.0,
        how=(
            f"decode reads the active weights once per step: {one:,.0f} tokens/s for 1 stream, {many:,.0f} in all "
            f"for {n}; first token of a {job.prompt_tokens:,}-token prompt after ~{ttft:.2f} s"
        ),
        rates={"tokens_per_s_1": one, f"tokens_per_s_{n}": many, "ttft_s": ttft},
    )


def _active_weight_bytes(model: ModelArch, weights: int, streams: int) -> float:
    """Weight bytes one decode step reads: every dense weight, and the experts the batch's tokens pick."""
    if not model.is_moe:
        return weights
    share = model.expert_params / model.total_params
    touched = 1 - (1 - model.experts_per_token / model.num_experts) ** streams
    return weights * (1 - share) + weights * share * touched


def plan_serving(model: ModelArch, job: ServingJob, gpu: GpuSpec) -> Plan:
    memory = serving_memory(model, job, cpu=gpu.cpu)
    outcome = _verdict(model, job, gpu, memory)
    weights = weight_bytes(model, job.weights)
    return Plan(
        job="serving",
        title=f"Serving {model.name} ({job.weights}) with {job.engine}: {job.concurrent_seqs} x "
        f"{job.context_len:,} tokens, {job.max_loras} adapters",
        model=model.name,
        gpu=gpu,
        vram=memory,
        host_ram=Breakdown.of(
            [
                Item(name="process (Python, torch, engine)", bytes=HOST_BASE_BYTES),
                Item(name="weights offloaded while asleep", bytes=weights, note="vLLM sleep level 1 keeps them here"),
            ]
        ),
        disk=Breakdown.of([Item(name="model weights", bytes=model.total_params * model.weights_dtype_bytes)]),
        time=serving_speed(model, job, gpu),
        verdict=outcome,
        lease=LeaseAdvice(kind="SERVING", vram_bytes=memory.total_bytes, exclusive=False, preemptible=True),
        facts={
            "gpu_memory_utilization": round(min(1.0, memory.total_bytes / gpu.memory_bytes), 3),
            "kv_bytes_per_token": model.kv_bytes_per_token(1 if job.kv_dtype == "fp8" else 2),
            "active_params": model.active_params,
        },
        assumptions=["decode is memory-bound: tokens/s from bandwidth, capped by compute; good to about 2x"],
    )


def _verdict(model: ModelArch, job: ServingJob, gpu: GpuSpec, memory: Breakdown) -> Verdict:
    return verdict(
        job,
        memory.total_bytes,
        gpu.memory_bytes,
        _savers(job),
        lambda changed: serving_memory(model, changed, cpu=gpu.cpu).total_bytes,
        fits=f"fits: {gib(memory.total_bytes)} of {gib(gpu.memory_bytes, 0)} "
        f"(set gpu_memory_utilization to {memory.total_bytes / gpu.memory_bytes:.2f})",
    )


def _savers(job: ServingJob) -> list[Saver]:
    savers: list[Saver] = []
    if job.kv_dtype != "fp8":
        savers.append(("store the KV cache in fp8", {"kv_dtype": "fp8"}))
    if job.weights == "bfloat16":
        savers.append(("serve fp8 weights", {"weights": "fp8"}))
    if job.concurrent_seqs > 1:
        savers.append(("serve one sequence at a time", {"concurrent_seqs": 1}))
    context = job.context_len
    while context > 4096:
        context //= 2
        savers.append((f"limit the context to {context:,} tokens", {"context_len": context}))
    if job.weights != "int4":
        savers.append(("serve int4 (AWQ/GPTQ) weights", {"weights": "int4"}))
    return savers
