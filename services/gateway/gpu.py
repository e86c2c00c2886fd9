"""The GPU as the gateway sees it: who holds the lease, who waits and when each is expected to finish, and what a
chat does when training holds the GPU (DESIGN.md, "Policy when a chat arrives while training holds the GPU").

- ``preempt``: the chat goes straight to the inference service, whose SERVING lease outranks training; the scheduler
  asks the training job to yield, it checkpoints and pauses, and resumes once serving gives the GPU back. Serving
  gives it back when it has been idle for ``serving_idle_s`` while something else waits (the ``GpuArbiter`` below
  puts the inference service to sleep then) — without that, an idle model would keep the GPU forever.
- ``queue``: while a non-serving holder (training, bulk embedding) has the GPU, a chat waits for it to finish
  instead of preempting it; when the expected wait is longer than ``queue_max_wait_s`` (or the wait runs out) the
  chat is refused at once: 503 with ``Retry-After`` and the ETA in the body.

ETAs: a training job's own estimate (its progress.eta_s, from its measured step rate) when the holder is a trainer
job, else the scheduler's (the holder's declared duration). Unknown: -1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from baton.clients.inference import InferenceClient
from baton.clients.trainer import TrainerClient
from baton.lease.client import LeaseClient
from baton.runtime.errors import BatonError, InvalidArgument, Unavailable
from baton.runtime.logging import log_event
from baton.v1 import inference_pb2, lease_pb2

log = logging.getLogger(__name__)

GpuPolicy = Literal["preempt", "queue"]
_KINDS = {
    lease_pb2.LEASE_KIND_SERVING: "serving",
    lease_pb2.LEASE_KIND_TRAINING: "training",
    lease_pb2.LEASE_KIND_EMBEDDING_BULK: "embedding_bulk",
}
_TRAINER_PREFIX = "trainer/"
_POLL_S = 0.25
DEFAULT_HISTORY_S = 3600.0  # the scheduler's default window (window_s 0)
T = TypeVar("T")


@dataclass(frozen=True)
class Holder:
    holder_id: str
    kind: str
    priority: int
    vram_bytes: int
    exclusive: bool
    preemptible: bool
    held_s: float
    yield_requested: bool
    eta_s: float  # seconds until it is expected to release; -1 unknown
    job_id: str  # the trainer job holding it ("" for other holders)
    tenant: str  # the job's tenant ("" when unknown)
    description: str


class GpuView:
    def __init__(
        self,
        leases: LeaseClient,
        trainer: TrainerClient,
        *,
        policy: GpuPolicy,
        queue_max_wait_s: float,
    ) -> None:
        self.leases = leases
        self.trainer = trainer
        self.policy = policy
        self.queue_max_wait_s = queue_max_wait_s

    async def state(self) -> tuple[lease_pb2.GpuState, list[Holder]]:
        state = await self._scheduler(self.leases.gpu_state())
        holders = await asyncio.gather(*(self._holder(h) for h in state.holders))
        return state, list(holders)

    async def history(self, tenant: str, window_s: float) -> dict[str, Any]:
        """Who held the GPU in the last ``window_s`` seconds, as ``tenant`` may see it (another tenant's training
        job shows as "trainer/…")."""
        history = await self._scheduler(self.leases.gpu_history(window_s))
        job_ids = {_job_id(i.holder_id) for i in history.intervals} - {""}
        tenants = dict(zip(job_ids, await asyncio.gather(*(self._job_tenant(j) for j in job_ids)), strict=True))
        return {
            "now_unix_s": history.now_unix_s,
            "window_s": window_s or DEFAULT_HISTORY_S,
            "intervals": [interval_json(i, tenants.get(_job_id(i.holder_id), "") == tenant) for i in history.intervals],
        }

    async def _scheduler(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except BatonError as error:
            if isinstance(error, InvalidArgument):
                raise
            raise Unavailable(
                f"the GPU scheduler at {self.leases.target} does not answer ({error.message}); start it (baton serve "
                "scheduler) or set BATON_GATEWAY_SCHEDULER_ADDR",
                reason="SCHEDULER_UNREACHABLE",
                retry_after_s=5.0,
            ) from error

    async def _job_tenant(self, job_id: str) -> str:
        try:
            return (await self.trainer.get(job_id)).spec.tenant
        except BatonError:  # a job the trainer no longer knows (or a trainer restarting): shown as someone else's
            return ""

    async def _holder(self, info: lease_pb2.HolderInfo) -> Holder:
        job_id = _job_id(info.holder_id)
        eta_s, tenant = -1.0, ""
        if job_id:
            try:
                job = await self.trainer.get(job_id)
            except BatonError as error:  # the trainer may be restarting: the ETA is then unknown
                log_event(log, "gateway.gpu_holder_unknown", level=logging.WARNING, job=job_id, why=error.message)
            else:
                tenant = job.spec.tenant
                if job.progress.HasField("eta_s"):
                    eta_s = job.progress.eta_s
        return Holder(
            holder_id=info.holder_id,
            kind=_KINDS.get(info.kind, "unknown"),
            priority=info.priority,
            vram_bytes=info.vram_bytes,
            exclusive=info.exclusive,
            preemptible=info.preemptible,
            held_s=info.held_s,
            yield_requested=info.yield_requested,
            eta_s=eta_s,
            job_id=job_id,
            tenant=tenant,
            description=info.description,
        )

    async def chat_eta_s(self) -> tuple[float, list[Holder]]:
        """(seconds until a chat may use the GPU under the queue policy, the holders in its way); 0 when free."""
        _, holders = await self.state()
        return chat_eta(holders)

    async def admit_chat(self) -> None:
        """Under ``queue``: wait until no training holds the GPU, or refuse with 503 + ETA. A no-op under
        ``preempt``, and when the scheduler does not answer (the chat then meets the inference service's own wait
        limit; a missing scheduler must not take chat down with it)."""
        if self.policy != "queue":
            return
        deadline = time.monotonic() + self.queue_max_wait_s
        while True:
            try:
                eta_s, blocking = await self.chat_eta_s()
            except Unavailable:
                return
            if not blocking:
                return
            if eta_s > self.queue_max_wait_s or time.monotonic() >= deadline:
                raise self._busy(eta_s, blocking)
            await asyncio.sleep(_POLL_S)

    def _busy(self, eta_s: float, blocking: list[Holder]) -> Unavailable:
        holder = blocking[0]
        retry = eta_s if eta_s > 0 else self.queue_max_wait_s
        known = f"expected free in about {eta_s:.0f} s" if eta_s >= 0 else "when it will be free is not known yet"
        return Unavailable(
            f"the GPU is busy ({holder.kind} holds it; policy queue), {known}; the wait limit is "
            f"{self.queue_max_wait_s:g} s (queue_max_wait_s) — retry after Retry-After, or see GET /v1/gpu",
            reason="GPU_BUSY",
            metadata={"eta_s": f"{eta_s:.1f}", "holder_kind": holder.kind, "policy": self.policy},
            retry_after_s=retry,
        )


def _job_id(holder_id: str) -> str:
    """The trainer's holder ids are "trainer/<job_id>/<attempt>"; "" for any other holder."""
    return holder_id.removeprefix(_TRAINER_PREFIX).split("/")[0] if holder_id.startswith(_TRAINER_PREFIX) else ""


