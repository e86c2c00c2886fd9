"""Scheduler settings (env prefix BATON_SCHEDULER_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from baton.runtime.settings import ServiceSettings, service_config


class SchedulerSettings(ServiceSettings):
    model_config = service_config("scheduler")

    grpc_port: int = Field(50060, ge=0, le=65535, description="gRPC port of the GpuLease service.")
    state_path: Path | None = Field(None, description="SQLite file for epochs and held leases [home/scheduler.sqlite].")
    durability: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite synchronous mode: FULL survives power loss, NORMAL only process crashes."
    )
    gpu_index: int = Field(0, ge=0, description="Which GPU (NVML index) this scheduler hands out.")
    use_nvml: bool = Field(True, description="Read the VRAM capacity from NVML when a GPU is present.")
    virtual_gpu: str = Field(
        "rtx-pro-6000",
        description="The planner's catalogue GPU simulated when NVML finds none (its memory).",
    )
    virtual_vram_gib: float = Field(
        0.0, ge=0, description="VRAM of the virtual GPU [0 = the virtual_gpu's memory from the planner's catalogue]."
    )
    ttl_s: float = Field(10.0, gt=0, description="A holder silent for this long loses its lease.")
    yield_deadline_s: float = Field(30.0, gt=0, description="Time a holder gets to yield before it is revoked.")
    ageing_s: float = Field(
        60.0, ge=0, description="A waiter gains one priority step per this many seconds waited (0 = no ageing)."
    )
    default_hold_s: float = Field(300.0, gt=0, description="Assumed hold time for ETAs when a holder gives none.")
    tick_s: float = Field(0.1, gt=0, le=1, description="How often deadlines and TTLs are checked.")

    def resolved_state_path(self) -> Path:
        return self.state_path or self.home / "scheduler.sqlite"
