"""Wiring: settings → store, capacity, core, servicer, gRPC server; a ticker enforces deadlines and TTLs."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from baton.runtime.grpc_server import GrpcService, run_until_signalled
from baton.runtime.logging import log_event
from baton.v1 import lease_pb2, lease_pb2_grpc
from services.scheduler.capacity import detect_capacity
from services.scheduler.core import LeaseScheduler, SchedulerPolicy
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.servicer import GpuLeaseServicer
from services.scheduler.settings import SchedulerSettings
from services.scheduler.store import LeaseStore

log = logging.getLogger(__name__)

SERVICE_NAME = lease_pb2.DESCRIPTOR.services_by_name["GpuLease"].full_name


def build_scheduler(settings: SchedulerSettings, metrics: SchedulerMetrics) -> LeaseScheduler:
    store = LeaseStore(settings.resolved_state_path(), durability=settings.durability)
    capacity = detect_capacity(
        settings.gpu_index, settings.virtual_vram_gib, virtual_gpu=settings.virtual_gpu, use_nvml=settings.use_nvml
    )
    policy = SchedulerPolicy(
        ttl_s=settings.ttl_s,
        yield_deadline_s=settings.yield_deadline_s,
        ageing_s=settings.ageing_s,
        default_hold_s=settings.default_hold_s,
    )
    return LeaseScheduler(store, capacity, policy, metrics)


async def _tick_forever(scheduler: LeaseScheduler, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            scheduler.tick()
        except Exception:  # a bug in one tick must not stop deadline enforcement for good
            log.exception("scheduler tick failed")


async def serve(settings: SchedulerSettings) -> None:
    scheduler = build_scheduler(settings, SchedulerMetrics())
    service = GrpcService("scheduler", settings, [SERVICE_NAME])
    lease_pb2_grpc.add_GpuLeaseServicer_to_server(GpuLeaseServicer(scheduler), service.server)
    ticker: asyncio.Task[None] | None = None

    async def on_ready() -> None:
        nonlocal ticker
        ticker = asyncio.create_task(_tick_forever(scheduler, settings.tick_s))
        state = scheduler.state()
        log_event(
            log,
            "scheduler.ready",
            capacity_bytes=state.capacity_bytes,
            capacity_source=state.capacity_source,
            epoch=state.epoch,
            restored_leases=len(state.holders),
            state_path=settings.resolved_state_path(),
        )

    async def on_stop() -> None:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        scheduler.close()

    await run_until_signalled(service, on_ready=on_ready, on_stop=on_stop)
