"""``LeaseClient``: how every baton service asks for the GPU.

    async with LeaseClient("127.0.0.1:50060") as client:
        request = LeaseRequest("trainer/job-42", LeaseKind.TRAINING, vram_bytes=40 << 30, preemptible=True)
        async with client.lease(request) as lease:
            while there_is_work():
                lease.check()                      # fencing: raises LeaseLost if the GPU is no longer ours
                if lease.yield_requested.is_set():  # someone more important waits: checkpoint and give it back
                    break
                await do_one_step()

Behind the context manager a background task follows the lease stream and heartbeats every TTL/3. If the
connection breaks or the scheduler restarts, it re-attaches with ``reclaim`` (same lease, same epoch). The lease is
*lost* when the scheduler says so (revoked, expired) and *unconfirmed* when no heartbeat got through for a whole
TTL (the scheduler may have freed it); ``check()`` raises ``LeaseLost`` in both cases, because doing GPU work
then could overlap the next holder's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import grpc

from baton.lease.kinds import LeaseKind
from baton.runtime.errors import BatonError, FailedPrecondition, Internal, from_rpc_error
from baton.runtime.logging import log_event
from baton.v1 import lease_pb2, lease_pb2_grpc

log = logging.getLogger(__name__)

_RECONNECT_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_RPC_TIMEOUT_S = 5.0


class LeaseLost(FailedPrecondition):
    """The GPU is no longer (or not surely) ours: stop GPU work now."""

    default_reason = "LEASE_LOST"


@dataclass(frozen=True)
class LeaseRequest:
    """What to ask for. Defaults suit a job that wants the whole GPU and will not be interrupted."""

    holder_id: str
    kind: LeaseKind
    vram_bytes: int
    priority: int = 0
    exclusive: bool = True
    preemptible: bool = False
    expected_duration_s: float = 0.0
    wait_timeout_s: float = 0.0
    description: str = ""

    def to_proto(self, reclaim: lease_pb2.LeaseRef | None = None) -> lease_pb2.AcquireRequest:
        return lease_pb2.AcquireRequest(
            holder_id=self.holder_id,
            kind=int(self.kind),
            priority=self.priority,
            vram_bytes=self.vram_bytes,
            exclusive=self.exclusive,
            preemptible=self.preemptible,
            expected_duration_s=self.expected_duration_s,
            wait_timeout_s=self.wait_timeout_s,
            description=self.description,
            reclaim=reclaim,
        )


QueuedCallback = Callable[[int, float], None]


class LeaseClient:
    """A connection to the GpuLease service. Cheap to keep; one per process is enough."""

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None) -> None:
        self.target = target
        self._channel = channel or grpc.aio.insecure_channel(target)
        self.stub = lease_pb2_grpc.GpuLeaseStub(self._channel)

    async def __aenter__(self) -> LeaseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def lease(self, request: LeaseRequest, *, on_queued: QueuedCallback | None = None) -> Lease:
        """A lease to use as ``async with``: entering waits for the grant, leaving releases."""
        return Lease(self, request, on_queued=on_queued)

    async def acquire(self, request: LeaseRequest, *, on_queued: QueuedCallback | None = None) -> Lease:
        """Wait for the grant and return the held lease; call ``release()`` when done."""
        lease = self.lease(request, on_queued=on_queued)
        await lease.acquire()
        return lease

    async def gpu_state(self) -> lease_pb2.GpuState:
        return await self._unary(self.stub.GetGpuState, lease_pb2.GetGpuStateRequest())

    async def gpu_history(self, window_s: float = 0.0) -> lease_pb2.GpuHistory:
        """Leases held in the last ``window_s`` seconds (0: the scheduler's default hour)."""
        return await self._unary(self.stub.GetGpuHistory, lease_pb2.GetGpuHistoryRequest(window_s=window_s))

    async def heartbeat(self, ref: lease_pb2.LeaseRef) -> lease_pb2.HeartbeatResponse:
        return await self._unary(self.stub.Heartbeat, lease_pb2.HeartbeatRequest(lease=ref))

    async def release(self, ref: lease_pb2.LeaseRef) -> lease_pb2.ReleaseResponse:
        return await self._unary(self.stub.Release, lease_pb2.ReleaseRequest(lease=ref))

    async def validate(self, ref: lease_pb2.LeaseRef) -> lease_pb2.ValidateLeaseResponse:
        return await self._unary(self.stub.ValidateLease, lease_pb2.ValidateLeaseRequest(lease=ref))

    async def _unary(self, method: grpc.aio.UnaryUnaryMultiCallable, request: object) -> object:
        try:
            return await method(request, timeout=_RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None


class Lease:
    """A GPU lease held (or being acquired) by this process."""

    def __init__(self, client: LeaseClient, request: LeaseRequest, *, on_queued: QueuedCallback | None) -> None:
        self.client = client
        self.request = request
        self.ref: lease_pb2.LeaseRef | None = None
        self.ttl_s = 0.0
        self.yield_requested = asyncio.Event()
        self.yield_deadline_unix_s = 0.0
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.released = False
        self._on_queued = on_queued
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._last_confirmed = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def epoch(self) -> int:
        return self.ref.epoch if self.ref is not None else 0

    @property
    def lease_id(self) -> str:
        return self.ref.lease_id if self.ref is not None else ""

    async def __aenter__(self) -> Lease:
        await self.acquire()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()

    # ---------------------------------------------------------------------------------------------- public

    async def acquire(self) -> None:
        """Queue for the GPU and return once it is granted. Cancelling this call withdraws the request."""
        self._call = self.client.stub.Acquire(self.request.to_proto())
        try:
            granted = await self._read_until_granted(self._call)
        except BaseException:
            self._call.cancel()
            raise
        self._on_granted(granted)
        self._tasks = [
            asyncio.create_task(self._follow_stream(), name=f"lease-stream-{self.request.holder_id}"),
            asyncio.create_task(self._heartbeat_forever(), name=f"lease-heartbeat-{self.request.holder_id}"),
        ]

    def check(self) -> None:
        """Fencing before a unit of GPU work (local, no round trip). Raises LeaseLost if the GPU is not ours."""
        if self.released:
            raise LeaseLost("the lease was released", reason="LEASE_RELEASED")
        if self.lost.is_set():
            raise LeaseLost(f"lease epoch {self.epoch} was lost: {self.lost_reason}")
        if time.monotonic() - self._last_confirmed > self.ttl_s:
            raise LeaseLost(
                f"no heartbeat confirmed lease epoch {self.epoch} for {self.ttl_s:g} s; the scheduler may have "
                "freed it (work resumes when the lease is reclaimed)",
                reason="LEASE_UNCONFIRMED",
            )

    @property
    def valid(self) -> bool:
        try:
            self.check()
        except LeaseLost:
            return False
        return True

    async def validate(self) -> int:
        """Fencing with a round trip: the scheduler confirms this epoch holds the GPU. Returns the newest epoch."""
        self.check()
        assert self.ref is not None
        return (await self.client.validate(self.ref)).current_epoch

    async def release(self) -> None:
        """Give the GPU back (idempotent). A lease already revoked or expired is simply forgotten."""
        if self.released:
            return
        self.released = True
        try:
            # Release first: the scheduler then ends our stream with RELEASED, rather than seeing it cancelled.
            if self.ref is not None and not self.lost.is_set():
                await self.client.release(self.ref)
        except FailedPrecondition:
            pass  # already gone: revoked or expired while we were finishing
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self._call is not None:
                self._call.cancel()
            log_event(log, "lease.client_released", holder=self.request.holder_id, epoch=self.epoch)

    # ---------------------------------------------------------------------------------------------- internals

    async def _read_until_granted(self, call: grpc.aio.UnaryStreamCall) -> lease_pb2.LeaseEvent:
        try:
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    raise Internal("the scheduler ended the lease stream before granting")
                if event.type == lease_pb2.LeaseEvent.TYPE_GRANTED:
                    return event
                if event.type == lease_pb2.LeaseEvent.TYPE_QUEUED and self._on_queued is not None:
                    self._on_queued(event.position, event.eta_s)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    def _on_granted(self, event: lease_pb2.LeaseEvent) -> None:
        self.ref = lease_pb2.LeaseRef(lease_id=event.lease.lease_id, epoch=event.lease.epoch)
        self.ttl_s = event.ttl_s
        self._last_confirmed = time.monotonic()
        log_event(log, "lease.client_granted", holder=self.request.holder_id, epoch=self.epoch)

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            log_event(log, "lease.client_lost", level=logging.WARNING, holder=self.request.holder_id, reason=reason)

    def _on_event(self, event: lease_pb2.LeaseEvent) -> bool:
        """Apply one stream event; False when the stream is over for good."""
        if event.type == lease_pb2.LeaseEvent.TYPE_YIELD_REQUESTED:
            self.yield_deadline_unix_s = event.deadline_unix_s
            self.yield_requested.set()
        elif event.type == lease_pb2.LeaseEvent.TYPE_REVOKED:
            self._mark_lost(f"revoked: {event.reason}")
            return False
        elif event.type == lease_pb2.LeaseEvent.TYPE_RELEASED:
            return False
        elif event.type == lease_pb2.LeaseEvent.TYPE_GRANTED:
            self._last_confirmed = time.monotonic()
        return True

    async def _follow_stream(self) -> None:
        attempt = 0
        while not self.released and not self.lost.is_set():
            try:
                assert self._call is not None
                # read(), not `async for`: grpc.aio forbids mixing the two on one call, and acquire() used read().
                while (event := await self._call.read()) is not grpc.aio.EOF:
                    attempt = 0
                    if not self._on_event(event):
                        return
                # The server ended the stream without RELEASED/REVOKED (e.g. it is shutting down): re-attach.
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RETRYABLE:
                    self._mark_lost(f"{error.code().name}: {error.details()}")
                    return
            except Exception as error:  # a bug here must stop GPU work, not leave a silently dead follower
                log.exception("lease stream follower failed")
                self._mark_lost(f"client error: {error!r}")
                return
            await asyncio.sleep(_RECONNECT_BACKOFF_S[min(attempt, len(_RECONNECT_BACKOFF_S) - 1)])
            attempt += 1
            await self._reattach()

    async def _reattach(self) -> None:
        """Open a new stream with ``reclaim``; the first event is GRANTED (same epoch) or an error."""
        if self.released or self.lost.is_set():
            return
        self._call = self.client.stub.Acquire(self.request.to_proto(reclaim=self.ref))
        try:
            first = await self._call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self._mark_lost(f"reclaim refused: {error.details()}")
            return  # retryable: the next loop turn tries again
        if first is not grpc.aio.EOF:
            self._on_event(first)
            log_event(log, "lease.client_reattached", holder=self.request.holder_id, epoch=self.epoch)

    async def _heartbeat_forever(self) -> None:
        interval = max(self.ttl_s / 3, 0.05)
        while not self.released and not self.lost.is_set():
            await asyncio.sleep(interval)
            assert self.ref is not None
            try:
                response = await self.client.heartbeat(self.ref)
            except FailedPrecondition as error:
                self._mark_lost(error.message)
                return
            except BatonError:
                continue  # unavailable: keep trying; check() turns false after a whole TTL unconfirmed
            self._last_confirmed = time.monotonic()
            if response.yield_requested and not self.yield_requested.is_set():
                self.yield_deadline_unix_s = response.deadline_unix_s
                self.yield_requested.set()
