"""SubmitJob's cheap checks and the defaults (proto/baton/v1/trainer.proto): every failure is INVALID_ARGUMENT (or
FAILED_PRECONDITION for NF4 without bitsandbytes) with a message that says what to fix.

Decisions where the contract leaves room:
- an unset ``seq_len`` is 1024 on a GPU, 256 on a CPU, or the model's ``max_position_embeddings`` if that is smaller
  (an unset value must not fail with SEQ_LEN_TOO_LONG); a set one above the maximum fails;
- unset quantization is NF4 (QLoRA) on a GPU and plain LoRA on a CPU where the float32 base fits in half the memory;
  unset accumulation is 8 micro-batches on a GPU, 4 on a CPU (measured: see the CPU constants below);
- the job's recorded ``target_modules`` lists the projections found when the request left them empty (what the job
  uses); the training process gets the request's list unchanged (empty = its own choice of the same projections,
  plus the MoE options);
- relative paths are refused: the service's working directory means nothing to the caller.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from baton.runtime.errors import FailedPrecondition, InvalidArgument
from services.trainer.basemodel import BaseModelFacts, inspect_base_model
from services.trainer.estimate import DEFAULT_TARGETS, estimate
from services.trainer.model import Estimate, Hyperparameters, JobSpec, LoraSettings
from services.trainer.sources import check_jsonl_path, resolve_documents

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_TENANT_LENGTH = 128
OPTIMIZERS = ("adamw_torch", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit")
LR_SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SEQ_LEN = 1024
# CPU defaults, chosen by measurement (benchmarks/bench_train.py, docs/trainer.md): SmolLM2-135M trains at
# ~100 tokens/s a thread with plain LoRA at 256-512 tokens a sequence, 0.7-0.8x that with NF4 (bitsandbytes' 4-bit
# kernels on a CPU dequantise every matmul), and 1024-token sequences are ~10 % slower again. 256 x 4 = 1,024 tokens a
# step gives a small corpus (a few dozen notes) tens of steps an epoch, a progress bar that moves every few seconds.
CPU_DEFAULT_SEQ_LEN = 256
CPU_DEFAULT_ACCUMULATION = 4
# Gradient checkpointing trades a second forward pass for activation memory: on a GPU that memory is the scarce
# thing; on a CPU it is not (a 256-token sequence of Gemma 3 270M holds well under 1 GiB of activations), and the
# recomputation is pure loss — measured on Gemma 3 270M, LoRA r16, 256 tokens: 1.32x the tokens/s without it on two
# threads, 1.17x on one (docs/trainer.md). So it is on by default on a GPU and off on a CPU.
GPU_DEFAULT_ACCUMULATION = 8
# NF4 on a CPU only where the plain float32 base would take more than this share of the machine's memory.
CPU_PLAIN_MEMORY_SHARE = 0.5

N = TypeVar("N", int, float)


@dataclass(frozen=True)
class ValidationContext:
    device: str  # "cpu" | "cuda": where jobs train
    allowed_roots: list[Path]
    catalog_path: Path
    texts_dir: Path
    default_priority: int
    nf4_supported: bool


@dataclass(frozen=True)
class ResolvedJob:
    spec: JobSpec
    model: BaseModelFacts
    estimate: Estimate


def resolve_spec(request: JobSpec, ctx: ValidationContext) -> ResolvedJob:
    """Check ``request`` and return it with every default filled in, the model's facts and the estimate."""
    spec = copy.deepcopy(request)
    _check_identity(spec)
    model_path = Path(spec.base_model_path).expanduser()
    if not model_path.is_absolute():
        raise InvalidArgument(
            f"base_model_path {spec.base_model_path!r} is relative; give the model folder's absolute path",
            reason="BASE_MODEL_MISSING",
        )
    facts = inspect_base_model(model_path.resolve())
    spec.base_model_path = str(facts.path)
    _resolve_dataset(spec, ctx)
    _resolve_lora(spec.lora, facts)
    _resolve_quantization(spec, ctx, facts)
    _resolve_hyperparameters(spec.hyperparameters, facts, ctx.device)
    spec.gpu.priority = ctx.default_priority if spec.gpu.priority is None else spec.gpu.priority
    spec.gpu.preemptible = True if spec.gpu.preemptible is None else spec.gpu.preemptible
    spec.hot_load = True if spec.hot_load is None else spec.hot_load
    planned = estimate(facts, spec, device=ctx.device)
    if not spec.gpu.vram_bytes:
        spec.gpu.vram_bytes = planned.vram_bytes
    return ResolvedJob(spec, facts, planned)


