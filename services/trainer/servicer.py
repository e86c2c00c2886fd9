"""The Trainer gRPC servicer: decode, call the core, encode. No job logic lives here.

Unset ``optional`` fields become ``None`` in the domain spec (so the core can fill the defaults the contract names);
the job's spec goes back out with every value filled in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from baton.runtime.errors import InvalidArgument, grpc_errors
from baton.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.core import TrainerCore
from services.trainer.model import (
    Checkpoint,
    DatasetStats,
    DocumentsSource,
    Estimate,
    EventType,
    GpuRequest,
    Hyperparameters,
    Job,
    JobError,
    JobEvent,
    JobSpec,
    JobState,
    JsonlSource,
    LoraSettings,
    Progress,
    QuantSettings,
    TrainedAdapter,
)

pb = trainer_pb2

STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.PREPARING: pb.JOB_STATE_PREPARING,
    JobState.WAITING_FOR_GPU: pb.JOB_STATE_WAITING_FOR_GPU,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.YIELDING: pb.JOB_STATE_YIELDING,
    JobState.PAUSED: pb.JOB_STATE_PAUSED,
    JobState.FINALIZING: pb.JOB_STATE_FINALIZING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
STATES_FROM_PROTO = {value: key for key, value in STATES.items()}
EVENT_TYPES = {
    EventType.SNAPSHOT: pb.JOB_EVENT_TYPE_SNAPSHOT,
    EventType.STATE_CHANGED: pb.JOB_EVENT_TYPE_STATE_CHANGED,
    EventType.STEP: pb.JOB_EVENT_TYPE_STEP,
    EventType.EVAL: pb.JOB_EVENT_TYPE_EVAL,
    EventType.CHECKPOINT_SAVED: pb.JOB_EVENT_TYPE_CHECKPOINT_SAVED,
    EventType.LOG: pb.JOB_EVENT_TYPE_LOG,
}
QUANT_METHODS = {pb.TRAINER_QUANT_METHOD_UNSPECIFIED: None, pb.TRAINER_QUANT_METHOD_NONE: "none",
                 pb.TRAINER_QUANT_METHOD_NF4: "nf4"}  # fmt: skip
DTYPES = {pb.TRAINER_DTYPE_UNSPECIFIED: None, pb.TRAINER_DTYPE_FLOAT32: "float32",
          pb.TRAINER_DTYPE_BFLOAT16: "bfloat16", pb.TRAINER_DTYPE_FLOAT16: "float16"}  # fmt: skip
SCHEDULES = {pb.TRAINER_LR_SCHEDULE_UNSPECIFIED: None, pb.TRAINER_LR_SCHEDULE_COSINE: "cosine",
             pb.TRAINER_LR_SCHEDULE_LINEAR: "linear", pb.TRAINER_LR_SCHEDULE_CONSTANT: "constant"}  # fmt: skip
FORMATS = {pb.JSONL_FORMAT_UNSPECIFIED: "auto", pb.JSONL_FORMAT_TEXT: "text", pb.JSONL_FORMAT_MESSAGES: "messages"}
REASONS = {"periodic": pb.CHECKPOINT_REASON_PERIODIC, "yield": pb.CHECKPOINT_REASON_YIELD,
           "shutdown": pb.CHECKPOINT_REASON_SHUTDOWN, "final": pb.CHECKPOINT_REASON_FINAL}  # fmt: skip


def _reverse(table: dict[int, str | None]) -> dict[str, int]:
    return {value: key for key, value in table.items() if value is not None}


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, core: TrainerCore) -> None:
        self._core = core

    @grpc_errors
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext) -> pb.TrainerJob:
        job = await self._core.submit(
            spec_from_proto(request.spec), request_id=request.request_id, validate_only=request.validate_only
        )
        return job_to_proto(job)

    @grpc_errors
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.TrainerJob:
        return job_to_proto(self._core.get(request.job_id, request.tenant))

    @grpc_errors
    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        states = []
        for value in request.states:
            if value not in STATES_FROM_PROTO:
                raise InvalidArgument(f"unknown job state {value}", reason="UNKNOWN_STATE")
            states.append(STATES_FROM_PROTO[value])
        jobs, token, total = self._core.list(request.tenant, states, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[job_to_proto(job) for job in jobs], next_page_token=token, total_size=total)

    @grpc_errors
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        async for event in self._core.watch(request.job_id, request.tenant, request.after_seq):
            yield event_to_proto(event)

    @grpc_errors
    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.TrainerJob:
        return job_to_proto(await self._core.cancel(request.job_id, request.tenant))


# ---------------------------------------------------------------------------------------------------- decoding


def _opt(message: object, name: str) -> object | None:
    return getattr(message, name) if message.HasField(name) else None  # type: ignore[attr-defined]


def spec_from_proto(spec: pb.TrainerJobSpec) -> JobSpec:
    which = spec.WhichOneof("dataset")
    jsonl = documents = None
    if which == "jsonl":
        jsonl = JsonlSource(spec.jsonl.path, FORMATS.get(spec.jsonl.format, "auto"), spec.jsonl.train_on_prompt)
    elif which == "documents":
        documents = DocumentsSource(list(spec.documents.collections), list(spec.documents.document_ids))
    lora, quant, hyper, gpu = spec.lora, spec.quantization, spec.hyperparameters, spec.gpu
    return JobSpec(
        name=spec.name,
        tenant=spec.tenant,
        base_model_path=spec.base_model_path,
        jsonl=jsonl,
        documents=documents,
        lora=LoraSettings(
            rank=_opt(lora, "rank"),  # type: ignore[arg-type]
            alpha=_float32(_opt(lora, "alpha")),
            dropout=_float32(_opt(lora, "dropout")),
            target_modules=list(lora.target_modules),
            target_experts=lora.target_experts,
            train_router=lora.train_router,
            use_rslora=lora.use_rslora,
            strength=_float32(_opt(lora, "strength")),
            top_layers=_float32(_opt(lora, "top_layers")),
        ),
        quantization=QuantSettings(
            method=_enum(QUANT_METHODS, quant.method, "quantization.method"),
            double_quant=_opt(quant, "double_quant"),  # type: ignore[arg-type]
            compute_dtype=_enum(DTYPES, quant.compute_dtype, "quantization.compute_dtype"),
        ),
        hyperparameters=_hyper_from_proto(hyper),
        gpu=GpuRequest(
            priority=_opt(gpu, "priority"),  # type: ignore[arg-type]
            preemptible=_opt(gpu, "preemptible"),  # type: ignore[arg-type]
            vram_bytes=_opt(gpu, "vram_bytes"),  # type: ignore[arg-type]
        ),
        hot_load=_opt(spec, "hot_load"),  # type: ignore[arg-type]
        description=spec.description,
    )


def _hyper_from_proto(hyper: pb.TrainerHyperparameters) -> Hyperparameters:
    optional = (
        "learning_rate", "warmup_ratio", "warmup_steps", "seq_len", "micro_batch_size", "grad_accumulation_steps",
        "max_steps", "epochs", "eval_fraction", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
        "gradient_checkpointing", "weight_decay", "max_grad_norm", "evaluate",
    )  # fmt: skip
    values = {name: _opt(hyper, name) for name in optional}
    return Hyperparameters(
        **values,  # type: ignore[arg-type]
        lr_schedule=_enum(SCHEDULES, hyper.lr_schedule, "hyperparameters.lr_schedule"),
        seed=hyper.seed,
        optimizer=hyper.optimizer or None,
    )


def _float32(value: object | None) -> float | None:
    """A proto ``float`` as the decimal the client meant (0.05, not 0.05000000074505806)."""
    return None if value is None else float(f"{value:.7g}")


def _enum(table: dict[int, str | None], value: int, what: str) -> str | None:
    if value not in table:
        raise InvalidArgument(f"unknown {what} value {value}", reason="OUT_OF_RANGE")
    return table[value]


# ---------------------------------------------------------------------------------------------------- encoding


def spec_to_proto(spec: JobSpec) -> pb.TrainerJobSpec:
    message = pb.TrainerJobSpec(
        name=spec.name,
        tenant=spec.tenant,
        base_model_path=spec.base_model_path,
        lora=pb.TrainerLoraSettings(**_set(vars(spec.lora))),
        quantization=pb.TrainerQuantizationSettings(
            method=_reverse(QUANT_METHODS).get(spec.quantization.method or "", 0),
            compute_dtype=_reverse(DTYPES).get(spec.quantization.compute_dtype or "", 0),
            **_set({"double_quant": spec.quantization.double_quant}),
        ),
        hyperparameters=pb.TrainerHyperparameters(
            lr_schedule=_reverse(SCHEDULES).get(spec.hyperparameters.lr_schedule or "", 0),
            **_set({k: v for k, v in vars(spec.hyperparameters).items() if k != "lr_schedule"}),
        ),
        gpu=pb.TrainerGpuRequest(**_set(vars(spec.gpu))),
        description=spec.description,
        **_set({"hot_load": spec.hot_load}),
    )
    if spec.jsonl is not None:
        message.jsonl.CopyFrom(
            pb.JsonlDataset(
                path=spec.jsonl.path,
                format=_reverse(FORMATS).get(spec.jsonl.format, 0),  # type: ignore[arg-type]
                train_on_prompt=spec.jsonl.train_on_prompt,
            )
        )
    elif spec.documents is not None:
        message.documents.CopyFrom(
            pb.DocumentsDataset(collections=spec.documents.collections, document_ids=spec.documents.document_ids)
        )
    return message


def _set(values: dict[str, object]) -> dict[str, object]:
    """Only the fields that have a value (an unset optional stays unset on the wire)."""
    return {key: value for key, value in values.items() if value is not None}


def job_to_proto(job: Job) -> pb.TrainerJob:
    message = pb.TrainerJob(
        job_id=job.job_id,
        spec=spec_to_proto(job.spec),
        state=STATES[job.state],
        created_unix_s=job.created_unix_s,
        started_unix_s=job.started_unix_s,
        updated_unix_s=job.updated_unix_s,
        finished_unix_s=job.finished_unix_s,
        queue_position=job.queue_position,
        queue_eta_s=job.queue_eta_s,
        progress=progress_to_proto(job.progress),
        estimate=_estimate_to_proto(job.estimate),
        cancel_requested=job.cancel_requested,
        lease_epoch=job.lease_epoch,
    )
    if job.dataset is not None:
        message.dataset.CopyFrom(_dataset_to_proto(job.dataset))
    if job.last_checkpoint is not None:
        message.last_checkpoint.CopyFrom(checkpoint_to_proto(job.last_checkpoint))
    if job.adapter is not None:
        message.adapter.CopyFrom(adapter_to_proto(job.adapter))
    if job.error is not None:
        message.error.CopyFrom(error_to_proto(job.error))
    return message


def progress_to_proto(progress: Progress) -> pb.TrainerJobProgress:
    return pb.TrainerJobProgress(**_set(vars(progress)))


def _dataset_to_proto(stats: DatasetStats) -> pb.TrainerDatasetStats:
    return pb.TrainerDatasetStats(**vars(stats))


def _estimate_to_proto(estimate: Estimate) -> pb.TrainerResourceEstimate:
    return pb.TrainerResourceEstimate(**vars(estimate))


def checkpoint_to_proto(checkpoint: Checkpoint) -> pb.TrainerCheckpoint:
    return pb.TrainerCheckpoint(
        step=checkpoint.step,
        path=checkpoint.path,
        reason=REASONS.get(checkpoint.reason, pb.CHECKPOINT_REASON_UNSPECIFIED),
        saved_unix_s=checkpoint.saved_unix_s,
        size_bytes=checkpoint.size_bytes,
    )


def adapter_to_proto(adapter: TrainedAdapter) -> pb.TrainedAdapter:
    return pb.TrainedAdapter(**_set(vars(adapter)))


def error_to_proto(error: JobError) -> pb.TrainerJobError:
    return pb.TrainerJobError(reason=error.reason, message=error.message, metadata=error.metadata)


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    message = pb.JobEvent(
        seq=event.seq,
        job_id=event.job_id,
        type=EVENT_TYPES[event.type],
        time_unix_s=event.time_unix_s,
        state=STATES[event.state],
        progress=progress_to_proto(event.progress),
        message=event.message,
    )
    if event.checkpoint is not None:
        message.checkpoint.CopyFrom(checkpoint_to_proto(event.checkpoint))
    if event.error is not None:
        message.error.CopyFrom(error_to_proto(event.error))
    if event.adapter is not None:
        message.adapter.CopyFrom(adapter_to_proto(event.adapter))
    if event.job is not None:
        message.job.CopyFrom(job_to_proto(event.job))
    return message
