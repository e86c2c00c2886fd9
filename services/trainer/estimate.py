"""The resource estimate of a training job: the planner's (``baton.planner.training``), for this model and spec.

The model's shape comes from its ``config.json`` (read once by ``basemodel.inspect_base_model``); the job's
settings map one to one onto a ``TrainingJob``. The TRAINING lease asks for ``vram_bytes`` unless the job sets its
own; on a CPU the "VRAM" is the job's host memory (no CUDA context). Duration is unknown (0) until the dataset is
built and the first steps are timed.
"""

from __future__ import annotations

from baton.planner.models import ModelArch
from baton.planner.training import (
    DEFAULT_TARGETS,
    OPTIMIZER_STATE_BYTES,
    TrainingJob,
    training_disk,
    training_host_ram,
    training_memory,
)
from services.trainer.basemodel import BaseModelFacts
from services.trainer.model import Estimate, JobSpec

__all__ = ["DEFAULT_TARGETS", "estimate", "planner_job"]


def planner_job(spec: JobSpec, *, dataset_tokens: int = 0) -> TrainingJob:
    """The planner's view of a resolved job spec."""
    quant, lora, hyper = spec.quantization, spec.lora, spec.hyperparameters
    optimizer = hyper.optimizer if hyper.optimizer in OPTIMIZER_STATE_BYTES else "adamw_torch"
    return TrainingJob(
        method="lora" if quant.method == "none" else "qlora",
        double_quant=bool(quant.double_quant) if quant.double_quant is not None else True,
        compute_dtype=quant.compute_dtype or "float32",  # type: ignore[arg-type]
        rank=lora.rank or 16,
        targets=tuple(lora.target_modules) or DEFAULT_TARGETS,
        target_experts=lora.target_experts,
        lora_dropout=0.05 if lora.dropout is None else lora.dropout,
        seq_len=hyper.seq_len or 1024,
        micro_batch=hyper.micro_batch_size or 1,
        grad_accumulation=hyper.grad_accumulation_steps or 1,
        gradient_checkpointing=hyper.gradient_checkpointing is not False,
        optimizer=optimizer,  # type: ignore[arg-type]
        dataset_tokens=dataset_tokens,
        keep_checkpoints=2 if hyper.keep_checkpoints is None else hyper.keep_checkpoints,
    )


def estimate(facts: BaseModelFacts, spec: JobSpec, *, device: str) -> Estimate:
    arch = ModelArch.from_config(facts.config, name=facts.path.name)
    job = planner_job(spec)
    cpu = device == "cpu"
    peak = training_memory(arch, job, cpu=cpu)
    return Estimate(
        vram_bytes=peak.total_bytes,
        ram_bytes=training_host_ram(arch, job, peak, cpu=cpu).total_bytes,
        disk_bytes=training_disk(arch, job).total_bytes,
        duration_s=0.0,
    )