def _check_identity(spec: JobSpec) -> None:
    if not NAME.match(spec.name):
        raise InvalidArgument(
            f"name {spec.name!r} must be 1..64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or "
            "digit (it becomes the adapter's folder and served name)",
            reason="BAD_NAME",
        )
    if not spec.tenant or len(spec.tenant) > MAX_TENANT_LENGTH:
        raise InvalidArgument(f"tenant is required (1..{MAX_TENANT_LENGTH} characters)", reason="TENANT_REQUIRED")


def _resolve_dataset(spec: JobSpec, ctx: ValidationContext) -> None:
    if (spec.jsonl is None) == (spec.documents is None):
        raise InvalidArgument(
            "give exactly one dataset: documents (ingested, by collection) or jsonl (a file path)",
            reason="DATASET_REQUIRED",
        )
    if spec.jsonl is not None:
        spec.jsonl.path = str(check_jsonl_path(spec.jsonl.path, ctx.allowed_roots))
        return
    assert spec.documents is not None
    spec.documents.resolved = resolve_documents(
        ctx.catalog_path, ctx.texts_dir, spec.tenant, spec.documents.collections, spec.documents.document_ids
    )


def _resolve_lora(lora: LoraSettings, facts: BaseModelFacts) -> None:
    lora.rank = _in_range("lora.rank", 16 if lora.rank is None else lora.rank, 1, 512)
    lora.alpha = 2.0 * lora.rank if lora.alpha is None else lora.alpha
    if not math.isfinite(lora.alpha) or lora.alpha <= 0:
        raise InvalidArgument(f"lora.alpha must be positive, got {lora.alpha}", reason="OUT_OF_RANGE")
    lora.dropout = _in_range("lora.dropout", 0.05 if lora.dropout is None else lora.dropout, 0.0, 1.0, open_high=True)
    lora.strength = _in_range("lora.strength", 1.0 if lora.strength is None else lora.strength, 0.0, 1.0, open_low=True)
    top = 1.0 if lora.top_layers is None else lora.top_layers
    lora.top_layers = _in_range("lora.top_layers", top, 0.0, 1.0, open_low=True)
    unknown = [t for t in lora.target_modules if t != "all-linear" and not facts.matching(t)]
    if unknown:
        names = facts.linear_names
        raise InvalidArgument(
            f"target modules {', '.join(unknown)} are not linear modules of {facts.path.name}; choose among "
            f'{", ".join(names)} (or "all-linear")',
            reason="UNKNOWN_TARGET_MODULES",
            metadata={"unknown": ",".join(unknown), "linear_modules": ",".join(names)},
        )
    if not lora.target_modules:
        lora.target_modules = [name for name in DEFAULT_TARGETS if name in facts.linear_names]


def _resolve_quantization(spec: JobSpec, ctx: ValidationContext, facts: BaseModelFacts) -> None:
    quant = spec.quantization
    quant.method = quant.method or default_quantization(ctx.device, facts.total_params)
    if quant.method == "nf4" and not ctx.nf4_supported:
        raise FailedPrecondition(
            "NF4 (QLoRA) needs bitsandbytes, which is not installed here; install the ml extra or train plain LoRA "
            "(quantization.method NONE)",
            reason="QUANT_UNSUPPORTED",
        )
    quant.double_quant = True if quant.double_quant is None else quant.double_quant
    quant.compute_dtype = quant.compute_dtype or ("bfloat16" if ctx.device == "cuda" else "float32")
    if quant.compute_dtype not in DTYPES:
        raise InvalidArgument(f"unknown compute dtype {quant.compute_dtype!r}", reason="OUT_OF_RANGE")


def default_quantization(device: str, total_params: int, memory_bytes: int | None = None) -> str:
    """QLoRA (NF4) on a GPU, where it saves the VRAM it is for. On a CPU plain LoRA where the float32 base fits in
    half the machine's memory: bitsandbytes' 4-bit path there is slower and saves memory nobody is short of."""
    if device == "cuda":
        return "nf4"
    memory = memory_bytes if memory_bytes is not None else _machine_memory_bytes()
    return "none" if total_params * 4 <= memory * CPU_PLAIN_MEMORY_SHARE else "nf4"


