"""GET /v1/gpu/history's core: the scheduler's lease history as a tenant may see it (another tenant's training job
is "trainer/…", with no job id or description), and a scheduler that does not answer is a 503."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from baton.runtime.errors import NotFound, Unavailable
from baton.v1 import lease_pb2
from services.gateway.gpu import GpuView

NOW = 1_700_000_000.0


class FakeLeases:
    target = "127.0.0.1:1"

    def __init__(self, history: lease_pb2.GpuHistory | None) -> None:
        self.history = history
        self.windows: list[float] = []

    async def gpu_history(self, window_s: float) -> lease_pb2.GpuHistory:
        self.windows.append(window_s)
        if self.history is None:
            raise Unavailable("connection refused")
        return self.history


class FakeTrainer:
    tenants = {"job-mine": "alice", "job-theirs": "bob"}

    async def get(self, job_id: str) -> SimpleNamespace:
        if job_id not in self.tenants:
            raise NotFound(f"no job {job_id}")
        return SimpleNamespace(spec=SimpleNamespace(tenant=self.tenants[job_id]))


def interval(holder: str, kind: int, start: float, end: float = 0.0, how: str = "") -> lease_pb2.HeldInterval:
    return lease_pb2.HeldInterval(holder_id=holder, kind=kind, granted_unix_s=start, ended_unix_s=end, end=how,
                                  description=f"about {holder}")  # fmt: skip


def view(history: lease_pb2.GpuHistory | None) -> GpuView:
    return GpuView(FakeLeases(history), FakeTrainer(), policy="preempt", queue_max_wait_s=30)  # type: ignore[arg-type]


async def test_history_hides_other_tenants_jobs() -> None:
    history = lease_pb2.GpuHistory(now_unix_s=NOW, intervals=[
        interval("inference/vm/1", lease_pb2.LEASE_KIND_SERVING, NOW - 600, NOW - 300, "released"),
        interval("trainer/job-mine/1", lease_pb2.LEASE_KIND_TRAINING, NOW - 300, NOW - 60, "released"),
        interval("trainer/job-theirs/1", lease_pb2.LEASE_KIND_TRAINING, NOW - 60),
        interval("trainer/job-gone/1", lease_pb2.LEASE_KIND_TRAINING, NOW - 30),
    ])  # fmt: skip
    body = await view(history).history("alice", 3600)
    assert body["now_unix_s"] == NOW and body["window_s"] == 3600
    shown = [(i["kind"], i["holder_id"], i["job_id"], i["end"], i["ended_unix_s"]) for i in body["intervals"]]
    assert shown == [
        ("serving", "inference/vm/1", None, "released", NOW - 300),
        ("training", "trainer/job-mine/1", "job-mine", "released", NOW - 60),
        ("training", "trainer/…", None, None, None),
        ("training", "trainer/…", None, None, None),  # a job the trainer no longer knows: nobody's to show
    ]
    assert [i["description"] for i in body["intervals"]][2:] == ["", ""]


async def test_history_without_a_scheduler_is_unavailable() -> None:
    with pytest.raises(Unavailable) as error:
        await view(None).history("alice", 3600)
    assert error.value.reason == "SCHEDULER_UNREACHABLE"