def chat_eta(holders: list[Holder]) -> tuple[float, list[Holder]]:
    """Under ``queue`` a chat waits for every non-serving holder: the latest of their ETAs (-1 if any is unknown)."""
    blocking = [h for h in holders if h.kind != "serving"]
    if not blocking:
        return 0.0, []
    etas = [h.eta_s for h in blocking]
    return (-1.0 if min(etas) < 0 else max(etas)), blocking


def holder_json(holder: Holder, tenant: str) -> dict[str, Any]:
    """A holder as a tenant may see it: another tenant's job id and description stay hidden."""
    own = bool(holder.job_id) and holder.tenant == tenant
    return {
        "kind": holder.kind,
        "holder_id": holder.holder_id if own or not holder.job_id else "trainer/…",
        "job_id": holder.job_id if own else None,
        "priority": holder.priority,
        "vram_bytes": holder.vram_bytes,
        "exclusive": holder.exclusive,
        "preemptible": holder.preemptible,
        "held_s": round(holder.held_s, 3),
        "yield_requested": holder.yield_requested,
        "eta_s": round(holder.eta_s, 3),
        "description": holder.description if own or not holder.job_id else "",
    }


def interval_json(interval: lease_pb2.HeldInterval, own: bool) -> dict[str, Any]:
    """One lease of the timeline; a training job's id and description only for its own tenant."""
    job_id = _job_id(interval.holder_id)
    visible = own or not job_id
    return {
        "kind": _KINDS.get(interval.kind, "unknown"),
        "holder_id": interval.holder_id if visible else "trainer/…",
        "job_id": job_id if job_id and own else None,
        "epoch": interval.epoch,
        "granted_unix_s": interval.granted_unix_s,
        "ended_unix_s": interval.ended_unix_s or None,
        "end": interval.end or None,
        "vram_bytes": interval.vram_bytes,
        "description": interval.description if visible else "",
    }


def waiter_json(waiter: lease_pb2.WaiterInfo) -> dict[str, Any]:
    own_name = not waiter.holder_id.startswith(_TRAINER_PREFIX)
    return {
        "kind": _KINDS.get(waiter.kind, "unknown"),
        "holder_id": waiter.holder_id if own_name else "trainer/…",
        "position": waiter.position,
        "priority": waiter.priority,
        "vram_bytes": waiter.vram_bytes,
        "waited_s": round(waiter.waited_s, 3),
        "eta_s": round(waiter.eta_s, 3),
    }


class GpuArbiter:
    """Hands the GPU from an idle model to whatever waits for it: when a non-serving request waits and the
    inference service, awake and holding the SERVING lease, has run nothing for ``idle_s``, it is put to sleep (it
    releases the lease; the next chat wakes it again). Off when ``idle_s`` is 0."""

    def __init__(
        self, leases: LeaseClient, inference: InferenceClient, *, idle_s: float, period_s: float = 1.0
    ) -> None:
        self._leases = leases
        self._inference = inference
        self._idle_s = idle_s
        self._period_s = period_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._idle_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gpu-arbiter")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.tick()
            except BatonError:
                continue  # a service is down or restarting: nothing to hand over now
            except Exception:  # a bug here must not end the loop silently
                log.exception("gpu arbiter tick failed")

    async def tick(self) -> bool:
        """One look; True when it put the inference service to sleep."""
        state = await self._leases.gpu_state()
        waiting = [w for w in state.waiters if w.kind != lease_pb2.LEASE_KIND_SERVING]
        serving = [h for h in state.holders if h.kind == lease_pb2.LEASE_KIND_SERVING]
        if not waiting or not serving:
            return False
        health = await self._inference.health()
        idle = health.running_requests == 0 and health.queued_requests == 0 and health.idle_s >= self._idle_s
        if not (health.holds_lease and health.state == inference_pb2.INFERENCE_STATE_AWAKE and idle):
            return False
        log_event(log, "gateway.gpu_handover", idle_s=round(health.idle_s, 1), waiter=waiting[0].holder_id)
        await self._inference.sleep()
        return True
