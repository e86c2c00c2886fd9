"""POST /v1/plan: what training, building the memory and serving take on a GPU, and whether they fit.

The planner (``baton.planner``) is a pure library: this route only reads the request — a catalogue model or a
``config.json`` object inline (never a path on the server), a catalogue GPU or a custom one — and returns the report.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from baton.planner import catalog
from baton.planner.catalog import GpuSpec
from baton.planner.models import ModelArch
from baton.planner.plan import Report
from baton.planner.rag import RagJob
from baton.planner.scenario import build_report, scenario
from baton.planner.serving import ServingJob
from baton.planner.training import TrainingJob
from services.gateway.tenancy import current_tenant

router = APIRouter(tags=["plan"])
MAX_CONFIG_KEYS = 512


class PlanRequest(BaseModel):
    """Jobs to plan; none given means all three with their defaults."""

    model_config = ConfigDict(extra="forbid")

    scenario: Literal["seed"] | None = Field(None, description="A bundled scenario (the other fields are ignored).")
    model: str = Field("qwen3-30b-a3b", description=f"Catalogue model: {', '.join(catalog.MODEL_CONFIGS)}.")
    config: dict[str, Any] | None = Field(
        None, description="A model's config.json object, instead of a catalogue model.", max_length=MAX_CONFIG_KEYS
    )
    gpu: str = Field("rtx-pro-6000", description=f"Catalogue GPU: {', '.join(catalog.GPUS)}.")
    custom_gpu: GpuSpec | None = Field(None, description="Your own GPU, instead of a catalogue one.")
    training: TrainingJob | None = None
    rag: RagJob | None = None
    serving: ServingJob | None = None


@router.post("/v1/plan", summary="Plan VRAM, host RAM, disk and time of training, memory and serving on a GPU")
async def plan(request: PlanRequest, _tenant: Annotated[str, Depends(current_tenant)]) -> Report:
    if request.scenario:
        return scenario(request.scenario)
    arch = ModelArch.from_config(request.config, name="custom") if request.config else catalog.model(request.model)
    every = request.training is None and request.rag is None and request.serving is None
    return build_report(
        arch,
        request.custom_gpu or catalog.gpu(request.gpu),
        training=TrainingJob() if every else request.training,
        rag=RagJob() if every else request.rag,
        serving=ServingJob() if every else request.serving,
    )
