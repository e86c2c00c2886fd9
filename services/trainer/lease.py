"""The TRAINING lease from the GPU-lease scheduler, one per training run of a job.

A job asks with its own priority and preemptibility (TrainerGpuRequest) and its VRAM estimate. The holder id names
the job, so ``baton gpu`` shows which job trains. The service, not the training process, holds the lease: when the
scheduler asks for the GPU back the core signals the child to checkpoint (SIGUSR1) and releases the lease once the
child has exited; when the lease is lost (revoked, or unconfirmed for a whole TTL) the core kills the child at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from baton.lease import LeaseClient, LeaseKind, LeaseRequest
from baton.runtime.errors import BatonError, ResourceExhausted, Unavailable

QueuedCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainingLeaseRequest:
    job_id: str
    name: str
    vram_bytes: int
    priority: int
    preemptible: bool
    expected_duration_s: float = 0.0


class HeldLease(Protocol):
    """What the core needs of a granted lease (``baton.lease.Lease`` is one)."""

    yield_requested: asyncio.Event
    lost: asyncio.Event
    lost_reason: str
    yield_deadline_unix_s: float

    @property
    def epoch(self) -> int: ...

    @property
    def valid(self) -> bool: ...

    async def release(self) -> None: ...


class LeaseProvider(Protocol):
    uses_gpu_lease: bool

    async def acquire(self, request: TrainingLeaseRequest, on_queued: QueuedCallback) -> HeldLease: ...

    async def close(self) -> None: ...


class TrainingLeases:
    uses_gpu_lease = True

    def __init__(self, client: LeaseClient, *, exclusive: bool) -> None:
        self._client = client
        self._exclusive = exclusive

    async def acquire(self, request: TrainingLeaseRequest, on_queued: QueuedCallback) -> HeldLease:
        lease_request = LeaseRequest(
            holder_id=f"trainer/{request.job_id}",
            kind=LeaseKind.TRAINING,
            vram_bytes=request.vram_bytes,
            priority=request.priority,
            exclusive=self._exclusive,
            preemptible=request.preemptible,
            expected_duration_s=request.expected_duration_s,
            description=f"training {request.name} ({request.job_id})",
        )
        try:
            return await self._client.acquire(lease_request, on_queued=on_queued)
        except ResourceExhausted:
            raise
        except BatonError as error:
            raise Unavailable(
                f"the GPU-lease scheduler at {self._client.target} refused or did not answer ({error.message}); "
                "start it (baton serve scheduler) or set BATON_TRAINER_SCHEDULER_ADDR",
                reason="SCHEDULER_UNAVAILABLE",
                retry_after_s=2.0,
            ) from error

    async def close(self) -> None:
        await self._client.close()


class NoLease:
    """For machines where training does not share the GPU through the scheduler (gpu_lease=never, or CPU)."""

    uses_gpu_lease = False

    async def acquire(self, request: TrainingLeaseRequest, on_queued: QueuedCallback) -> HeldLease:
        return FreeLease()

    async def close(self) -> None:
        return None


class FreeLease:
    """A lease nobody can take away (also what unit tests drive by hand: set ``yield_requested`` or ``lost``)."""

    def __init__(self, epoch: int = 0) -> None:
        self.yield_requested = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.yield_deadline_unix_s = 0.0
        self.released = False
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def valid(self) -> bool:
        return not self.lost.is_set() and not self.released

    async def release(self) -> None:
        self.released = True
