"""The scheduler's domain types (plain data; no gRPC, no SQLite)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from baton.lease.kinds import LeaseKind

__all__ = ["EventType", "GpuStateView", "HolderView", "LeaseEvent", "LeaseKind", "LeaseRef", "LeaseSpec"]


class EventType(enum.Enum):
    QUEUED = "queued"
    GRANTED = "granted"
    YIELD_REQUESTED = "yield_requested"
    REVOKED = "revoked"
    RELEASED = "released"


@dataclass(frozen=True)
class LeaseSpec:
    """What a holder asks for."""

    holder_id: str
    kind: LeaseKind
    priority: int
    vram_bytes: int
    exclusive: bool
    preemptible: bool
    expected_duration_s: float = 0.0
    description: str = ""


@dataclass(frozen=True)
class LeaseRef:
    """A granted lease as its holder names it: the id and the fencing epoch of the grant."""

    lease_id: str
    epoch: int


@dataclass(frozen=True)
class LeaseEvent:
    """One message on a holder's Acquire stream."""

    type: EventType
    lease: LeaseRef | None = None
    position: int = 0
    eta_s: float = -1.0
    ttl_s: float = 0.0
    deadline_unix_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class StoredLease:
    """A held lease as persisted: enough to hold the GPU for its holder across a scheduler restart."""

    ref: LeaseRef
    spec: LeaseSpec
    granted_at_unix: float


@dataclass(frozen=True)
class HeldInterval:
    """One lease in the history: granted, and ended (released or revoked) or still held (ended_at_unix None)."""

    holder_id: str
    kind: LeaseKind
    epoch: int
    granted_at_unix: float
    ended_at_unix: float | None
    end_reason: str
    vram_bytes: int
    description: str


@dataclass(frozen=True)
class HolderView:
    spec: LeaseSpec
    ref: LeaseRef
    held_s: float
    last_heartbeat_age_s: float
    yield_requested: bool
    awaiting_reclaim: bool


@dataclass(frozen=True)
class WaiterView:
    spec: LeaseSpec
    effective_priority: float
    position: int
    waited_s: float
    eta_s: float


@dataclass(frozen=True)
class GpuStateView:
    capacity_bytes: int
    capacity_source: str
    used_bytes: int
    epoch: int
    holders: list[HolderView]
    waiters: list[WaiterView]
