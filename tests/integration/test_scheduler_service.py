"""The scheduler as a real process on loopback, driven over real gRPC by real clients (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from baton.lease import LeaseClient, LeaseKind, LeaseLost, LeaseRequest
from baton.planner.catalog import GPUS
from baton.runtime.errors import FailedPrecondition, ResourceExhausted
from baton.v1 import lease_pb2, lease_pb2_grpc
from tests.conftest import REPO_ROOT, SchedulerHandle, StartScheduler

pytestmark = pytest.mark.integration

GIB = 1 << 30
CAPACITY_BYTES = GPUS["rtx-pro-6000"].memory_bytes  # the scheduler's default virtual GPU (96 GB)


@pytest.fixture
async def scheduler(start_scheduler: StartScheduler) -> SchedulerHandle:
    return start_scheduler("--ttl-s", "2", "--yield-deadline-s", "1")


@pytest.fixture
async def client(scheduler: SchedulerHandle) -> AsyncIterator[LeaseClient]:
    async with LeaseClient(scheduler.target) as lease_client:
        yield lease_client


def start_holder(target: str, holder_id: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.holder", target, holder_id, *extra],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


async def read_event(process: subprocess.Popen[str], timeout_s: float = 30) -> dict:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout_s)
    assert line, f"holder exited with {process.poll()}"
    return json.loads(line)


async def wait_until(predicate, timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll an async predicate; return the seconds it took to become true."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if await predicate():
            return time.monotonic() - start
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


async def scrape_metrics(port: int) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
        response.raise_for_status()
        return response.text


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo in the status")


# ------------------------------------------------------------------------------------------------ mutual exclusion


async def test_never_two_exclusive_holders_under_20_hammering_clients(scheduler: SchedulerHandle) -> None:
    """20 clients, 1,000+ acquire/release pairs of mixed exclusive and shared leases, random priorities and
    yields; both the clients' own view and the scheduler's reported state must never show an overlap."""
    rng = random.Random(7)
    active: dict[str, LeaseRequest] = {}
    violations: list[str] = []
    rounds_per_client, clients = 55, 20
    done = 0

    def on_grant(request: LeaseRequest) -> None:
        held = list(active.values())
        if request.exclusive and held:
            violations.append(f"{request.holder_id} exclusive granted while {[h.holder_id for h in held]} hold")
        if any(h.exclusive for h in held):
            violations.append(f"{request.holder_id} granted while an exclusive lease is held")
        if sum(h.vram_bytes for h in held) + request.vram_bytes > CAPACITY_BYTES:
            violations.append(f"{request.holder_id} granted beyond capacity")
        active[request.holder_id] = request

    async def worker(index: int) -> None:
        nonlocal done
        async with LeaseClient(scheduler.target) as lease_client:
            for round_no in range(rounds_per_client):
                request = LeaseRequest(
                    f"client-{index}",
                    rng.choice(list(LeaseKind)),
                    vram_bytes=rng.choice([8, 24, 40, 60]) * GIB,
                    priority=rng.randint(0, 3),
                    exclusive=rng.random() < 0.5,
                    preemptible=rng.random() < 0.5,
                    description=f"round {round_no}",
                )
                lease = await lease_client.acquire(request)
                on_grant(request)
                hold_s = rng.uniform(0, 0.004)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lease.yield_requested.wait(), hold_s)
                lease.check()
                del active[request.holder_id]  # before Release is sent: the next grant can only follow it
                await lease.release()
                done += 1

    async def monitor() -> None:
        async with LeaseClient(scheduler.target) as lease_client:
            while True:
                state = await lease_client.gpu_state()
                if any(h.exclusive for h in state.holders) and len(state.holders) > 1:
                    violations.append(f"scheduler reported {len(state.holders)} holders with an exclusive one")
                if state.used_bytes > state.capacity_bytes:
                    violations.append("scheduler reported more VRAM used than exists")
                await asyncio.sleep(0.005)

    watcher = asyncio.create_task(monitor())
    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(clients))), timeout=240)
    watcher.cancel()
    assert done == clients * rounds_per_client >= 1000
    assert violations == []
    async with LeaseClient(scheduler.target) as lease_client:
        state = await lease_client.gpu_state()
    assert state.holders == [] and state.waiters == []
    assert state.epoch == clients * rounds_per_client  # one epoch per grant, none reused or skipped


# ------------------------------------------------------------------------------------------------ preemption


async def test_higher_priority_preempts_a_preemptible_holder(client: LeaseClient) -> None:
    training = await client.acquire(
        LeaseRequest("trainer/job-1", LeaseKind.TRAINING, vram_bytes=60 * GIB, priority=0, preemptible=True)
    )
    serving_task = asyncio.create_task(
        client.acquire(LeaseRequest("inference-0", LeaseKind.SERVING, vram_bytes=60 * GIB, priority=10))
    )
    await asyncio.wait_for(training.yield_requested.wait(), 5)
    assert training.yield_deadline_unix_s > time.time()
    await training.release()
    serving = await asyncio.wait_for(serving_task, 5)
    assert serving.epoch > training.epoch
    await serving.release()


async def test_non_preemptible_holder_is_never_preempted(client: LeaseClient) -> None:
    training = await client.acquire(
        LeaseRequest("trainer/job-2", LeaseKind.TRAINING, vram_bytes=60 * GIB, priority=0, preemptible=False)
    )
    serving_task = asyncio.create_task(
        client.acquire(LeaseRequest("inference-0", LeaseKind.SERVING, vram_bytes=60 * GIB, priority=100))
    )
    await asyncio.sleep(2.5)  # longer than the yield deadline (1 s) and the TTL (2 s)
    assert not training.yield_requested.is_set()
    training.check()
    state = await client.gpu_state()
    assert [h.holder_id for h in state.holders] == ["trainer/job-2"]
    assert [(w.holder_id, w.position) for w in state.waiters] == [("inference-0", 1)]
    await training.release()
    serving = await asyncio.wait_for(serving_task, 5)
    await serving.release()


async def test_holder_ignoring_yield_is_revoked_and_fenced(client: LeaseClient, scheduler: SchedulerHandle) -> None:
    stubborn = await client.acquire(
        LeaseRequest("trainer/stubborn", LeaseKind.TRAINING, vram_bytes=80 * GIB, preemptible=True)
    )
    serving = await asyncio.wait_for(
        client.acquire(LeaseRequest("inference-0", LeaseKind.SERVING, vram_bytes=80 * GIB, priority=10)),
        timeout=5,  # yield deadline 1 s + one tick
    )
    assert stubborn.yield_requested.is_set()
    await asyncio.wait_for(stubborn.lost.wait(), 2)
    with pytest.raises(LeaseLost):
        stubborn.check()
    # Every later call with the old epoch: FAILED_PRECONDITION, reason STALE_LEASE.
    stub = client.stub
    ref = stubborn.ref
    for call, request in [
        (stub.Heartbeat, lease_pb2.HeartbeatRequest(lease=ref)),
        (stub.Release, lease_pb2.ReleaseRequest(lease=ref)),
        (stub.ValidateLease, lease_pb2.ValidateLeaseRequest(lease=ref)),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(request)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(error.value).reason == "STALE_LEASE"
    assert await serving.validate() == serving.epoch
    await serving.release()
    await stubborn.release()  # harmless on a lost lease
    metrics = await scrape_metrics(scheduler.metrics_port)
    assert 'baton_lease_revocations_total{kind="training",reason="missed_yield_deadline"} 1.0' in metrics


# ------------------------------------------------------------------------------------------------ crashes


async def test_kill_9_of_a_holder_frees_its_lease_within_ttl(client: LeaseClient, scheduler: SchedulerHandle) -> None:
    holder = start_holder(scheduler.target, "doomed", "--vram-bytes", str(90 * GIB))
    try:
        granted = await read_event(holder)
        assert granted["event"] == "granted"
        holder.kill()
        killed_at = time.monotonic()

        async def freed() -> bool:
            return not (await client.gpu_state()).holders

        await wait_until(freed, timeout_s=10)
        elapsed = time.monotonic() - killed_at
        assert elapsed <= 2 + 1, f"lease freed {elapsed:.2f} s after kill -9 (TTL 2 s)"
        newcomer = await client.acquire(LeaseRequest("next", LeaseKind.SERVING, vram_bytes=90 * GIB))
        assert newcomer.epoch == granted["epoch"] + 1
        await newcomer.release()
    finally:
        holder.kill()
        holder.wait()


async def test_kill_9_of_the_scheduler_keeps_the_lease_for_its_holder(scheduler: SchedulerHandle) -> None:
    async with LeaseClient(scheduler.target) as holder_client, LeaseClient(scheduler.target) as other:
        held = await holder_client.acquire(LeaseRequest("inference-0", LeaseKind.SERVING, vram_bytes=50 * GIB))
        epoch_before = held.epoch
        scheduler.kill()
        scheduler.start()  # same port, same state file

        # A newcomer is refused while the restored lease waits for its holder.
        with pytest.raises(ResourceExhausted):
            await other.acquire(
                LeaseRequest("trainer/job-3", LeaseKind.TRAINING, vram_bytes=50 * GIB, wait_timeout_s=-1)
            )
        state = await other.gpu_state()
        assert [h.holder_id for h in state.holders] == ["inference-0"]
        assert state.epoch == epoch_before  # epochs never go backwards

        async def reattached() -> bool:
            holders = (await other.gpu_state()).holders
            return bool(holders) and not holders[0].awaiting_reclaim

        await wait_until(reattached, timeout_s=5)
        assert held.epoch == epoch_before
        assert await held.validate() == epoch_before
        await held.release()
        newcomer = await other.acquire(LeaseRequest("trainer/job-3", LeaseKind.TRAINING, vram_bytes=50 * GIB))
        assert newcomer.epoch == epoch_before + 1
        await newcomer.release()


async def test_restarted_scheduler_frees_an_unclaimed_lease_only_after_ttl(scheduler: SchedulerHandle) -> None:
    holder = start_holder(scheduler.target, "gone-with-the-scheduler", "--vram-bytes", str(90 * GIB))
    granted = await read_event(holder)
    holder.kill()
    holder.wait()
    scheduler.kill()
    scheduler.start()
    restarted_at = time.monotonic()
    async with LeaseClient(scheduler.target) as lease_client:
        newcomer = await lease_client.acquire(LeaseRequest("next", LeaseKind.SERVING, vram_bytes=90 * GIB))
        waited = time.monotonic() - restarted_at
        assert 1.5 <= waited <= 2 + 1  # held for the TTL (2 s) of grace, then freed
        assert newcomer.epoch == granted["epoch"] + 1
        await newcomer.release()


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        ({"holder_id": "x", "kind": 1, "vram_bytes": -1}, "INVALID_ARGUMENT"),
        ({"holder_id": "x", "kind": 1, "vram_bytes": 0}, "INVALID_ARGUMENT"),
        ({"holder_id": "x", "kind": 99, "vram_bytes": GIB}, "UNKNOWN_KIND"),
        ({"holder_id": "x", "kind": 0, "vram_bytes": GIB}, "UNKNOWN_KIND"),
        ({"holder_id": "x", "kind": 2, "vram_bytes": 97 * GIB}, "VRAM_ABOVE_CAPACITY"),
        ({"holder_id": "", "kind": 2, "vram_bytes": GIB}, "INVALID_ARGUMENT"),
        ({"holder_id": "   ", "kind": 2, "vram_bytes": GIB}, "INVALID_ARGUMENT"),
    ],
)
async def test_bad_requests_get_invalid_argument(scheduler: SchedulerHandle, request_fields: dict, reason: str) -> None:
    async with grpc.aio.insecure_channel(scheduler.target) as channel:
        stub = lease_pb2_grpc.GpuLeaseStub(channel)
        call = stub.Acquire(lease_pb2.AcquireRequest(**request_fields))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error.value).reason == reason
        assert error.value.details()  # a message that says what to do
        state = await stub.GetGpuState(lease_pb2.GetGpuStateRequest())
        assert not state.holders and not state.waiters


async def test_stale_calls_map_back_to_domain_errors(client: LeaseClient) -> None:
    bogus = lease_pb2.LeaseRef(lease_id="nope", epoch=42)
    with pytest.raises(FailedPrecondition) as error:
        await client.heartbeat(bogus)
    assert error.value.reason == "STALE_LEASE"


# ------------------------------------------------------------------------------------------------ service basics


async def test_health_reflection_metrics_and_graceful_stop(scheduler: SchedulerHandle) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(scheduler.target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="baton.v1.GpuLease")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = [s.name async for r in responses for s in r.list_services_response.service]
        assert "baton.v1.GpuLease" in services
        async with LeaseClient(scheduler.target) as lease_client:
            lease = await lease_client.acquire(LeaseRequest("m", LeaseKind.EMBEDDING_BULK, vram_bytes=2 * GIB))
            await lease.release()
    metrics = await scrape_metrics(scheduler.metrics_port)
    for name in (
        'baton_lease_grants_total{kind="embedding_bulk"} 1.0',
        'baton_lease_holders{kind="serving"} 0.0',
        "baton_lease_queue_length 0.0",
        "baton_lease_epoch 1.0",
        "baton_lease_handover_seconds_bucket",
        'baton_lease_wait_seconds_count{kind="embedding_bulk"} 1.0',
    ):
        assert name in metrics, name
    assert scheduler.process is not None
    assert scheduler.process.stop() == 0  # SIGTERM: graceful, exit code 0
    assert "service.stopped" in scheduler.process.log_tail()
