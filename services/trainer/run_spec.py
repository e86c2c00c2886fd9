"""What the training process is told and how its data become steps — torch-free, so the service side (PREPARING,
``baton eval-views``) reads a job's spec.json and counts its steps without importing torch.

``JobSpec`` is spec.json as the parent writes it; ``plan_steps`` turns the training split into optimizer steps, and
micro-batch ``g`` of the whole run is slice ``g % per_epoch`` of the permutation seeded by ``(seed, g // per_epoch)``
(a pure function of (seed, step): what makes a resumed run take the same steps as an uninterrupted one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

# ------------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()
    target_experts: bool = False
    train_router: bool = False
    use_rslora: bool = False
    strength: float = 1.0  # the share of the trained update the saved adapter keeps (see interpolate_toward_base)
    top_layers: float = 1.0  # the share of the layers, from the top, whose update it keeps; the rest return to base


@dataclass(frozen=True)
class QuantSpec:
    method: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass(frozen=True)
class HyperSpec:
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    seq_len: int = 1024
    micro_batch_size: int = 1
    grad_accumulation_steps: int = 8
    max_steps: int | None = None
    epochs: float | None = None
    eval_fraction: float = 0.05
    eval_every_steps: int | None = None
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    gradient_checkpointing: bool = True
    optimizer: str = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    evaluate: bool = True  # score the eval split before and after training


@dataclass(frozen=True)
class JobSpec:
    """spec.json as the parent writes it (every default filled); missing or null fields take the proto defaults."""

    job_id: str
    name: str
    base_model_path: Path
    dataset: dict[str, Any]
    lora: LoraSpec = LoraSpec()
    quantization: QuantSpec = QuantSpec()
    hyper: HyperSpec = HyperSpec()
    device: Literal["cpu", "cuda"] = "cpu"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        device = data.get("device") or "cpu"
        lora_values = dict(data.get("lora") or {})
        if lora_values.get("alpha") is None:  # the proto's default: 2 x rank
            lora_values["alpha"] = 2.0 * float(lora_values.get("rank") or LoraSpec.rank)
        lora = _fill(LoraSpec, lora_values)
        lora = LoraSpec(**{**asdict(lora), "target_modules": tuple(lora.target_modules or ())})
        quant_values = dict(data.get("quantization") or {})
        if quant_values.get("compute_dtype") in (None, "", "auto"):  # automatic: bf16 on a GPU, fp32 on the CPU
            quant_values["compute_dtype"] = "bfloat16" if device == "cuda" else "float32"
        hyper_values = dict(data.get("hyper") or {})
        if not hyper_values.get("optimizer"):  # the proto's default: paged 8-bit AdamW on a GPU, torch's on the CPU
            hyper_values["optimizer"] = "paged_adamw_8bit" if device == "cuda" else "adamw_torch"
        return cls(
            job_id=str(data.get("job_id", "")),
            name=str(data.get("name", "")),
            base_model_path=Path(data["base_model_path"]),
            dataset=dict(data["dataset"]),
            lora=lora,
            quantization=_fill(QuantSpec, quant_values),
            hyper=_fill(HyperSpec, hyper_values),
            device=device,
        )


def _fill(cls: type, values: dict[str, Any] | None) -> Any:
    known = cls.__dataclass_fields__
    return cls(**{key: value for key, value in (values or {}).items() if key in known and value is not None})


# ------------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class StepPlan:
    """How the training split turns into optimizer steps."""

    blocks: int
    micro_batch_size: int
    accumulation: int
    micro_batches_per_epoch: int
    total_steps: int

    def micro_batch(self, index: int, seed: int) -> list[int]:
        """Block indices of micro-batch ``index`` of the whole run: a function of (seed, epoch) alone."""
        epoch, k = divmod(index, self.micro_batches_per_epoch)
        order = _epoch_order(seed, epoch, self.blocks)
        return order[k * self.micro_batch_size : (k + 1) * self.micro_batch_size]

    def epoch_at(self, step: int) -> float:
        return step * self.accumulation / self.micro_batches_per_epoch


def plan_steps(train_blocks: int, hyper: HyperSpec) -> StepPlan:
    """Total optimizer steps: ``epochs`` passes (default 1), capped by ``max_steps``; only max_steps: exactly that."""
    per_epoch = max(1, math.ceil(train_blocks / hyper.micro_batch_size))
    if hyper.epochs is None and hyper.max_steps:
        total = hyper.max_steps
    else:
        epochs = hyper.epochs if hyper.epochs is not None else 1.0
        total = max(1, math.ceil(math.ceil(epochs * per_epoch) / hyper.grad_accumulation_steps))
        if hyper.max_steps:
            total = min(total, hyper.max_steps)
    return StepPlan(train_blocks, hyper.micro_batch_size, hyper.grad_accumulation_steps, per_epoch, total)


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(seed: int, epoch: int, blocks: int) -> list[int]:
    key = (seed, epoch, blocks)
    if key not in _ORDER_CACHE:
        # Its own generator seeded by (seed, epoch): the global RNGs (dropout's) never shift the data order.
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(blocks).tolist()
    return _ORDER_CACHE[key]


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): a linear warm-up that starts
    above zero (no wasted first step), then cosine or linear decay towards 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(hyper: HyperSpec, total: int) -> int:
    if hyper.warmup_steps is not None:
        return min(hyper.warmup_steps, total)
    return min(total, math.ceil(hyper.warmup_ratio * total))
