"""What the training process reports, applied to its job: each record of its events.jsonl (the FIXED contract in
services/trainer/runner.py) updates the job's progress and the trainer's metrics, and says which event the job's
watchers get; the adapter the registry holds at the end becomes the job's ``TrainedAdapter``.

The trainer's core owns the job's state machine and hands these functions one record at a time; nothing here sends,
persists or signals anything.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from baton.runtime.logging import log_event
from services.trainer.metrics import TrainerMetrics
from services.trainer.model import Checkpoint, DatasetStats, EventType, Job, JobError, Progress, TrainedAdapter
from services.trainer.registry import RegisteredVersion

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What one record means beyond the progress it updated: the event to emit (``type`` None: none), and the error
    the process reported about itself (it then exits 1)."""

    type: EventType | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error: JobError | None = None


def apply_record(job: Job, record: dict[str, Any], metrics: TrainerMetrics, train_s: float) -> Report:
    """Apply one record to ``job`` (``train_s``: the job's training time so far). Raises KeyError, TypeError or
    ValueError for a malformed record."""
    kind = record.get("type")
    progress = job.progress
    if kind == "step":
        _apply_step(job, record, metrics, train_s)
        return Report(EventType.STEP)
    if kind == "eval":
        loss = float(record["eval_loss"])
        which = str(record.get("which", "adapter"))
        if which == "adapter":
            progress.eval_loss = loss
            metrics.eval_loss.set(loss)
        perplexity = record.get("perplexity") or math.exp(min(loss, 50.0))
        step = record.get("step", 0)
        message = f"eval loss {loss:.4f}, perplexity {float(perplexity):.2f} ({which}, step {step})"
        return Report(EventType.EVAL, message)
    if kind == "checkpoint":
        reason = str(record.get("reason", "periodic"))
        job.last_checkpoint = Checkpoint(
            step=int(record["step"]),
            path=str(record.get("path", "")),
            reason=reason,
            saved_unix_s=float(record.get("time_unix_s") or time.time()),
            size_bytes=int(record.get("size_bytes") or 0),
        )
        metrics.checkpoints.labels(reason).inc()
        if record.get("seconds") is not None:
            metrics.checkpoint_seconds.observe(float(record["seconds"]))
        message = f"checkpoint at step {job.last_checkpoint.step} ({reason})"
        return Report(EventType.CHECKPOINT_SAVED, message, {"checkpoint": job.last_checkpoint})
    if kind == "dataset":
        _apply_dataset(job, record)
        return Report()
    if kind == "resumed":
        progress.resumes += 1
        progress.step = int(record.get("step", progress.step))
        where = record.get("from_checkpoint") or "its checkpoint"
        return Report(EventType.LOG, f"resumed from step {progress.step} ({where})")
    if kind == "log":
        level = str(record.get("level", "info")).lower()
        prefix = "" if level in ("info", "debug") else f"{level}: "
        return Report(EventType.LOG, prefix + str(record.get("message", "")))
    # "done" needs nothing here: output/ (complete or absent) is what finalizing reads.
    if kind == "error":
        extra = {k: str(v) for k, v in record.items() if k not in ("type", "reason", "message")}
        metadata = {str(k): str(v) for k, v in (record.get("metadata") or {}).items()} | extra
        metadata.pop("metadata", None)
        reason = str(record.get("reason") or "TRAINING_FAILED")
        return Report(error=JobError(reason, str(record.get("message")), metadata))
    return Report()


def _apply_step(job: Job, record: dict[str, Any], metrics: TrainerMetrics, train_s: float) -> None:
    progress = job.progress
    tokens = int(record.get("tokens_seen", progress.tokens_seen))
    if tokens > progress.tokens_seen:
        metrics.tokens.inc(tokens - progress.tokens_seen)
    progress.step = int(record["step"])
    progress.total_steps = int(record.get("total_steps") or progress.total_steps)
    progress.epoch = float(record.get("epoch", progress.epoch))
    progress.tokens_seen = tokens
    progress.loss = _optional_float(record.get("loss"))
    progress.learning_rate = _optional_float(record.get("learning_rate"))
    progress.grad_norm = _optional_float(record.get("grad_norm"))
    progress.tokens_per_s = float(record.get("tokens_per_s") or 0.0)
    progress.peak_memory_bytes = max(progress.peak_memory_bytes, int(record.get("peak_memory_bytes") or 0))
    progress.train_s = train_s
    progress.eta_s = _eta(progress)
    job.estimate.duration_s = progress.train_s + (progress.eta_s or 0.0)
    metrics.step.set(progress.step)
    metrics.total_steps.set(progress.total_steps)
    metrics.tokens_per_second.set(progress.tokens_per_s)
    metrics.eta_seconds.set(progress.eta_s or 0.0)
    if progress.loss is not None:
        metrics.loss.set(progress.loss)
    if progress.learning_rate is not None:
        metrics.learning_rate.set(progress.learning_rate)


def _apply_dataset(job: Job, record: dict[str, Any]) -> None:
    built = dataset_stats(record)
    if job.dataset is not None and job.dataset.data_hash and built.data_hash != job.dataset.data_hash:
        log_event(log, "trainer.data_hash_changed", level=logging.WARNING, job=job.job_id,
                  prepared=job.dataset.data_hash, built=built.data_hash)  # fmt: skip
    job.dataset = built
    job.progress.total_steps = int(record.get("total_steps") or job.progress.total_steps)


def dataset_stats(record: dict[str, Any]) -> DatasetStats:
    names = {f.name for f in dataclasses.fields(DatasetStats)}
    return DatasetStats(**{key: value for key, value in record.items() if key in names})


def trained_adapter(version: RegisteredVersion, job: Job) -> TrainedAdapter:
    """The job's adapter as the registry holds it: its metadata first, the job's own figures where it has none."""
    meta = version.metadata
    evals = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
    base = evals.get("base") if isinstance(evals.get("base"), dict) else {}
    tuned = evals.get("adapter") if isinstance(evals.get("adapter"), dict) else {}
    weights = version.path / "adapter_model.safetensors"
    plot = version.path / "loss.png"
    return TrainedAdapter(
        name=version.name,
        version=version.version,
        path=str(version.path),
        base_model_path=job.spec.base_model_path,
        base_model_hash=str(meta.get("base_model_hash", "")),
        data_hash=str(meta.get("data_hash") or (job.dataset.data_hash if job.dataset else "")),
        steps=int(meta.get("steps") or job.progress.step),
        tokens_seen=int(meta.get("tokens_seen") or job.progress.tokens_seen),
        eval_loss_before=_optional_float(meta.get("eval_loss_before", base.get("loss"))),
        eval_perplexity_before=_optional_float(meta.get("eval_perplexity_before", base.get("perplexity"))),
        eval_loss_after=_optional_float(meta.get("eval_loss_after", tuned.get("loss"))),
        eval_perplexity_after=_optional_float(meta.get("eval_perplexity_after", tuned.get("perplexity"))),
        loss_plot_path=str(plot) if plot.is_file() else "",
        size_bytes=weights.stat().st_size if weights.is_file() else 0,
        created_unix_s=float(version.registry.get("registered_unix_s") or time.time()),
    )


def _eta(progress: Progress) -> float | None:
    if progress.step <= 0 or progress.tokens_per_s <= 0 or progress.total_steps <= progress.step:
        return 0.0 if progress.total_steps and progress.step >= progress.total_steps else None
    tokens_per_step = progress.tokens_seen / progress.step
    return (progress.total_steps - progress.step) * tokens_per_step / progress.tokens_per_s


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
