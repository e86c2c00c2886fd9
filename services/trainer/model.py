"""The trainer's domain types (plain data; no gRPC, no SQLite), and their JSON form for the store.

A ``JobSpec`` arrives with ``None`` for every field the client left unset; ``services.trainer.validation`` fills the
defaults, so a stored job's spec is complete (what the job actually uses). ``to_json``/``from_json`` turn any of
these dataclasses into plain JSON and back, so the store keeps each job as one document.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args, get_origin, get_type_hints


class JobState(enum.Enum):
    QUEUED = "queued"
    PREPARING = "preparing"
    WAITING_FOR_GPU = "waiting_for_gpu"
    RUNNING = "running"
    YIELDING = "yielding"
    PAUSED = "paused"
    FINALIZING = "finalizing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# States in which the job was being worked on when the service stopped: a restart takes them up again.
ACTIVE_STATES = frozenset(
    {
        JobState.PREPARING,
        JobState.WAITING_FOR_GPU,
        JobState.RUNNING,
        JobState.YIELDING,
        JobState.PAUSED,
        JobState.FINALIZING,
    }
)


class EventType(enum.Enum):
    SNAPSHOT = "snapshot"
    STATE_CHANGED = "state_changed"
    STEP = "step"
    EVAL = "eval"
    CHECKPOINT_SAVED = "checkpoint_saved"
    LOG = "log"


# ---------------------------------------------------------------------------------------------------- the spec


@dataclass
class LoraSettings:
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] = field(default_factory=list)
    target_experts: bool = False
    train_router: bool = False
    use_rslora: bool = False
    strength: float | None = None  # share of the trained update the saved adapter keeps, (0, 1]
    top_layers: float | None = None  # share of the layers, from the top, whose update it keeps, (0, 1]


@dataclass
class QuantSettings:
    method: str | None = None  # "nf4" | "none"
    double_quant: bool | None = None
    compute_dtype: str | None = None  # "float32" | "bfloat16" | "float16"


@dataclass
class Hyperparameters:
    learning_rate: float | None = None
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str | None = None  # "cosine" | "linear" | "constant"
    seq_len: int | None = None
    micro_batch_size: int | None = None
    grad_accumulation_steps: int | None = None
    max_steps: int | None = None  # resolved: None = no step limit (epochs decide)
    epochs: float | None = None  # resolved: None = no epoch limit (max_steps decides)
    eval_fraction: float | None = None
    eval_every_steps: int | None = None
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int | None = None
    seed: int = 0
    gradient_checkpointing: bool | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    evaluate: bool | None = None  # resolved: True unless the job turns the trainer's evaluation off


@dataclass
class GpuRequest:
    priority: int | None = None
    preemptible: bool | None = None
    vram_bytes: int | None = None


@dataclass
class JsonlSource:
    path: str
    format: str = "auto"  # "auto" | "text" | "messages"
    train_on_prompt: bool = False


@dataclass
class DocumentRef:
    document_id: str
    content_hash: str
    source: str = ""  # where it was ingested from (the catalog's source: a path or an upload's name)


@dataclass
class DocumentsSource:
    collections: list[str] = field(default_factory=list)
    document_ids: list[str] = field(default_factory=list)
    # Filled at submit from the catalog: the documents the job trains on (fixed then, so a re-ingest later does not
    # change what a queued job learns).
    resolved: list[DocumentRef] = field(default_factory=list)


@dataclass
class JobSpec:
    name: str = ""
    tenant: str = ""
    base_model_path: str = ""
    jsonl: JsonlSource | None = None
    documents: DocumentsSource | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: QuantSettings = field(default_factory=QuantSettings)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    gpu: GpuRequest = field(default_factory=GpuRequest)
    hot_load: bool | None = None
    description: str = ""


# ---------------------------------------------------------------------------------------------------- the job


@dataclass
class Progress:
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    tokens_seen: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float = 0.0
    eta_s: float | None = None
    train_s: float = 0.0
    peak_memory_bytes: int = 0
    preemptions: int = 0
    resumes: int = 0


@dataclass
class DatasetStats:
    documents: int = 0
    train_documents: int = 0
    eval_documents: int = 0
    train_blocks: int = 0
    eval_blocks: int = 0
    train_tokens: int = 0
    eval_tokens: int = 0
    data_hash: str = ""


@dataclass
class Estimate:
    vram_bytes: int = 0
    ram_bytes: int = 0
    disk_bytes: int = 0
    duration_s: float = 0.0


@dataclass
class Checkpoint:
    step: int
    path: str
    reason: str  # "periodic" | "yield" | "shutdown" | "final"
    saved_unix_s: float
    size_bytes: int = 0


@dataclass
class JobError:
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainedAdapter:
    name: str
    version: int
    path: str
    base_model_path: str = ""
    base_model_hash: str = ""
    data_hash: str = ""
    steps: int = 0
    tokens_seen: int = 0
    eval_loss_before: float | None = None
    eval_perplexity_before: float | None = None
    eval_loss_after: float | None = None
    eval_perplexity_after: float | None = None
    loss_plot_path: str = ""
    size_bytes: int = 0
    created_unix_s: float = 0.0
    hot_loaded: bool = False
    hot_load_error: str = ""


@dataclass
class Job:
    job_id: str
    spec: JobSpec
    state: JobState = JobState.QUEUED
    created_unix_s: float = 0.0
    started_unix_s: float = 0.0
    updated_unix_s: float = 0.0
    finished_unix_s: float = 0.0
    progress: Progress = field(default_factory=Progress)
    dataset: DatasetStats | None = None
    estimate: Estimate = field(default_factory=Estimate)
    last_checkpoint: Checkpoint | None = None
    adapter: TrainedAdapter | None = None
    error: JobError | None = None
    cancel_requested: bool = False
    lease_epoch: int = 0
    request_id: str = ""
    # Bookkeeping, persisted but not part of the contract:
    last_seq: int = 0  # newest event sequence number
    events_offset: int = 0  # bytes of the child's events.jsonl already applied
    crash_restarts: int = 0
    worker_pid: int = 0
    requested_target_modules: list[str] = field(default_factory=list)  # as asked; spec.lora has them resolved
    # Shown while waiting (not persisted: recomputed after a restart).
    queue_position: int = 0
    queue_eta_s: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.state.terminal


@dataclass
class JobEvent:
    seq: int
    job_id: str
    type: EventType
    time_unix_s: float
    state: JobState
    progress: Progress
    checkpoint: Checkpoint | None = None
    error: JobError | None = None
    adapter: TrainedAdapter | None = None
    message: str = ""
    job: Job | None = None  # SNAPSHOT only


# ---------------------------------------------------------------------------------------------------- JSON

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """A dataclass (nested, with enums) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def from_json(cls: type[T], data: Any) -> T:
    """The inverse of ``to_json`` for dataclass ``cls``; unknown keys (from a newer version) are ignored."""
    return typing.cast(T, _decode(cls, data))


def _decode(annotation: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _decode(options[0], data)
    if origin is list:
        (item,) = get_args(annotation)
        return [_decode(item, value) for value in data]
    if origin is dict:
        _, item = get_args(annotation)
        return {key: _decode(item, value) for key, value in data.items()}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation(data)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        hints = get_type_hints(annotation)
        known = {f.name for f in dataclasses.fields(annotation)}
        return annotation(**{key: _decode(hints[key], value) for key, value in data.items() if key in known})
    if annotation is float and isinstance(data, int):
        return float(data)
    return data