def _machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _resolve_hyperparameters(hyper: Hyperparameters, facts: BaseModelFacts, device: str) -> None:
    lr = 2e-4 if hyper.learning_rate is None else hyper.learning_rate
    hyper.learning_rate = _in_range("hyperparameters.learning_rate", lr, 0.0, 1.0, open_low=True)
    warmup = 0.03 if hyper.warmup_ratio is None else hyper.warmup_ratio
    hyper.warmup_ratio = _in_range("hyperparameters.warmup_ratio", warmup, 0.0, 0.5)
    hyper.lr_schedule = hyper.lr_schedule or "cosine"
    if hyper.lr_schedule not in LR_SCHEDULES:
        raise InvalidArgument(f"unknown lr_schedule {hyper.lr_schedule!r}", reason="OUT_OF_RANGE")
    _resolve_seq_len(hyper, facts, device)
    hyper.micro_batch_size = _in_range("hyperparameters.micro_batch_size", hyper.micro_batch_size or 1, 1, 4096)
    default_accumulation = GPU_DEFAULT_ACCUMULATION if device == "cuda" else CPU_DEFAULT_ACCUMULATION
    accumulation = hyper.grad_accumulation_steps or default_accumulation
    hyper.grad_accumulation_steps = _in_range("hyperparameters.grad_accumulation_steps", accumulation, 1, 65536)
    _resolve_length(hyper)
    eval_fraction = 0.05 if hyper.eval_fraction is None else hyper.eval_fraction
    hyper.eval_fraction = _in_range("hyperparameters.eval_fraction", eval_fraction, 0.0, 0.5)
    every = 50 if hyper.checkpoint_every_steps is None else hyper.checkpoint_every_steps
    hyper.checkpoint_every_steps = _in_range("hyperparameters.checkpoint_every_steps", every, 0, 1 << 30)
    hyper.eval_every_steps = every if hyper.eval_every_steps is None else hyper.eval_every_steps
    keep = 2 if hyper.keep_checkpoints is None else hyper.keep_checkpoints
    hyper.keep_checkpoints = _in_range("hyperparameters.keep_checkpoints", keep, 1, 1000)
    hyper.evaluate = True if hyper.evaluate is None else hyper.evaluate
    if hyper.gradient_checkpointing is None:
        hyper.gradient_checkpointing = device == "cuda"
    hyper.optimizer = hyper.optimizer or ("paged_adamw_8bit" if device == "cuda" else "adamw_torch")
    if hyper.optimizer not in OPTIMIZERS:
        raise InvalidArgument(
            f"unknown optimizer {hyper.optimizer!r}; use one of {', '.join(OPTIMIZERS)}", reason="UNKNOWN_OPTIMIZER"
        )
    decay = 0.0 if hyper.weight_decay is None else hyper.weight_decay
    hyper.weight_decay = _in_range("hyperparameters.weight_decay", decay, 0.0, 10.0)
    norm = 1.0 if hyper.max_grad_norm is None else hyper.max_grad_norm
    hyper.max_grad_norm = _in_range("hyperparameters.max_grad_norm", norm, 0.0, 1e6)


def _resolve_seq_len(hyper: Hyperparameters, facts: BaseModelFacts, device: str) -> None:
    maximum = facts.max_position_embeddings or DEFAULT_SEQ_LEN
    if hyper.seq_len is None:
        hyper.seq_len = min(DEFAULT_SEQ_LEN if device == "cuda" else CPU_DEFAULT_SEQ_LEN, maximum)
    elif hyper.seq_len > maximum:
        raise InvalidArgument(
            f"seq_len {hyper.seq_len} is above {facts.path.name}'s maximum of {maximum} tokens "
            f"(max_position_embeddings); use at most {maximum}",
            reason="SEQ_LEN_TOO_LONG",
            metadata={"seq_len": str(hyper.seq_len), "max_position_embeddings": str(maximum)},
        )
    hyper.seq_len = _in_range("hyperparameters.seq_len", hyper.seq_len, 8, maximum)


def _resolve_length(hyper: Hyperparameters) -> None:
    if hyper.max_steps is not None:
        hyper.max_steps = _in_range("hyperparameters.max_steps", hyper.max_steps, 1, 1 << 31)
    if hyper.epochs is not None:
        hyper.epochs = _in_range("hyperparameters.epochs", hyper.epochs, 0.0, 1e6, open_low=True)
    elif hyper.max_steps is None:
        hyper.epochs = 1.0  # neither set: one pass; only max_steps set: epochs stay unlimited (None)
    if hyper.warmup_steps is not None:
        hyper.warmup_steps = _in_range("hyperparameters.warmup_steps", hyper.warmup_steps, 0, 1 << 31)


def _in_range(what: str, value: N, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> N:
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if (isinstance(value, float) and not math.isfinite(value)) or too_low or too_high:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise InvalidArgument(
            f"{what} must be in {left}{low:g}, {high:g}{right}, got {value}",
            reason="OUT_OF_RANGE",
            metadata={"field": what},
        )
    return value
