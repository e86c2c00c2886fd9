"""Trainer settings (env prefix BATON_TRAINER_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from baton.runtime.settings import CommaList, LeaseSettings, service_config

GpuLeaseMode = Literal["auto", "always", "never"]


class TrainerSettings(LeaseSettings):
    model_config = service_config("trainer")

    grpc_port: int = Field(50063, ge=0, le=65535, description="gRPC port of the Trainer service (0 picks a free one).")

    # ------------------------------------------------------------------------------------------------ storage
    state_path: Path | None = Field(
        None, description="SQLite file of jobs and their events [home/trainer/jobs.sqlite]."
    )
    durability: Literal["FULL", "NORMAL"] = Field(
        "NORMAL",
        description="SQLite synchronous mode. NORMAL survives a crash of the service (checkpoints on disk are the "
        "truth for training progress); FULL also survives power loss.",
    )
    jobs_dir: Path | None = Field(
        None, description="Working folders of jobs (spec, events, checkpoints, output) [home/trainer/jobs]."
    )
    adapter_root: Path | None = Field(
        None, description="The adapter registry: finished adapters go to <root>/<name>/<version>/ [home/adapters]."
    )
    allowed_roots: CommaList = Field(
        default_factory=list,
        description="Folders a JSONL dataset may be read from, comma-separated [home]; a path outside them is "
        "refused (DATASET_PATH_INVALID).",
    )
    catalog_path: Path | None = Field(
        None, description="The gateway's catalog, read-only, for datasets of ingested documents [home/catalog.sqlite]."
    )
    texts_dir: Path | None = Field(
        None,
        description="Cleaned texts of ingested documents, <content_hash>.txt, written by the gateway [home/texts].",
    )

    # ------------------------------------------------------------------------------------------------ jobs
    max_queued_jobs: int = Field(
        16, ge=1, description="Unfinished jobs (queued, waiting, training) accepted at once; more: QUEUE_FULL."
    )
    max_crash_restarts: int = Field(
        2,
        ge=0,
        description="Times a training process that crashed (killed, segfault; no error of its own) is restarted from "
        "its last checkpoint before the job fails with TRAINER_CRASHED.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where jobs train; auto = cuda when NVML finds a GPU, else cpu."
    )
    child_stop_timeout_s: float = Field(
        120.0,
        gt=0,
        description="On shutdown: seconds the training process gets to save a checkpoint after SIGTERM before it is "
        "killed (its previous checkpoint is then the resume point).",
    )
    worker_module: str = Field(
        "services.trainer.worker",
        description="Python module run as the training process (`python -m MODULE JOB_DIR`); tests substitute a "
        "fake one, nobody else should change it.",
    )

    # ------------------------------------------------------------------------------------------------ GPU lease
    gpu_lease: GpuLeaseMode = Field(
        "auto",
        description="Train under a TRAINING lease: auto = when training on CUDA, always = on CPU too (tests, the "
        "demo), never = not at all.",
    )
    scheduler_addr: str = Field("127.0.0.1:50060", description="gRPC address of the GPU-lease scheduler.")
    lease_priority: int = Field(
        5, description="Default priority of a job's TRAINING lease (below serving's 10, above bulk embedding's 0)."
    )
    lease_exclusive: bool = Field(True, description="Ask for the GPU alone (false: share it within the VRAM budget).")

    # ------------------------------------------------------------------------------------------------ hot-load
    inference_addr: str = Field(
        "",
        description="gRPC address of the inference service, asked to load each new adapter (replace=true) when a "
        "job with hot_load succeeds; empty = do not ask.",
    )
    hot_load_timeout_s: float = Field(120.0, gt=0, description="How long a hot-load request may take.")

    def resolved_state_path(self) -> Path:
        return self.state_path or self.home / "trainer" / "jobs.sqlite"

    def resolved_jobs_dir(self) -> Path:
        return (self.jobs_dir or self.home / "trainer" / "jobs").resolve()

    def resolved_adapter_root(self) -> Path:
        return (self.adapter_root or self.home / "adapters").resolve()

    def resolved_allowed_roots(self) -> list[Path]:
        roots = [Path(root) for root in self.allowed_roots] or [self.home]
        return [root.expanduser().resolve() for root in roots]

    def resolved_catalog_path(self) -> Path:
        return self.catalog_path or self.home / "catalog.sqlite"

    def resolved_texts_dir(self) -> Path:
        return (self.texts_dir or self.home / "texts").resolve()
