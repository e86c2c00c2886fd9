"""kill -9 of the inference service, with each engine: the SERVING lease it held is freed by the scheduler's TTL,
and the next holder gets the GPU with a higher epoch. Nothing the service held can outlive it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from baton.lease import LeaseClient, LeaseKind, LeaseRequest
from tests.conftest import StartScheduler
from tests.fixtures.inference import ENGINES, AdapterRegistry, InferenceHandle

TTL_S = 2.0


@pytest.mark.parametrize("engine", ENGINES)
async def test_kill_9_of_the_service_frees_its_lease_within_the_ttl(
    engine: str, start_scheduler: StartScheduler, tmp_path: Path, tiny_llm: Path, adapter_registry: AdapterRegistry
) -> None:
    scheduler = start_scheduler("--ttl-s", str(TTL_S))
    service = InferenceHandle(engine, tmp_path / "inference", tiny_llm, adapter_registry.root, scheduler)
    try:
        await asyncio.to_thread(service.start)  # it waits for AWAKE with its own event loop
        async with LeaseClient(scheduler.target) as leases:
            state = await leases.gpu_state()
            [holder] = state.holders
            assert holder.holder_id.startswith("inference/") and holder.kind == LeaseKind.SERVING
            service.kill()
            killed = time.monotonic()
            request = LeaseRequest("test/next", LeaseKind.TRAINING, vram_bytes=1 << 30)
            lease = await asyncio.wait_for(leases.acquire(request), TTL_S + 10)
            freed_after_s = time.monotonic() - killed
            assert lease.epoch > holder.lease.epoch
            assert freed_after_s <= TTL_S + 1.5, f"freed {freed_after_s:.2f} s after the kill"
            await lease.release()
    finally:
        service.stop()
