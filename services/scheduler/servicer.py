"""The GpuLease gRPC servicer: decode, call the core, encode. No scheduling logic lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from baton.runtime.errors import InvalidArgument, grpc_errors
from baton.v1 import lease_pb2, lease_pb2_grpc
from services.scheduler.core import LeaseScheduler
from services.scheduler.model import (
    EventType,
    GpuStateView,
    HeldInterval,
    LeaseEvent,
    LeaseKind,
    LeaseRef,
    LeaseSpec,
)

_EVENT_TYPES = {
    EventType.QUEUED: lease_pb2.LeaseEvent.TYPE_QUEUED,
    EventType.GRANTED: lease_pb2.LeaseEvent.TYPE_GRANTED,
    EventType.YIELD_REQUESTED: lease_pb2.LeaseEvent.TYPE_YIELD_REQUESTED,
    EventType.REVOKED: lease_pb2.LeaseEvent.TYPE_REVOKED,
    EventType.RELEASED: lease_pb2.LeaseEvent.TYPE_RELEASED,
}


class GpuLeaseServicer(lease_pb2_grpc.GpuLeaseServicer):
    def __init__(self, scheduler: LeaseScheduler) -> None:
        self._scheduler = scheduler

    @grpc_errors
    async def Acquire(
        self, request: lease_pb2.AcquireRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lease_pb2.LeaseEvent]:
        reclaim = _ref_from_proto(request.reclaim) if request.HasField("reclaim") else None
        subscription = self._scheduler.acquire(
            _spec_from_proto(request), wait_timeout_s=request.wait_timeout_s, reclaim=reclaim
        )
        try:
            while (event := await subscription.next()) is not None:
                yield _event_to_proto(event)
        finally:
            # Runs when the stream ends, fails, or the client goes away (cancellation).
            self._scheduler.detach(subscription)

    @grpc_errors
    async def Heartbeat(
        self, request: lease_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.HeartbeatResponse:
        holder = self._scheduler.heartbeat(_ref_from_proto(request.lease))
        return lease_pb2.HeartbeatResponse(
            yield_requested=holder.yield_deadline is not None,
            deadline_unix_s=self._scheduler.yield_deadline_unix(holder),
            ttl_s=self._scheduler.policy.ttl_s,
        )

    @grpc_errors
    async def Release(
        self, request: lease_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.ReleaseResponse:
        return lease_pb2.ReleaseResponse(held_s=self._scheduler.release(_ref_from_proto(request.lease)))

    @grpc_errors
    async def ValidateLease(
        self, request: lease_pb2.ValidateLeaseRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.ValidateLeaseResponse:
        return lease_pb2.ValidateLeaseResponse(current_epoch=self._scheduler.validate(_ref_from_proto(request.lease)))

    @grpc_errors
    async def GetGpuState(
        self, request: lease_pb2.GetGpuStateRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.GpuState:
        return _state_to_proto(self._scheduler.state())

    @grpc_errors
    async def GetGpuHistory(
        self, request: lease_pb2.GetGpuHistoryRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.GpuHistory:
        now, intervals = self._scheduler.history(request.window_s)
        return lease_pb2.GpuHistory(now_unix_s=now, intervals=[_interval_to_proto(i) for i in intervals])


def _spec_from_proto(request: lease_pb2.AcquireRequest) -> LeaseSpec:
    try:
        kind = LeaseKind(request.kind)
    except ValueError:
        names = ", ".join(k.name for k in LeaseKind)
        raise InvalidArgument(f"unknown lease kind {request.kind}; use one of {names}", reason="UNKNOWN_KIND") from None
    return LeaseSpec(
        holder_id=request.holder_id,
        kind=kind,
        priority=request.priority,
        vram_bytes=request.vram_bytes,
        exclusive=request.exclusive,
        preemptible=request.preemptible,
        expected_duration_s=request.expected_duration_s,
        description=request.description,
    )


def _ref_from_proto(ref: lease_pb2.LeaseRef) -> LeaseRef:
    if not ref.lease_id:
        raise InvalidArgument("lease.lease_id is empty")
    return LeaseRef(lease_id=ref.lease_id, epoch=ref.epoch)


def _ref_to_proto(ref: LeaseRef | None) -> lease_pb2.LeaseRef | None:
    return None if ref is None else lease_pb2.LeaseRef(lease_id=ref.lease_id, epoch=ref.epoch)


def _event_to_proto(event: LeaseEvent) -> lease_pb2.LeaseEvent:
    return lease_pb2.LeaseEvent(
        type=_EVENT_TYPES[event.type],
        lease=_ref_to_proto(event.lease),
        position=event.position,
        eta_s=event.eta_s,
        ttl_s=event.ttl_s,
        deadline_unix_s=event.deadline_unix_s,
        reason=event.reason,
    )


def _state_to_proto(state: GpuStateView) -> lease_pb2.GpuState:
    return lease_pb2.GpuState(
        capacity_bytes=state.capacity_bytes,
        capacity_source=state.capacity_source,
        used_bytes=state.used_bytes,
        epoch=state.epoch,
        holders=[
            lease_pb2.HolderInfo(
                holder_id=h.spec.holder_id,
                kind=int(h.spec.kind),
                lease=_ref_to_proto(h.ref),
                priority=h.spec.priority,
                vram_bytes=h.spec.vram_bytes,
                exclusive=h.spec.exclusive,
                preemptible=h.spec.preemptible,
                held_s=h.held_s,
                last_heartbeat_age_s=h.last_heartbeat_age_s,
                yield_requested=h.yield_requested,
                awaiting_reclaim=h.awaiting_reclaim,
                description=h.spec.description,
            )
            for h in state.holders
        ],
        waiters=[
            lease_pb2.WaiterInfo(
                holder_id=w.spec.holder_id,
                kind=int(w.spec.kind),
                priority=w.spec.priority,
                effective_priority=w.effective_priority,
                vram_bytes=w.spec.vram_bytes,
                exclusive=w.spec.exclusive,
                position=w.position,
                waited_s=w.waited_s,
                eta_s=w.eta_s,
                description=w.spec.description,
            )
            for w in state.waiters
        ],
    )


def _interval_to_proto(interval: HeldInterval) -> lease_pb2.HeldInterval:
    return lease_pb2.HeldInterval(
        holder_id=interval.holder_id,
        kind=int(interval.kind),
        epoch=interval.epoch,
        granted_unix_s=interval.granted_at_unix,
        ended_unix_s=interval.ended_at_unix or 0.0,
        end=interval.end_reason,
        vram_bytes=interval.vram_bytes,
        description=interval.description,
    )
