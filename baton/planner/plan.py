"""The planner's answers: a plan per job (breakdowns of VRAM, host RAM, disk and time, a verdict, the lease to ask
for) and the sharing table for several jobs on one GPU. Plain pydantic models, so the gateway serves them as they are
and the CLI prints them as JSON or as a report (``baton.planner.report``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from baton.planner.catalog import GpuSpec

GIB = 1 << 30


def gib(size: float, digits: int = 1) -> str:
    """Memory for people: GiB, as nvidia-smi and the GPU catalogue count it."""
    return f"{size / GIB:,.{digits}f} GiB"


JobKind = Literal["training", "rag", "serving"]
LeaseKindName = Literal["TRAINING", "SERVING", "EMBEDDING_BULK"]


class Item(BaseModel):
    """One line of a breakdown."""

    model_config = ConfigDict(frozen=True)

    name: str
    bytes: int = Field(ge=0)
    note: str = ""


class Breakdown(BaseModel):
    """A total and the items it is the sum of."""

    model_config = ConfigDict(frozen=True)

    total_bytes: int = Field(ge=0)
    items: list[Item]

    @classmethod
    def of(cls, items: Iterable[Item]) -> Breakdown:
        kept = [item for item in items if item.bytes > 0]
        return cls(total_bytes=sum(item.bytes for item in kept), items=kept)

    def get(self, name: str) -> int:
        return sum(item.bytes for item in self.items if item.name == name)


class TimeEstimate(BaseModel):
    model_config = ConfigDict(frozen=True)

    seconds: float = Field(ge=0, description="0 when the job has no fixed amount of work (serving).")
    how: str = Field(description="The arithmetic behind the figure.")
    rates: dict[str, float] = Field(default_factory=dict, description="Throughputs the estimate assumes.")


class Verdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: Literal["fits", "fits_if", "does_not_fit"]
    summary: str
    headroom_bytes: int = Field(description="GPU memory left at the peak (negative: missing).")
    changes: list[str] = Field(default_factory=list, description="What to change so that it fits (fits_if).")
    changed_peak_bytes: int | None = Field(None, description="The peak after those changes.")


class LeaseAdvice(BaseModel):
    """What the job's lease request should say."""

    model_config = ConfigDict(frozen=True)

    kind: LeaseKindName
    vram_bytes: int
    exclusive: bool
    preemptible: bool


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True)

    job: JobKind
    title: str
    model: str
    gpu: GpuSpec
    vram: Breakdown = Field(description="Peak GPU memory (host memory when the 'GPU' is a CPU).")
    host_ram: Breakdown
    disk: Breakdown
    time: TimeEstimate
    verdict: Verdict
    lease: LeaseAdvice
    facts: dict[str, float | int | str] = Field(default_factory=dict, description="Derived quantities.")
    assumptions: list[str] = Field(default_factory=list)


class Pairing(BaseModel):
    model_config = ConfigDict(frozen=True)

    jobs: tuple[str, str]
    vram_bytes: int
    fits_together: bool
    how: str


class Sharing(BaseModel):
    """Which jobs may hold the GPU at the same time and which need the lease to themselves."""

    model_config = ConfigDict(frozen=True)

    gpu: GpuSpec
    pairings: list[Pairing]
    exclusive: list[str] = Field(description="Jobs that fit beside none of the others.")
    summary: str


class Report(BaseModel):
    """Several plans for one GPU and how they share it (``baton plan --scenario``, ``POST /v1/plan``)."""

    model_config = ConfigDict(frozen=True)

    title: str
    plans: list[Plan]
    sharing: Sharing | None = None
    answers: list[str] = Field(default_factory=list, description="Short answers to the questions the plan settles.")


Job = TypeVar("Job", bound=BaseModel)
Saver = tuple[str, dict[str, object]]


def verdict(
    job: Job, peak: int, capacity: int, savers: Sequence[Saver], peak_of: Callable[[Job], int], fits: str
) -> Verdict:
    """Fits as asked; else the shortest run of ``savers`` (applied one after another, cheapest first) that fits;
    else does not fit, with the peak after all of them."""
    if peak <= capacity:
        return Verdict(status="fits", summary=fits, headroom_bytes=capacity - peak)
    changed, changes, lowest = job, [], peak
    for label, update in savers:
        changed = changed.model_copy(update=update)
        changes.append(label)
        lowest = peak_of(changed)
        if lowest <= capacity:
            return Verdict(
                status="fits_if",
                summary=f"does not fit as asked ({gib(peak)} > {gib(capacity)}); fits at {gib(lowest)} if you: "
                + "; ".join(changes),
                headroom_bytes=capacity - peak,
                changes=changes,
                changed_peak_bytes=lowest,
            )
    return Verdict(
        status="does_not_fit",
        summary=f"does not fit: {gib(peak)} > {gib(capacity)}, and {gib(lowest)} even after: "
        + ("; ".join(changes) or "no change helps"),
        headroom_bytes=capacity - peak,
        changes=changes,
        changed_peak_bytes=lowest if changes else None,
    )
