"""The GPU-lease state machine. It knows nothing of gRPC: the servicer feeds it requests and relays its events.

Rules (DESIGN.md, "The GPU lease"):
- A request is granted when it fits: nothing exclusive is held, an exclusive request finds the GPU empty, and
  the VRAM estimates of all holders fit in the capacity.
- Waiters are served strictly in order of effective priority (priority + one step per ``ageing_s`` waited),
  FIFO within equal priority. A head that does not fit blocks the ones behind it, so a large job is never starved
  by a stream of small ones; ageing makes sure a low priority is never starved by a stream of high ones.
- When the head waiter does not fit and preemptible holders of strictly lower (base) priority stand in its way,
  the fewest of them needed (lowest priority first, newest first) are asked to yield before a deadline. A holder
  that misses the deadline is revoked. Non-preemptible holders are never asked.
- A holder heartbeats; one silent for ``ttl_s`` is revoked. Its stream breaking does not end the lease (the holder
  may re-attach with ``reclaim``), so a dead holder's lease is freed by the TTL.
- Every grant gets a new epoch, persisted with the lease before the grant is announced. After a restart the
  persisted leases are held again, awaiting reclaim by their holders for one TTL; nothing is granted over them.

All methods run on one asyncio event loop; none of them awaits, so each transition is atomic.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from baton.runtime.errors import (
    AlreadyExists,
    BatonError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from baton.runtime.logging import log_event
from services.scheduler.capacity import GpuCapacity
from services.scheduler.metrics import SchedulerMetrics, kind_label
from services.scheduler.model import (
    EventType,
    GpuStateView,
    HeldInterval,
    HolderView,
    LeaseEvent,
    LeaseRef,
    LeaseSpec,
    WaiterView,
)
from services.scheduler.store import HISTORY_KEPT_S, LeaseStore

log = logging.getLogger(__name__)

MAX_HOLDER_ID_LENGTH = 200
# A queued waiter is told its new ETA only when it moved by more than this (seconds), to keep streams quiet.
_ETA_NOTIFY_STEP_S = 1.0
DEFAULT_HISTORY_S = 3600.0


@dataclass(frozen=True)
class SchedulerPolicy:
    ttl_s: float = 10.0
    yield_deadline_s: float = 30.0
    ageing_s: float = 60.0
    default_hold_s: float = 300.0


class Clock:
    """Monotonic time for timers, wall time for what is shown or persisted. Tests substitute a fake."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class Subscription:
    """The channel from the core to one Acquire stream: events, then an error or the end."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[LeaseEvent | BatonError | None] = asyncio.Queue()
        self.closed = False

    def push(self, event: LeaseEvent) -> None:
        if not self.closed:
            self._queue.put_nowait(event)

    def fail(self, error: BatonError) -> None:
        if not self.closed:
            self._queue.put_nowait(error)
            self.closed = True

    def close(self) -> None:
        if not self.closed:
            self._queue.put_nowait(None)
            self.closed = True

    async def next(self) -> LeaseEvent | None:
        """The next event; None when the stream is over. Raises the error the core ended it with."""
        item = await self._queue.get()
        if isinstance(item, BatonError):
            raise item
        return item


@dataclass
class _Waiter:
    spec: LeaseSpec
    seq: int
    enqueued_at: float
    deadline: float | None
    subscription: Subscription
    position: int = 0
    eta_s: float = -1.0


@dataclass
class _Holder:
    spec: LeaseSpec
    ref: LeaseRef
    granted_at: float
    last_heartbeat: float
    subscription: Subscription | None
    yield_deadline: float | None = None
    yield_reason: str = ""
    reclaimed_from_restart: bool = field(default=False)


class LeaseScheduler:
    def __init__(
        self,
        store: LeaseStore,
        capacity: GpuCapacity,
        policy: SchedulerPolicy,
        metrics: SchedulerMetrics,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._capacity = capacity
        self._policy = policy
        self._metrics = metrics
        self._clock = clock or Clock()
        self._holders: dict[str, _Holder] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._seq = 0
        self._freed_at: float | None = None
        self._epoch = store.current_epoch()
        self._restore()
        metrics.vram_capacity.set(capacity.total_bytes)

    @property
    def policy(self) -> SchedulerPolicy:
        return self._policy

    # ------------------------------------------------------------------------------------------------ requests

    def acquire(self, spec: LeaseSpec, *, wait_timeout_s: float = 0.0, reclaim: LeaseRef | None = None) -> Subscription:
        """Queue ``spec`` (or re-attach to a held lease); the subscription reports the grant and what follows."""
        self._validate(spec)
        if reclaim is not None:
            return self._reclaim(spec.holder_id, reclaim)
        self._refuse_duplicate(spec.holder_id)
        now = self._clock.monotonic()
        if wait_timeout_s < 0 and not self._grantable_now(spec, now):
            eta_s = self._eta_if_queued(spec, now)
            raise ResourceExhausted(
                f"the GPU is busy and {spec.holder_id!r} asked not to wait; try again in about {eta_s:.0f} s",
                reason="GPU_BUSY",
                metadata={"position": str(len(self._waiters) + 1), "eta_s": f"{eta_s:.1f}"},
                retry_after_s=eta_s,
            )
        self._seq += 1
        deadline = now + wait_timeout_s if wait_timeout_s > 0 else None
        waiter = _Waiter(spec, self._seq, now, deadline, Subscription())
        self._waiters[spec.holder_id] = waiter
        log_event(log, "lease.requested", **_spec_fields(spec))
        self._schedule()
        return waiter.subscription

    def heartbeat(self, ref: LeaseRef) -> _Holder:
        holder = self._holder_for(ref)
        holder.last_heartbeat = self._clock.monotonic()
        return holder

    def release(self, ref: LeaseRef) -> float:
        """Give the GPU back; returns the seconds it was held."""
        holder = self._holder_for(ref)
        held_s = self._clock.monotonic() - holder.granted_at
        self._metrics.releases.labels(kind_label(holder.spec.kind)).inc()
        self._remove_holder(holder, EventType.RELEASED, "released by holder")
        return held_s

    def validate(self, ref: LeaseRef) -> int:
        """Fencing: raises FailedPrecondition unless ``ref`` holds the GPU now; returns the newest epoch."""
        self._holder_for(ref)
        return self._epoch

    def detach(self, subscription: Subscription) -> None:
        """An Acquire stream ended. A waiter gives up; a holder keeps its lease until its heartbeats stop."""
        subscription.close()
        for waiter in list(self._waiters.values()):
            if waiter.subscription is subscription:
                del self._waiters[waiter.spec.holder_id]
                log_event(log, "lease.withdrawn", holder=waiter.spec.holder_id)
                self._schedule()
                return
        for holder in self._holders.values():
            if holder.subscription is subscription:
                holder.subscription = None
                log_event(log, "lease.detached", holder=holder.spec.holder_id, epoch=holder.ref.epoch)
                return

    def tick(self) -> None:
        """Enforce deadlines and TTLs, expire impatient waiters, re-rank by age. Called a few times a second."""
        now = self._clock.monotonic()
        for holder in list(self._holders.values()):
            if holder.yield_deadline is not None and now > holder.yield_deadline:
                self._revoke(holder, "missed_yield_deadline")
            elif now - holder.last_heartbeat > self._policy.ttl_s:
                reason = "reclaim_timeout" if holder.reclaimed_from_restart else "heartbeat_timeout"
                self._revoke(holder, reason)
        for waiter in list(self._waiters.values()):
            if waiter.deadline is not None and now > waiter.deadline:
                del self._waiters[waiter.spec.holder_id]
                log_event(log, "lease.wait_timeout", holder=waiter.spec.holder_id, position=waiter.position)
                waiter.subscription.fail(
                    ResourceExhausted(
                        f"{waiter.spec.holder_id!r} waited its whole wait_timeout_s for the GPU; "
                        f"it is expected free in about {waiter.eta_s:.0f} s",
                        reason="WAIT_TIMEOUT",
                        metadata={"position": str(waiter.position), "eta_s": f"{waiter.eta_s:.1f}"},
                        retry_after_s=max(waiter.eta_s, 0.0),
                    )
                )
        self._schedule()

    def state(self) -> GpuStateView:
        now = self._clock.monotonic()
        holders = [
            HolderView(
                spec=h.spec,
                ref=h.ref,
                held_s=now - h.granted_at,
                last_heartbeat_age_s=now - h.last_heartbeat,
                yield_requested=h.yield_deadline is not None,
                awaiting_reclaim=h.subscription is None,
            )
            for h in sorted(self._holders.values(), key=lambda h: h.ref.epoch)
        ]
        waiters = [
            WaiterView(
                spec=w.spec,
                effective_priority=self._effective_priority(w, now),
                position=w.position,
                waited_s=now - w.enqueued_at,
                eta_s=w.eta_s,
            )
            for w in self._ordered_waiters(now)
        ]
        return GpuStateView(
            capacity_bytes=self._capacity.total_bytes,
            capacity_source=self._capacity.source,
            used_bytes=self._used_bytes(self._holders.values()),
            epoch=self._epoch,
            holders=holders,
            waiters=waiters,
        )

    def history(self, window_s: float) -> tuple[float, list[HeldInterval]]:
        """(now on the wall clock, the leases held at any time in the last ``window_s`` seconds)."""
        if not 0 <= window_s <= HISTORY_KEPT_S:
            raise InvalidArgument(
                f"window_s must be between 0 and {HISTORY_KEPT_S:g} (a day of history is kept), not {window_s:g}",
                reason="INVALID_WINDOW",
            )
        now = self._clock.wall()
        return now, self._store.history(now - (window_s or DEFAULT_HISTORY_S))

    def close(self) -> None:
        for waiter in self._waiters.values():
            waiter.subscription.close()
        for holder in self._holders.values():
            if holder.subscription is not None:
                holder.subscription.close()

    # ------------------------------------------------------------------------------------------------ checks

    def _validate(self, spec: LeaseSpec) -> None:
        if not spec.holder_id.strip():
            raise InvalidArgument("holder_id is empty; name the holder, e.g. 'trainer/job-42'")
        if len(spec.holder_id) > MAX_HOLDER_ID_LENGTH:
            raise InvalidArgument(f"holder_id is longer than {MAX_HOLDER_ID_LENGTH} characters")
        if spec.vram_bytes <= 0:
            raise InvalidArgument(f"vram_bytes must be > 0 (got {spec.vram_bytes}); use the planner's estimate")
        if spec.vram_bytes > self._capacity.total_bytes:
            raise InvalidArgument(
                f"vram_bytes {spec.vram_bytes} exceeds the GPU's capacity {self._capacity.total_bytes} "
                f"({self._capacity.name}); this job can never run here — shrink it (`baton plan` shows how)",
                reason="VRAM_ABOVE_CAPACITY",
                metadata={"capacity_bytes": str(self._capacity.total_bytes)},
            )
        if spec.expected_duration_s < 0:
            raise InvalidArgument("expected_duration_s must be >= 0")

    def _refuse_duplicate(self, holder_id: str) -> None:
        if holder_id in self._holders:
            holder = self._holders[holder_id]
            raise AlreadyExists(
                f"{holder_id!r} already holds lease {holder.ref.lease_id} (epoch {holder.ref.epoch}); "
                f"reclaim it with that epoch, release it, or wait up to {self._policy.ttl_s:g} s for it to expire",
                reason="HOLDER_ALREADY_HOLDS",
            )
        if holder_id in self._waiters:
            raise AlreadyExists(f"{holder_id!r} is already waiting for the GPU", reason="HOLDER_ALREADY_WAITS")

    def _holder_for(self, ref: LeaseRef) -> _Holder:
        for holder in self._holders.values():
            if holder.ref == ref:
                return holder
        raise FailedPrecondition(
            f"lease {ref.lease_id} with epoch {ref.epoch} does not hold the GPU (released, expired or revoked; "
            f"newest epoch is {self._epoch}); stop GPU work and acquire again",
            reason="STALE_LEASE",
            metadata={"current_epoch": str(self._epoch)},
        )

    # ------------------------------------------------------------------------------------------------ scheduling

    def _schedule(self) -> None:
        now = self._clock.monotonic()
        while self._waiters:
            head = self._ordered_waiters(now)[0]
            if not self._fits(head.spec, self._holders.values()):
                self._preempt_for(head)
                break
            self._grant(head, now)
        self._publish_queue(now)
        self._update_gauges()

    def _fits(self, spec: LeaseSpec, holders: Iterable[_Holder]) -> bool:
        return _fits(spec, [h.spec for h in holders], self._capacity.total_bytes)

    def _grantable_now(self, spec: LeaseSpec, now: float) -> bool:
        ahead = [w for w in self._waiters.values() if self._effective_priority(w, now) >= spec.priority]
        return not ahead and self._fits(spec, self._holders.values())

    def _grant(self, waiter: _Waiter, now: float) -> None:
        del self._waiters[waiter.spec.holder_id]
        lease_id = uuid.uuid4().hex
        epoch = self._store.grant(lease_id, waiter.spec, self._clock.wall())
        self._epoch = epoch
        ref = LeaseRef(lease_id, epoch)
        self._holders[waiter.spec.holder_id] = _Holder(waiter.spec, ref, now, now, waiter.subscription)
        kind = kind_label(waiter.spec.kind)
        self._metrics.grants.labels(kind).inc()
        self._metrics.wait_seconds.labels(kind).observe(now - waiter.enqueued_at)
        self._metrics.epoch.set(epoch)
        handover_s = None
        if self._freed_at is not None:
            handover_s = now - self._freed_at
            self._metrics.handover_seconds.observe(handover_s)
            self._freed_at = None
        waiter.subscription.push(LeaseEvent(EventType.GRANTED, lease=ref, ttl_s=self._policy.ttl_s))
        log_event(
            log,
            "lease.granted",
            holder=waiter.spec.holder_id,
            kind=kind,
            epoch=epoch,
            vram_bytes=waiter.spec.vram_bytes,
            wait_s=now - waiter.enqueued_at,
            handover_s=handover_s if handover_s is not None else "-",
        )

    def _preempt_for(self, head: _Waiter) -> None:
        staying = [h for h in self._holders.values() if h.yield_deadline is None]
        candidates = [h for h in staying if h.spec.preemptible and h.spec.priority < head.spec.priority]
        untouchable = [h for h in staying if h not in candidates]
        if not candidates or not self._fits(head.spec, untouchable):
            return  # preempting everyone allowed would still not make room: wait for releases instead
        remaining = list(staying)
        for holder in sorted(candidates, key=lambda h: (h.spec.priority, -h.ref.epoch)):
            if self._fits(head.spec, remaining):
                break
            remaining.remove(holder)
            self._ask_to_yield(holder, head)

    def _ask_to_yield(self, holder: _Holder, head: _Waiter) -> None:
        holder.yield_deadline = self._clock.monotonic() + self._policy.yield_deadline_s
        deadline_unix = self._clock.wall() + self._policy.yield_deadline_s
        holder.yield_reason = f"{head.spec.holder_id} ({kind_label(head.spec.kind)}, priority {head.spec.priority})"
        self._metrics.preemptions.labels(kind_label(holder.spec.kind)).inc()
        if holder.subscription is not None:
            holder.subscription.push(
                LeaseEvent(
                    EventType.YIELD_REQUESTED,
                    lease=holder.ref,
                    deadline_unix_s=deadline_unix,
                    ttl_s=self._policy.ttl_s,
                    reason=holder.yield_reason,
                )
            )
        log_event(
            log,
            "lease.yield_requested",
            holder=holder.spec.holder_id,
            epoch=holder.ref.epoch,
            for_holder=head.spec.holder_id,
            deadline_s=self._policy.yield_deadline_s,
        )

    def yield_deadline_unix(self, holder: _Holder) -> float:
        if holder.yield_deadline is None:
            return 0.0
        return self._clock.wall() + (holder.yield_deadline - self._clock.monotonic())

    def _revoke(self, holder: _Holder, reason: str) -> None:
        self._metrics.revocations.labels(kind_label(holder.spec.kind), reason).inc()
        self._remove_holder(holder, EventType.REVOKED, reason, level=logging.WARNING)

    def _remove_holder(self, holder: _Holder, how: EventType, reason: str, *, level: int = logging.INFO) -> None:
        self._store.delete(holder.ref.lease_id, ended_at_unix=self._clock.wall(), end_reason=how.value)
        del self._holders[holder.spec.holder_id]
        now = self._clock.monotonic()
        self._metrics.held_seconds.labels(kind_label(holder.spec.kind)).observe(now - holder.granted_at)
        if self._waiters:
            self._freed_at = now
        if holder.subscription is not None:
            holder.subscription.push(LeaseEvent(how, lease=holder.ref, reason=reason))
            holder.subscription.close()
        log_event(
            log,
            f"lease.{how.value}",
            level=level,
            holder=holder.spec.holder_id,
            epoch=holder.ref.epoch,
            held_s=now - holder.granted_at,
            reason=reason,
        )
        self._schedule()

    def _reclaim(self, holder_id: str, ref: LeaseRef) -> Subscription:
        holder = self._holders.get(holder_id)
        if holder is None or holder.ref != ref:
            raise FailedPrecondition(
                f"{holder_id!r} cannot reclaim lease {ref.lease_id} (epoch {ref.epoch}): it no longer holds the "
                "GPU; acquire anew",
                reason="STALE_LEASE",
                metadata={"current_epoch": str(self._epoch)},
            )
        if holder.subscription is not None:
            holder.subscription.close()  # a newer stream of the same holder replaces the old one
        holder.subscription = Subscription()
        holder.last_heartbeat = self._clock.monotonic()
        holder.reclaimed_from_restart = False
        holder.subscription.push(LeaseEvent(EventType.GRANTED, lease=ref, ttl_s=self._policy.ttl_s))
        if holder.yield_deadline is not None:
            holder.subscription.push(
                LeaseEvent(
                    EventType.YIELD_REQUESTED,
                    lease=ref,
                    deadline_unix_s=self.yield_deadline_unix(holder),
                    ttl_s=self._policy.ttl_s,
                    reason=holder.yield_reason,
                )
            )
        log_event(log, "lease.reclaimed", holder=holder_id, epoch=ref.epoch)
        return holder.subscription

    def _restore(self) -> None:
        """After a restart: hold every persisted lease again and give its holder one TTL to re-attach."""
        now, wall = self._clock.monotonic(), self._clock.wall()
        for stored in self._store.held_leases():
            granted_at = now - max(0.0, wall - stored.granted_at_unix)
            self._holders[stored.spec.holder_id] = _Holder(
                stored.spec, stored.ref, granted_at, now, None, reclaimed_from_restart=True
            )
            log_event(log, "lease.restored", holder=stored.spec.holder_id, epoch=stored.ref.epoch)
        self._metrics.epoch.set(self._epoch)
        self._update_gauges()

    # ------------------------------------------------------------------------------------------------ queue view

    def _effective_priority(self, waiter: _Waiter, now: float) -> float:
        if self._policy.ageing_s <= 0:
            return float(waiter.spec.priority)
        return waiter.spec.priority + (now - waiter.enqueued_at) / self._policy.ageing_s

    def _ordered_waiters(self, now: float) -> list[_Waiter]:
        return sorted(self._waiters.values(), key=lambda w: (-self._effective_priority(w, now), w.seq))

    def _publish_queue(self, now: float) -> None:
        ordered = self._ordered_waiters(now)
        etas = self._estimate_etas([w.spec for w in ordered], now)
        for position, (waiter, eta_s) in enumerate(zip(ordered, etas, strict=True), start=1):
            moved = position != waiter.position or abs(eta_s - waiter.eta_s) > _ETA_NOTIFY_STEP_S
            waiter.position, waiter.eta_s = position, eta_s
            if moved:
                waiter.subscription.push(LeaseEvent(EventType.QUEUED, position=position, eta_s=round(eta_s, 3)))

    def _eta_if_queued(self, spec: LeaseSpec, now: float) -> float:
        ordered = [w.spec for w in self._ordered_waiters(now)]
        return self._estimate_etas([*ordered, spec], now)[-1]

    def _estimate_etas(self, queue: list[LeaseSpec], now: float) -> list[float]:
        """Replay the queue against the holders' expected end times (their own estimates, else the default)."""
        running: list[tuple[float, LeaseSpec]] = [(self._expected_end(h, now), h.spec) for h in self._holders.values()]
        clock = now
        etas: list[float] = []
        for spec in queue:
            running.sort(key=lambda item: item[0])
            while running and not _fits(spec, [s for _, s in running], self._capacity.total_bytes):
                clock = max(clock, running.pop(0)[0])
            etas.append(clock - now)
            running.append((clock + (spec.expected_duration_s or self._policy.default_hold_s), spec))
        return etas

    def _expected_end(self, holder: _Holder, now: float) -> float:
        if holder.yield_deadline is not None:
            return holder.yield_deadline
        duration = holder.spec.expected_duration_s or self._policy.default_hold_s
        return max(now, holder.granted_at + duration)

    def _used_bytes(self, holders: Iterable[_Holder]) -> int:
        return sum(h.spec.vram_bytes for h in holders)

    def _update_gauges(self) -> None:
        counts = {kind_label(h.spec.kind): 0 for h in self._holders.values()}
        for holder in self._holders.values():
            counts[kind_label(holder.spec.kind)] += 1
        for kind in ("serving", "training", "embedding_bulk"):
            self._metrics.holders.labels(kind).set(counts.get(kind, 0))
        self._metrics.set_holders({(h.spec.holder_id, kind_label(h.spec.kind)) for h in self._holders.values()})
        self._metrics.queue_length.set(len(self._waiters))
        self._metrics.vram_used.set(self._used_bytes(self._holders.values()))


def _fits(spec: LeaseSpec, held: list[LeaseSpec], capacity_bytes: int) -> bool:
    if any(other.exclusive for other in held):
        return False
    if spec.exclusive and held:
        return False
    return sum(other.vram_bytes for other in held) + spec.vram_bytes <= capacity_bytes


def _spec_fields(spec: LeaseSpec) -> dict[str, object]:
    return {
        "holder": spec.holder_id,
        "kind": kind_label(spec.kind),
        "priority": spec.priority,
        "vram_bytes": spec.vram_bytes,
        "exclusive": spec.exclusive,
        "preemptible": spec.preemptible,
    }
