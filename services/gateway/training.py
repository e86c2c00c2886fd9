"""Training through the gateway: a tenant's job request becomes a trainer job spec, and the trainer's jobs, events
and adapters come back as JSON. Transport-free (routes/training.py and routes/adapters.py decode and encode).

Every call passes the caller's tenant to the trainer, which answers NOT_FOUND for another tenant's job — the same
answer as for a job that never existed. Uploaded JSONL datasets are stored under BATON_HOME/training-data/<tenant>/
by content hash (the trainer reads them from there: that folder must be inside its allowed roots, as it is when
both share BATON_HOME).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, Field

from baton.clients.inference import InferenceClient
from baton.clients.trainer import TrainerClient, state_name
from baton.runtime.errors import BatonError, EmptyInput, FailedPrecondition, PayloadTooLarge, Unavailable
from baton.v1 import trainer_pb2 as pb

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_U32 = 2**32 - 1
STATE_NAMES = {state_name(value): value for value in pb.JobState.values() if value}
_QUANT = {"nf4": pb.TRAINER_QUANT_METHOD_NF4, "none": pb.TRAINER_QUANT_METHOD_NONE}
_FORMATS = {"text": pb.JSONL_FORMAT_TEXT, "messages": pb.JSONL_FORMAT_MESSAGES}


class TrainingJobBody(BaseModel):
    """A training job as the API takes it: flat, so that the same fields work as JSON and as multipart form fields
    beside an uploaded JSONL file. Unset values get the trainer's defaults (see GET /v1/training/jobs/{id})."""

    name: str = Field(pattern=NAME_PATTERN, description="Adapter name; the result is served under it.")
    collections: list[str] = Field(
        default_factory=list, description="Train on these collections of your documents (empty: all of them)."
    )
    document_ids: list[str] = Field(default_factory=list, description="Only these documents (empty: all).")
    format: Literal["text", "messages"] | None = Field(
        None, description="Uploaded JSONL only: line shape (unset: detected)."
    )
    train_on_prompt: bool = Field(False, description="Uploaded chat JSONL: also learn the user turns.")
    rank: int | None = Field(None, ge=1, le=512, description="LoRA rank (default 16).")
    alpha: float | None = Field(None, gt=0, le=1e6, description="LoRA alpha (default 2 x rank).")
    target_modules: list[str] = Field(default_factory=list, description="Modules to adapt (default: attention+MLP).")
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of the trained update the saved adapter keeps (default 1): below 1 interpolates toward "
        "the base model, which forgets less general text.",
    )
    top_layers: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of the model's layers, from the top, whose trained update the saved adapter keeps "
        "(default 1): the layers below return to the base model.",
    )
    quantization: Literal["nf4", "none"] | None = Field(None, description="nf4 = QLoRA (default), none = plain LoRA.")
    max_steps: int | None = Field(None, ge=1, le=_U32, description="Stop after this many optimizer steps.")
    epochs: float | None = Field(None, gt=0, le=1000, description="Passes over the training split (default 1).")
    seq_len: int | None = Field(None, ge=1, le=_U32, description="Tokens per training sequence (default 1024).")
    micro_batch_size: int | None = Field(None, ge=1, le=_U32, description="Sequences per forward pass.")
    grad_accumulation_steps: int | None = Field(None, ge=1, le=_U32, description="Micro-batches per step.")
    learning_rate: float | None = Field(None, gt=0, le=1, description="Peak learning rate (default 2e-4).")
    eval_fraction: float | None = Field(None, ge=0, le=0.5, description="Held-out share for evaluation.")
    checkpoint_every_steps: int | None = Field(None, ge=0, le=_U32, description="Checkpoint period in steps.")
    evaluate: bool | None = Field(
        None,
        description="Score the held-out split before and after training (default true). false: it stays held out, "
        "and scoring it is left to `baton eval views`, which saves two passes over it.",
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Same seed, same data and settings: same adapter.")
    priority: int | None = Field(None, ge=-1000, le=1000, description="GPU lease priority (default below serving).")
    hot_load: bool = Field(True, description="Load the adapter into the inference service when done.")
    description: str = Field("", max_length=2000, description="Free text for people.")
    request_id: str = Field("", max_length=200, description="Idempotency key: resubmitting it returns the same job.")
    validate_only: bool = Field(False, description="Check the spec and the dataset; queue nothing.")


class TrainingService:
    def __init__(
        self, trainer: TrainerClient, inference: InferenceClient, *, data_dir: Path, base_model_path: Path | None
    ) -> None:
        self.trainer = trainer
        self._inference = inference
        self._data_dir = data_dir
        self._base_model_path = base_model_path

    # ---------------------------------------------------------------------------------------------- jobs

    async def submit(self, tenant: str, body: TrainingJobBody, dataset_file: Path | None = None) -> dict[str, Any]:
        spec = pb.TrainerJobSpec(
            name=body.name,
            tenant=tenant,
            base_model_path=str(await self._base_model()),
            lora=_lora(body),
            quantization=pb.TrainerQuantizationSettings(method=_QUANT.get(body.quantization or "", 0)),
            hyperparameters=_hyperparameters(body),
            gpu=pb.TrainerGpuRequest(priority=body.priority) if body.priority is not None else None,
            hot_load=body.hot_load,
            description=body.description,
        )
        if dataset_file is not None:
            jsonl = pb.JsonlDataset(path=str(dataset_file), train_on_prompt=body.train_on_prompt)
            jsonl.format = _FORMATS.get(body.format or "", pb.JSONL_FORMAT_UNSPECIFIED)
            spec.jsonl.CopyFrom(jsonl)
        else:
            spec.documents.CopyFrom(pb.DocumentsDataset(collections=body.collections, document_ids=body.document_ids))
        # The idempotency key is the tenant's own: another tenant reusing a key must not get this tenant's job.
        request_id = f"{tenant}/{body.request_id}" if body.request_id else ""
        job = await self._trainer(self.trainer.submit(spec, request_id=request_id, validate_only=body.validate_only))
        return job_json(job)

    async def job(self, tenant: str, job_id: str) -> dict[str, Any]:
        return job_json(await self._trainer(self.trainer.get(job_id, tenant=tenant)))

    async def jobs(self, tenant: str, states: list[str], page_size: int, page_token: str) -> dict[str, Any]:
        wanted = [STATE_NAMES[state] for state in states]
        page = await self._trainer(
            self.trainer.list(tenant=tenant, states=wanted, page_size=page_size, page_token=page_token)
        )
        return {
            "jobs": [job_json(job) for job in page.jobs],
            "next_page_token": page.next_page_token or None,
            "total": page.total_size,
        }

    async def cancel(self, tenant: str, job_id: str) -> dict[str, Any]:
        return job_json(await self._trainer(self.trainer.cancel(job_id, tenant=tenant)))

    async def events(self, tenant: str, job_id: str, after_seq: int) -> AsyncIterator[dict[str, Any]]:
        """The job's events (a snapshot first, or the stored ones after ``after_seq``) until it ends. Checks the
        job first, so that an unknown or foreign job is a 404 before any stream starts."""
        await self.job(tenant, job_id)
        return self._events(tenant, job_id, after_seq)

    async def _events(self, tenant: str, job_id: str, after_seq: int) -> AsyncIterator[dict[str, Any]]:
        async for event in self.trainer.watch(job_id, tenant=tenant, after_seq=after_seq):
            yield event_json(event)

    # ---------------------------------------------------------------------------------------------- adapters

    async def adapters(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's registered adapters (every version its jobs produced), newest first, with whether the
        inference service serves that version now."""
        served = await self._served_versions()
        found: list[dict[str, Any]] = []
        token = ""
        while True:
            page = await self._trainer(
                self.trainer.list(tenant=tenant, states=[pb.JOB_STATE_SUCCEEDED], page_size=500, page_token=token)
            )
            for job in page.jobs:
                if job.HasField("adapter"):
                    found.append(adapter_json(job, served))
            token = page.next_page_token
            if not token:
                return found

    async def _served_versions(self) -> dict[str, str] | None:
        """name → folder served now; None when the inference service does not answer (served is then unknown)."""
        try:
            return {adapter.name: adapter.path for adapter in await self._inference.list_adapters()}
        except BatonError:
            return None

    # ---------------------------------------------------------------------------------------------- uploads

    def store_upload(self, tenant: str, source: BinaryIO, max_bytes: int) -> Path:
        """Copy an uploaded JSONL into the tenant's training-data folder, named by its content hash (the same file
        uploaded twice is stored once); written aside and renamed, so the trainer never reads half a file."""
        folder = self._data_dir / tenant
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".upload-{os.getpid()}-{id(source)}.tmp"
        digest, size = hashlib.sha256(), 0
        try:
            with partial.open("wb") as out:
                while block := source.read(1 << 20):
                    size += len(block)
                    if size > max_bytes:
                        raise PayloadTooLarge(
                            f"the dataset is larger than {max_bytes} bytes (max_upload_bytes); split it or raise "
                            "BATON_GATEWAY_MAX_UPLOAD_BYTES",
                        )
                    digest.update(block)
                    out.write(block)
            if size == 0:
                raise EmptyInput('the uploaded dataset is empty; send a JSONL file of {"text"} or {"messages"} lines')
            final = folder / f"{digest.hexdigest()}.jsonl"
            os.replace(partial, final)
            return final
        finally:
            partial.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------------- internals

    async def _base_model(self) -> Path:
        """The configured base model, else the folder the inference service serves (adapters must match it)."""
        if self._base_model_path is not None:
            return self._base_model_path
        try:
            info = await self._inference.info()
        except BatonError as error:
            raise Unavailable(
                f"training needs the base model's folder: the inference service does not answer ({error.message}); "
                "start it, or set BATON_GATEWAY_TRAIN_BASE_MODEL_PATH",
                reason="BASE_MODEL_UNKNOWN",
                retry_after_s=5.0,
            ) from error
        if not info.model_path:
            raise FailedPrecondition(
                "the inference service does not say where its model is; set BATON_GATEWAY_TRAIN_BASE_MODEL_PATH",
                reason="BASE_MODEL_UNKNOWN",
            )
        return Path(info.model_path)

    async def _trainer(self, call: Any) -> Any:
        try:
            return await call
        except Unavailable as error:
            if error.reason != Unavailable.default_reason:
                raise
            raise Unavailable(
                f"the trainer at {self.trainer.target} does not answer ({error.message}); start it (baton serve "
                "trainer) or set BATON_GATEWAY_TRAINER_ADDR",
                reason="TRAINER_UNREACHABLE",
                retry_after_s=5.0,
            ) from error


def _lora(body: TrainingJobBody) -> pb.TrainerLoraSettings:
    lora = pb.TrainerLoraSettings(target_modules=body.target_modules)
    if body.rank is not None:
        lora.rank = body.rank
    if body.alpha is not None:
        lora.alpha = body.alpha
    if body.strength is not None:
        lora.strength = body.strength
    if body.top_layers is not None:
        lora.top_layers = body.top_layers
    return lora


def _hyperparameters(body: TrainingJobBody) -> pb.TrainerHyperparameters:
    hp = pb.TrainerHyperparameters(seed=body.seed)
    for field in (
        "max_steps", "epochs", "seq_len", "micro_batch_size", "grad_accumulation_steps", "learning_rate",
        "eval_fraction", "checkpoint_every_steps", "evaluate",
    ):  # fmt: skip
        value = getattr(body, field)
        if value is not None:
            setattr(hp, field, value)
    return hp


def _dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def job_json(job: pb.TrainerJob) -> dict[str, Any]:
    body = _dict(job)
    body["state"] = state_name(job.state)
    body["terminal"] = job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
    body["id"] = body.pop("job_id", "")
    return body


def event_json(event: pb.JobEvent) -> dict[str, Any]:
    body = _dict(event)
    body["type"] = pb.JobEventType.Name(event.type).removeprefix("JOB_EVENT_TYPE_").lower()
    body["state"] = state_name(event.state)
    body["seq"] = event.seq
    if event.HasField("job"):
        body["job"] = job_json(event.job)
    return body


def adapter_json(job: pb.TrainerJob, served: dict[str, str] | None) -> dict[str, Any]:
    adapter = job.adapter
    body = _dict(adapter)
    body |= {"name": adapter.name, "version": adapter.version, "job_id": job.job_id}
    # By folder: the registry's version number is the trainer's, the inference service knows the path it loaded.
    path = served.get(adapter.name) if served is not None else None
    body["served"] = (
        None if served is None else path is not None and Path(path).resolve() == Path(adapter.path).resolve()
    )
    return body
