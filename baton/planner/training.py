"""The memory, disk and time of a LoRA or QLoRA training job — the arithmetic, item by item.

Peak memory is what exists at the worst moment of a step (the end of the forward pass, as the backward pass starts):

- **weights** — QLoRA: every quantised linear layer at 4 bits (0.5 B/param) plus its quantisation constants (an
  fp32 absmax per 64 weights = 0.0625 B/param; with double quantisation an 8-bit absmax per 64 and an fp32 constant
  per 256 blocks = 0.0159 B/param). ``prepare_model_for_kbit_training`` casts every other half-precision parameter
  (embeddings, output head, norms, routers) to fp32: 4 B/param. Fused MoE experts (one 3-D parameter per layer in
  transformers 5) are not ``nn.Linear``: bitsandbytes leaves them unquantised and baton's trainer keeps them in the
  compute dtype (``quantize_experts`` plans for a trainer that does quantise them, as Unsloth's does). Plain LoRA:
  every parameter in the compute dtype.
- **LoRA** — rank x (in + out) per adapted layer, fp32 (peft keeps adapters in fp32 over a quantised base): 4 B
  weights + 4 B gradients + the optimizer's moments (AdamW 8 B, 8-bit AdamW 2 B, SGD 0).
- **activations** — the tensors autograd keeps for the backward pass, counted per token and layer from what a
  Llama/Qwen decoder layer saves: the layer input, both norm outputs and the residual between them (4 x hidden);
  q, its normed and rotated form, the attention output and its contiguous copy (4 x q width); k, rotated k, v
  (3 x kv width); the MLP's gate, up, activation and product (4 x intermediate; a MoE layer has that per routed
  expert, plus the gathered inputs and outputs, plus the router's fp32 logits); LoRA dropout's output and mask for
  every adapted layer's input; with a half-precision compute dtype, the fp32 copies that RMS norms make. Fused
  attention kernels (flash/SDPA) keep no seq x seq matrix; ``attention="eager"`` adds it. With gradient
  checkpointing only each layer's input is kept, plus one layer recomputed during the backward pass.
- **logits** — batch x seq x vocab x 13 B: the output head's result, the fp32 logits the loss reads, the
  log-softmax kept by the cross-entropy and the gradients overlap to about three fp32 copies (measured): often the
  largest item.
- **transient** — a 4-bit layer's weight dequantised for its matmul (the largest one).
- **CUDA context** (not on a CPU) and **allocator slack** (memory the caching allocator reserves but has not handed
  out: 8 % of the tensors made and freed every step).

The time is FLOPs over throughput: per trained token 2 FLOPs per active parameter forward, 2 backward (no weight
gradients for the frozen base), 2 more when checkpointing recomputes the forward, plus attention and the output
head; throughput is the GPU's bf16 rate times a model-flops utilisation (see ``MFU``): a rough figure, good to 2x.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from baton.planner.catalog import GIB, GpuSpec
from baton.planner.models import LinearShape, ModelArch, dtype_bytes
from baton.planner.plan import Breakdown, Item, LeaseAdvice, Plan, Saver, TimeEstimate, Verdict, gib, verdict

MIB = 1 << 20
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Optimizer = Literal["adamw_torch", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit", "sgd"]
OPTIMIZER_STATE_BYTES: dict[str, int] = {
    "adamw_torch": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "sgd": 0,
}
NF4_BYTES = 0.5
CONSTANTS_BYTES = 4 / 64  # one fp32 absmax per block of 64
DOUBLE_QUANT_CONSTANTS_BYTES = 1 / 64 + 4 / (64 * 256)  # 8-bit absmax per 64, fp32 per 256 blocks
CUDA_CONTEXT_BYTES = 600 * MIB  # CUDA context, cuBLAS workspace (measured 0.4-0.6 GiB on recent drivers)
# Reserved but not handed out by torch's caching allocator, as a share of the tensors made and freed every step.
ALLOCATOR_SLACK = 0.08
_DYNAMIC = ("LoRA gradients", "activations", "logits and loss", "dequantised weight")
GPU_HOST_BASE_BYTES = 3 * GIB  # Python, torch and the CUDA libraries in host memory
CPU_HOST_BASE_BYTES = 1 * GIB  # Python, torch, transformers, peft, bitsandbytes on a CPU
LOGITS_BYTES_PER_ELEMENT = 13
DATASET_BYTES_PER_TOKEN = 72  # token ids and labels as Python int lists (2 x (8 B pointer + 28 B int))
TYPICAL_SHARD_BYTES = 5 * 10**9  # weights are read through host memory one safetensors shard at a time
# Model-flops utilisation of LoRA training (share of the GPU's dense bf16 rate actually used). Dense models reach
# 35-45 % in bf16 LoRA; 4-bit dequantisation costs about a quarter of that; MoE layers (small expert matmuls,
# routing) about two thirds. Rough: good to 2x until a GPU run calibrates it (benchmarks/gpu/planner_check.py).
MFU = {"lora": 0.40, "qlora": 0.30}
MOE_MFU_FACTOR = 0.35


class TrainingJob(BaseModel):
    """A LoRA or QLoRA job: what ``baton train`` and the trainer's SubmitJob take, plus the amount of data."""

    model_config = ConfigDict(frozen=True)

    method: Literal["qlora", "lora"] = "qlora"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    rank: int = Field(16, ge=1, le=1024)
    targets: tuple[str, ...] = Field(DEFAULT_TARGETS, description="Module names, or ('all-linear',).")
    target_experts: bool = Field(False, description="LoRA on the MoE experts too (never the router).")
    quantize_experts: bool = Field(
        False, description="Plan for a trainer that quantises fused MoE experts (baton's keeps them in half precision)."
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    seq_len: int = Field(2048, ge=16)
    micro_batch: int = Field(1, ge=1)
    grad_accumulation: int = Field(8, ge=1)
    gradient_checkpointing: bool = True
    optimizer: Optimizer = "paged_adamw_8bit"
    attention: Literal["sdpa", "eager"] = "sdpa"
    chunked_loss: bool = Field(
        False, description="A fused cross-entropy (Unsloth, Liger) that never makes fp32 copies of the logits."
    )
    upcast_full_precision: bool = Field(
        True, description="QLoRA keeps embeddings, head and norms in fp32 (peft's prepare_model_for_kbit_training)."
    )
    dataset_tokens: int = Field(0, ge=0, description="Tokens of training text (0: time not estimated).")
    epochs: float = Field(1.0, gt=0)
    keep_checkpoints: int = Field(2, ge=0)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.seq_len * self.micro_batch


def adapted_shapes(model: ModelArch, job: TrainingJob) -> list[LinearShape]:
    """The linear layers the job's LoRA covers (the trainer's rule: experts only with target_experts)."""
    shapes = model.linear_shapes()
    if "all-linear" not in job.targets:
        shapes = [shape for shape in shapes if shape.name in job.targets]
    return [shape for shape in shapes if job.target_experts or not shape.expert]


def lora_params(model: ModelArch, job: TrainingJob) -> int:
    return sum(job.rank * (s.in_features + s.out_features) * s.count for s in adapted_shapes(model, job))


def training_memory(model: ModelArch, job: TrainingJob, *, cpu: bool = False) -> Breakdown:
    """Peak memory of the job, item by item (host memory on a CPU: no CUDA context there)."""
    d = dtype_bytes(job.compute_dtype)
    lora = lora_params(model, job)
    items = [
        *_weights(model, job, d),
        Item(name="LoRA weights", bytes=lora * 4, note=f"{lora:,} params x 4 B (fp32)"),
        Item(name="LoRA gradients", bytes=lora * 4, note="fp32"),
        Item(
            name="optimizer states",
            bytes=lora * OPTIMIZER_STATE_BYTES[job.optimizer],
            note=f"{job.optimizer}: {OPTIMIZER_STATE_BYTES[job.optimizer]} B/param",
        ),
        _activations(model, job, d),
        _logits(model, job, d),
        _dequantised_transient(model, job, d),
    ]
    if cpu:
        items.append(_mapped_source_weights(model, job))
    if not cpu:
        dynamic = sum(item.bytes for item in items if item.name in _DYNAMIC)
        items.append(
            Item(name="allocator slack", bytes=int(dynamic * ALLOCATOR_SLACK), note="8 % of the per-step tensors")
        )
        items.append(Item(name="CUDA context", bytes=CUDA_CONTEXT_BYTES))
    return Breakdown.of(items)


def _weights(model: ModelArch, job: TrainingJob, d: int) -> list[Item]:
    if job.method == "lora":
        return [Item(name="base weights", bytes=model.total_params * d, note=f"{model.total_params:,} params x {d} B")]
    experts_stay = model.fused_experts and not job.quantize_experts
    quantised = model.linear_params - (model.expert_params if experts_stay else 0)
    constants = DOUBLE_QUANT_CONSTANTS_BYTES if job.double_quant else CONSTANTS_BYTES
    full_precision = model.embedding_params + model.lm_head_params + model.norm_params + model.router_params
    kept_bytes = 4 if job.upcast_full_precision else model.weights_dtype_bytes
    items = [
        Item(name="base weights (4-bit)", bytes=int(quantised * NF4_BYTES), note=f"{quantised:,} params x 0.5 B"),
        Item(
            name="quantisation constants",
            bytes=int(quantised * constants),
            note="double quantisation" if job.double_quant else "fp32 absmax per 64",
        ),
        Item(
            name="embeddings, head, norms",
            bytes=full_precision * kept_bytes,
            note="fp32: prepare_model_for_kbit_training upcasts them" if job.upcast_full_precision else "as published",
        ),
    ]
    if experts_stay and model.expert_params:
        items.append(
            Item(
                name="MoE experts (unquantised)",
                bytes=model.expert_params * d,
                note=f"{model.expert_params:,} params x {d} B: fused experts are not nn.Linear",
            )
        )
    return items


def activation_bytes_per_layer(model: ModelArch, job: TrainingJob, d: int) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    h, q, kv = model.hidden_size, model.q_dim, model.kv_dim
    elements = 4 * h + 4 * q + 3 * kv
    if model.is_moe:
        k, width = model.experts_per_token, model.moe_intermediate_size
        elements += k * (2 * h + 4 * width) + model.shared_expert_intermediate_size * 4
        router = 2 * model.num_experts * 4  # fp32 router logits and their softmax
    else:
        elements += 4 * model.intermediate_size
        router = 0
    per_token = elements * d + router
    if d < 4:  # RMS norms compute in fp32 and keep their fp32 input
        per_token += (2 * h + q + kv) * 4
    if job.lora_dropout > 0:  # dropout's output (the LoRA input) and its mask, per adapted layer
        per_layer_inputs = sum(s.in_features * s.count for s in adapted_shapes(model, job)) / model.num_layers
        per_token += per_layer_inputs * (d + 1)
    if job.attention == "eager":
        per_token += model.num_heads * job.seq_len * d  # the attention probabilities, seq x seq per head
    return per_token


def _activations(model: ModelArch, job: TrainingJob, d: int) -> Item:
    tokens = job.tokens_per_micro_batch
    layer = activation_bytes_per_layer(model, job, d) * tokens
    if not job.gradient_checkpointing:
        return Item(
            name="activations",
            bytes=int(layer * model.num_layers + tokens * model.hidden_size * d),
            note=f"{model.num_layers} layers x {layer / MIB:,.1f} MiB, no checkpointing",
        )
    inputs = tokens * model.hidden_size * d * (model.num_layers + 1)
    return Item(
        name="activations",
        bytes=int(inputs + layer),
        note="checkpointing: each layer's input + one layer recomputed",
    )


def _logits(model: ModelArch, job: TrainingJob, d: int) -> Item:
    # The head's output, the fp32 logits the loss reads, log-softmax's output and the gradients of the backward
    # pass overlap to about three fp32 copies: 12.6-13.4 B per element measured on this CPU, fp32 and bf16 alike.
    # A fused cross-entropy keeps only the head output and its gradient, in the compute dtype.
    per_element = 2 * d if job.chunked_loss else LOGITS_BYTES_PER_ELEMENT
    size = job.tokens_per_micro_batch * model.vocab_size * per_element
    return Item(name="logits and loss", bytes=size, note=f"tokens x vocab x {per_element} B")


def _mapped_source_weights(model: ModelArch, job: TrainingJob) -> Item:
    """Checkpoint pages the loader read to build a weight in new memory — every layer it quantises, and fused MoE
    experts (checkpoints store one tensor per expert; transformers 5 stacks them): the safetensors file stays mapped,
    so on a CPU those pages (page cache, reclaimable) are counted beside the job's tensors."""
    qlora = job.method == "qlora"
    experts_quantised = qlora and (job.quantize_experts or not model.fused_experts)
    quantised = model.linear_params - (0 if experts_quantised else model.expert_params) if qlora else 0
    stacked = model.expert_params if model.fused_experts and not experts_quantised else 0
    return Item(
        name="mapped source weights",
        bytes=(quantised + stacked) * model.weights_dtype_bytes,
        note="checkpoint pages read while quantising or stacking experts (reclaimable)",
    )


def _dequantised_transient(model: ModelArch, job: TrainingJob, d: int) -> Item:
    if job.method == "lora":
        return Item(name="dequantised weight", bytes=0)
    quantised = [
        s for s in model.linear_shapes() if not (s.expert and model.fused_experts and not job.quantize_experts)
    ]
    largest = max((s.in_features * s.out_features for s in quantised), default=0)
    return Item(name="dequantised weight", bytes=largest * d, note="the largest 4-bit layer, for its matmul")


def training_host_ram(model: ModelArch, job: TrainingJob, peak: Breakdown, *, cpu: bool) -> Breakdown:
    dataset = Item(
        name="dataset blocks",
        bytes=job.dataset_tokens * DATASET_BYTES_PER_TOKEN,
        note=f"{DATASET_BYTES_PER_TOKEN} B per token (Python lists)",
    )
    if cpu:
        return Breakdown.of(
            [Item(name="process (torch, transformers)", bytes=CPU_HOST_BASE_BYTES), *peak.items, dataset]
        )
    shard = min(TYPICAL_SHARD_BYTES, model.total_params * model.weights_dtype_bytes)
    return Breakdown.of(
        [
            Item(name="process (torch, CUDA libraries)", bytes=GPU_HOST_BASE_BYTES),
            Item(name="weights shard being loaded", bytes=shard, note="safetensors shards pass through host memory"),
            dataset,
        ]
    )


def training_disk(model: ModelArch, job: TrainingJob) -> Breakdown:
    lora = lora_params(model, job)
    moments = OPTIMIZER_STATE_BYTES[job.optimizer]
    return Breakdown.of(
        [
            Item(name="adapter", bytes=lora * 4, note="safetensors, fp32"),
            Item(
                name="checkpoints",
                bytes=job.keep_checkpoints * lora * (4 + moments),
                note=f"{job.keep_checkpoints} kept x (adapter + optimizer moments)",
            ),
            Item(name="dataset cache", bytes=job.dataset_tokens * 4, note="int32 token ids"),
            Item(name="logs, metadata, loss plot", bytes=16 * MIB),
        ]
    )


def training_flops_per_token(model: ModelArch, job: TrainingJob) -> float:
    active = model.active_params - model.embedding_params - model.lm_head_params
    passes = 4 + (2 if job.gradient_checkpointing else 0)  # forward 2, backward 2 (inputs only), recompute 2
    attention = 2 * model.num_layers * job.seq_len * model.q_dim  # causal QK^T and AV, forward, per token
    head = 4 * model.hidden_size * model.vocab_size  # forward and input gradient
    return passes * active + (passes / 2) * attention + head


def training_time(model: ModelArch, job: TrainingJob, gpu: GpuSpec) -> TimeEstimate:
    tokens = job.dataset_tokens * job.epochs
    mfu = MFU[job.method] * (MOE_MFU_FACTOR if model.is_moe else 1.0)
    flops = training_flops_per_token(model, job)
    tokens_per_s = gpu.bf16_tflops * 1e12 * mfu / flops
    return TimeEstimate(
        seconds=tokens / tokens_per_s if tokens else 0.0,
        how=(
            f"{tokens:,.0f} tokens x {flops / 1e9:,.1f} GFLOP/token / ({gpu.bf16_tflops:,.0f} TFLOPS x "
            f"{mfu:.0%} utilisation) = {tokens_per_s:,.0f} tokens/s"
        ),
        rates={"tokens_per_s": tokens_per_s, "mfu": mfu, "flops_per_token": flops},
    )


def plan_training(model: ModelArch, job: TrainingJob, gpu: GpuSpec) -> Plan:
    memory = training_memory(model, job, cpu=gpu.cpu)
    d = dtype_bytes(job.compute_dtype)
    outcome = training_verdict(model, job, gpu, memory)
    return Plan(
        job="training",
        title=f"{'QLoRA (4-bit NF4)' if job.method == 'qlora' else 'LoRA'} of {model.name}, rank {job.rank}, "
        f"seq {job.seq_len} x batch {job.micro_batch}",
        model=model.name,
        gpu=gpu,
        vram=memory,
        host_ram=training_host_ram(model, job, memory, cpu=gpu.cpu),
        disk=training_disk(model, job),
        time=training_time(model, job, gpu),
        verdict=outcome,
        lease=LeaseAdvice(kind="TRAINING", vram_bytes=memory.total_bytes, exclusive=False, preemptible=True),
        facts={
            "total_params": model.total_params,
            "active_params": model.active_params,
            "lora_params": lora_params(model, job),
            "effective_batch_tokens": job.tokens_per_micro_batch * job.grad_accumulation,
            # both, whichever the job chose: what checkpointing saves (or would cost)
            "activations_with_checkpointing_bytes": _activations(model, _with(job, True), d).bytes,
            "activations_without_checkpointing_bytes": _activations(model, _with(job, False), d).bytes,
        },
        assumptions=[
            "activations per layer counted from what a Llama/Qwen decoder layer keeps for backward (docstring)",
            "time = FLOPs / (bf16 rate x utilisation): good to about 2x",
        ],
    )


def _with(job: TrainingJob, checkpointing: bool) -> TrainingJob:
    return job.model_copy(update={"gradient_checkpointing": checkpointing})


def training_verdict(model: ModelArch, job: TrainingJob, gpu: GpuSpec, memory: Breakdown) -> Verdict:
    return verdict(
        job,
        memory.total_bytes,
        gpu.memory_bytes,
        _memory_savers(model, job),
        lambda changed: training_memory(model, changed, cpu=gpu.cpu).total_bytes,
        fits=f"fits: peak {gib(memory.total_bytes)} of {gib(gpu.memory_bytes)}",
    )


def _memory_savers(model: ModelArch, job: TrainingJob) -> list[Saver]:
    """Changes that lower the peak, cheapest for quality first; applied one after another."""
    savers: list[Saver] = []
    if not job.gradient_checkpointing:
        savers.append(("turn gradient checkpointing on", {"gradient_checkpointing": True}))
    if OPTIMIZER_STATE_BYTES[job.optimizer] > 2:
        savers.append(("use the paged 8-bit AdamW optimizer", {"optimizer": "paged_adamw_8bit"}))
    if job.micro_batch > 1:
        savers.append(
            (
                f"use micro-batch 1 with gradient accumulation {job.micro_batch * job.grad_accumulation}",
                {"micro_batch": 1, "grad_accumulation": job.micro_batch * job.grad_accumulation},
            )
        )
    if job.method == "lora":
        savers.append(("train QLoRA (4-bit base) instead of LoRA", {"method": "qlora"}))
    if model.is_moe and model.fused_experts and not job.quantize_experts:
        savers.append(
            ("quantise the MoE experts too (a trainer such as Unsloth's; baton's keeps fused experts in bf16)",
             {"quantize_experts": True})
        )  # fmt: skip
    seq = job.seq_len
    while seq > 512:
        seq //= 2
        savers.append((f"shorten sequences to {seq} tokens", {"seq_len": seq}))
    return savers
