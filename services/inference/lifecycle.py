"""Where the service stands with the GPU: the SERVING lease, sleep and wake, and the requests that must drain first.

    LOADING ──start──► SLEEPING ──request/Wake──► WAKING ──lease granted, engine woken──► AWAKE
                          ▲                                                              │
                          └──────── engine asleep, lease released ◄── YIELDING ◄─────────┘
                                                                   (scheduler asks, or Sleep)

The engine starts lazily, on the first wake, because on a GPU loading it already needs the lease. A wake is one
background task shared by every request waiting for it; when the last waiter gives up before the lease is granted,
the wake is withdrawn (so an abandoned queue never leaves the service holding an idle GPU). Yielding stops new
requests from starting, lets running ones finish within the drain time, aborts the rest (their streams end with
ABORTED), puts the engine to sleep and only then releases the lease: the GPU is never used without it. A lease
*lost* (revoked, or unconfirmed for a whole TTL) aborts everything at once — doing GPU work then could overlap the
next holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from baton.runtime.errors import BatonError, FailedPrecondition, ResourceExhausted, Unavailable
from baton.runtime.logging import log_event
from services.inference.engine import AdapterSlot, InferenceEngine
from services.inference.metrics import InferenceMetrics

log = logging.getLogger(__name__)


class ServiceState(StrEnum):
    LOADING = "loading"
    AWAKE = "awake"
    SLEEPING = "sleeping"
    WAKING = "waking"
    YIELDING = "yielding"
    FAILED = "failed"


class HeldLease(Protocol):
    """What the lifecycle needs of a granted lease (``baton.lease.Lease`` is one)."""

    yield_requested: asyncio.Event
    lost: asyncio.Event
    yield_deadline_unix_s: float

    @property
    def epoch(self) -> int: ...

    @property
    def lease_id(self) -> str: ...

    @property
    def valid(self) -> bool: ...

    async def release(self) -> None: ...


QueuedCallback = Callable[[int, float], None]


class LeaseProvider(Protocol):
    uses_gpu_lease: bool

    async def acquire(self, on_queued: QueuedCallback) -> HeldLease: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SleepOutcome:
    released_epoch: int
    drain_s: float
    sleep_s: float
    aborted_requests: int


@dataclass(frozen=True)
class WakeOutcome:
    lease_epoch: int
    lease_wait_s: float
    wake_s: float


class RequestAborted(Exception):
    """Raised inside a running request's stream when the service must stop it (yield past the drain, lease lost)."""


@dataclass
class _Running:
    request_id: str
    task: asyncio.Task[None] | None = None  # the engine pump, cancelled to abort
    aborted: bool = False


_DEFAULT_SLEEP_ESTIMATE_S = {"sleep": 1.0, "offload": 1.0, "restart": 6.0, "pause": 0.2}


class Lifecycle:
    """The state machine above. Transport-free; the core and the servicer drive it."""

    def __init__(
        self,
        engine: InferenceEngine,
        leases: LeaseProvider,
        metrics: InferenceMetrics,
        *,
        max_concurrent_requests: int,
        queue_capacity: int,
        drain_timeout_s: float,
        yield_method: str,
    ) -> None:
        self.engine = engine
        self.leases = leases
        self.metrics = metrics
        self.state = ServiceState.LOADING
        self.state_since_unix_s = time.time()
        self.message = "loading the tokenizer"
        self.stay_asleep = False
        self.lease: HeldLease | None = None
        self.queue_position = 0
        self.queue_eta_s = 0.0
        self.queue_capacity = queue_capacity
        self.queued = 0
        self.running: dict[str, _Running] = {}
        self.last_finished = time.monotonic()
        self._drain_timeout_s = drain_timeout_s
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._idle = asyncio.Event()
        self._idle.set()
        self._changed = asyncio.Event()
        self._engine_started = False
        self._pending_adapters: dict[int, AdapterSlot] = {}  # loaded before the engine's first start
        self._engine_lock = asyncio.Lock()  # start/sleep/wake/adapter changes never overlap in the engine
        self._transition = asyncio.Lock()  # one wake or sleep at a time
        self._wake_task: asyncio.Task[WakeOutcome] | None = None
        self._acquiring = False
        self._waiters = 0
        self._pinned_wakes = 0  # wakes nobody may withdraw (Wake RPC, wake at start)
        self._watch_task: asyncio.Task[None] | None = None
        self._sleep_estimate_s = _DEFAULT_SLEEP_ESTIMATE_S.get(yield_method, 2.0)
        self._state_listeners: list[Callable[[ServiceState], Awaitable[None]]] = []
        metrics.set_state(self.state)

    # ---------------------------------------------------------------------------------------------- state

    def on_state_change(self, listener: Callable[[ServiceState], Awaitable[None]]) -> None:
        self._state_listeners.append(listener)

    def set_state(self, state: ServiceState, message: str = "") -> None:
        if state != self.state:
            log_event(log, "inference.state", state=str(state), previous=str(self.state), why=message or "-")
        self.state, self.message, self.state_since_unix_s = state, message, time.time()
        self.metrics.set_state(state)
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self._state_listeners:
            asyncio.get_running_loop().create_task(listener(state))

    def loaded(self) -> None:
        """The tokenizer and registry are ready: requests may come (the engine starts on the first wake)."""
        self.set_state(ServiceState.SLEEPING, "not started yet; the first request or Wake starts the engine")

    def failed(self, message: str) -> None:
        self.set_state(ServiceState.FAILED, message)

    def check_accepting(self) -> None:
        if self.state == ServiceState.LOADING:
            raise Unavailable("the inference service is still loading; retry shortly", retry_after_s=5.0)
        if self.state == ServiceState.FAILED:
            raise Unavailable(f"the inference engine failed: {self.message}; see the service log", reason="FAILED")

    @property
    def idle_s(self) -> float:
        return 0.0 if self.running else time.monotonic() - self.last_finished

    # ---------------------------------------------------------------------------------------------- requests

    @contextlib.asynccontextmanager
    async def admitted(self, request_id: str, max_wait_s: float) -> AsyncIterator[_Running]:
        """Wait (bounded) for a queue place, the lease, the wake and a slot; then count the request as running."""
        started = time.monotonic()
        if self.queued >= self.queue_capacity:
            raise ResourceExhausted(
                f"{self.queued} requests already wait (queue_capacity={self.queue_capacity}); retry in a moment",
                reason="OVERLOADED",
                retry_after_s=1.0,
            )
        self.queued += 1
        self.metrics.queue_depth.set(self.queued)
        try:
            running = await self._wait_for_slot(request_id, started + max_wait_s)
        finally:
            self.queued -= 1
            self.metrics.queue_depth.set(self.queued)
        try:
            yield running
        finally:
            self._slots.release()
            del self.running[request_id]
            self.metrics.running.set(len(self.running))
            self.last_finished = time.monotonic()
            if not self.running:
                self._idle.set()

    async def _wait_for_slot(self, request_id: str, deadline: float) -> _Running:
        while True:
            await self.wait_awake(deadline)
            try:
                await asyncio.wait_for(self._slots.acquire(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise ResourceExhausted(
                    "every generation slot stayed busy for the whole wait; retry in a moment",
                    reason="OVERLOADED",
                    retry_after_s=1.0,
                ) from None
            # No await between this check and the registration: a sleep that starts now sees the request.
            if self.state == ServiceState.AWAKE and self.lease_is_valid():
                if request_id in self.running:
                    self._slots.release()
                    raise FailedPrecondition(f"request id {request_id!r} is already running", reason="DUPLICATE_ID")
                running = _Running(request_id)
                self.running[request_id] = running
                self._idle.clear()
                self.metrics.running.set(len(self.running))
                return running
            self._slots.release()

    def lease_is_valid(self) -> bool:
        return self.lease is None or self.lease.valid

    async def wait_awake(self, deadline: float) -> None:
        """Return once AWAKE, starting a wake if needed; raise the right error when that cannot happen in time."""
        self._waiters += 1
        try:
            while self.state != ServiceState.AWAKE or not self.lease_is_valid():
                self.check_accepting()
                if self.stay_asleep:
                    raise Unavailable(
                        "the service was put to sleep until an explicit Wake (stay_asleep)",
                        reason="STAY_ASLEEP",
                        retry_after_s=30.0,
                    )
                if self.state == ServiceState.SLEEPING:
                    self._start_wake()
                changed = self._changed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._wait_timeout_error()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)
        finally:
            self._waiters -= 1
            if self._waiters == 0 and self._pinned_wakes == 0:
                self._withdraw_wake()

    def _wait_timeout_error(self) -> BatonError:
        if self._acquiring:
            eta = self.queue_eta_s if self.queue_eta_s > 0 else 30.0
            return ResourceExhausted(
                f"the GPU is busy (lease queue position {self.queue_position}, ETA {self.queue_eta_s:.0f} s); the "
                "request waited its max_wait_s in vain — retry later or raise max_wait_s",
                reason="LEASE_WAIT_TIMEOUT",
                retry_after_s=eta,
                metadata={"queue_position": str(self.queue_position), "eta_s": f"{self.queue_eta_s:.1f}"},
            )
        return Unavailable(
            f"the model is not awake yet (state {self.state}: {self.message}); retry shortly",
            reason="WAKING",
            retry_after_s=max(1.0, self._sleep_estimate_s),
        )

    # ---------------------------------------------------------------------------------------------- wake

    def _start_wake(self) -> asyncio.Task[WakeOutcome]:
        if self._wake_task is None or self._wake_task.done():
            self._wake_task = asyncio.get_running_loop().create_task(self._wake(), name="inference-wake")
            self._wake_task.add_done_callback(_consume_exception)
        return self._wake_task

    def _withdraw_wake(self) -> None:
        if self._acquiring and self._wake_task is not None and not self._wake_task.done():
            self._wake_task.cancel()

    async def wake(self, *, max_wait_s: float, return_immediately: bool) -> WakeOutcome | None:
        """The Wake RPC: wake now (clears stay_asleep). None when returning at once while waking."""
        self.check_accepting()
        self.stay_asleep = False
        if self.state == ServiceState.AWAKE and self.lease_is_valid():
            return WakeOutcome(self.lease.epoch if self.lease else 0, 0.0, 0.0)
        self._pinned_wakes += 1
        task = self._start_wake()
        if return_immediately:
            task.add_done_callback(lambda _: self._unpin())
            return None
        try:
            await self.wait_awake(time.monotonic() + max_wait_s)
        finally:
            self._unpin()
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        return WakeOutcome(self.lease.epoch if self.lease else 0, 0.0, 0.0)

    def _unpin(self) -> None:
        self._pinned_wakes -= 1
        if self._waiters == 0 and self._pinned_wakes == 0:
            self._withdraw_wake()

    async def _wake(self) -> WakeOutcome:
        async with self._transition:
            if self.state == ServiceState.AWAKE:
                return WakeOutcome(self.lease.epoch if self.lease else 0, 0.0, 0.0)
            started = time.monotonic()
            self.set_state(ServiceState.WAKING, "waiting for the SERVING lease")
            lease = await self._acquire_lease()
            lease_wait_s = time.monotonic() - started
            self.set_state(ServiceState.WAKING, "waking the engine")
            engine_started = time.monotonic()
            try:
                # Not cancellable half-way: a half-started engine would hold memory the lease no longer covers.
                await asyncio.shield(self._wake_engine())
            except BaseException as error:
                await _release_quietly(lease)
                self.failed(f"the engine could not start or wake: {getattr(error, 'message', error)}")
                raise
            wake_s = time.monotonic() - engine_started
            self.lease = lease
            self.metrics.lease_held.set(1 if self.leases.uses_gpu_lease else 0)
            self.metrics.wake_seconds.labels("lease").observe(lease_wait_s)
            self.metrics.wake_seconds.labels("engine").observe(wake_s)
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(lease), name="inference-lease")
            self.set_state(ServiceState.AWAKE, f"lease epoch {lease.epoch}")
            log_event(log, "inference.awake", epoch=lease.epoch, lease_wait_s=lease_wait_s, wake_s=wake_s)
            return WakeOutcome(lease.epoch, lease_wait_s, wake_s)

    async def _acquire_lease(self) -> HeldLease:
        self._acquiring = True
        try:
            return await self.leases.acquire(self._on_queued)
        except asyncio.CancelledError:
            self.set_state(ServiceState.SLEEPING, "wake withdrawn: no request waits any more")
            raise
        except BatonError as error:
            self.set_state(ServiceState.SLEEPING, f"the lease was refused: {error.message}")
            raise
        finally:
            self._acquiring = False
            self.queue_position, self.queue_eta_s = 0, 0.0

    def _on_queued(self, position: int, eta_s: float) -> None:
        self.queue_position, self.queue_eta_s = position, eta_s
        self.message = f"waiting for the SERVING lease: queue position {position}, ETA {eta_s:.0f} s"

    async def _wake_engine(self) -> None:
        async with self._engine_lock:
            if self._engine_started:
                await self.engine.wake()
                return
            await self.engine.start()
            self._engine_started = True
            pending, self._pending_adapters = self._pending_adapters, {}
            for slot in pending.values():
                try:
                    await self.engine.add_adapter(slot)
                except BatonError as error:  # validated already; a refusal now is logged, the rest still serve
                    log_event(log, "inference.adapter_dropped", level=logging.ERROR, name=slot.name, why=error.message)

    async def add_adapter(self, slot: AdapterSlot) -> None:
        """Put an adapter into the engine, or keep it for the engine's first start (it starts on the first wake)."""
        async with self._engine_lock:
            if self._engine_started:
                await self.engine.add_adapter(slot)
            else:
                self._pending_adapters[slot.slot_id] = slot

    async def remove_adapter(self, slot: AdapterSlot) -> None:
        async with self._engine_lock:
            if self._engine_started:
                await self.engine.remove_adapter(slot)
            else:
                self._pending_adapters.pop(slot.slot_id, None)

    # ---------------------------------------------------------------------------------------------- sleep

    async def sleep(
        self, *, drain_timeout_s: float | None, stay_asleep: bool, level: int, lease_epoch: int | None, why: str
    ) -> SleepOutcome:
        """Yield the GPU: drain, abort the rest, sleep the engine, release the lease (the Sleep RPC and yields)."""
        if self.state in (ServiceState.LOADING, ServiceState.FAILED):
            raise FailedPrecondition(f"cannot sleep while {self.state}: {self.message}", reason="BAD_STATE")
        current_epoch = self.lease.epoch if self.lease is not None else 0
        if lease_epoch is not None and lease_epoch != current_epoch:
            raise FailedPrecondition(
                f"lease epoch {lease_epoch} is not the current one ({current_epoch})", reason="STALE_LEASE_EPOCH"
            )
        if stay_asleep:
            self.stay_asleep = True
            self._withdraw_wake()
        async with self._transition:
            if self.state == ServiceState.SLEEPING:
                return SleepOutcome(0, 0.0, 0.0, 0)
            return await self._yield_gpu(
                self._drain_timeout_s if drain_timeout_s is None else drain_timeout_s, level, why
            )

    async def _yield_gpu(self, drain_timeout_s: float, level: int, why: str) -> SleepOutcome:
        started = time.monotonic()
        self.set_state(ServiceState.YIELDING, why)
        aborted = 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
        drain_s = time.monotonic() - started
        if self.running:
            aborted = self.abort_all()
            await self._idle.wait()
        sleep_started = time.monotonic()
        async with self._engine_lock:
            if self._engine_started:
                await self.engine.sleep(level)
        epoch = await self._release_lease()
        sleep_s = time.monotonic() - sleep_started
        self._sleep_estimate_s = max(0.5, sleep_s)
        self.metrics.sleep_seconds.observe(time.monotonic() - started)
        self.set_state(ServiceState.SLEEPING, why)
        log_event(log, "inference.asleep", why=why, drain_s=drain_s, sleep_s=sleep_s, aborted=aborted, epoch=epoch)
        return SleepOutcome(epoch, drain_s, sleep_s, aborted)

    def abort_all(self) -> int:
        count = 0
        for running in self.running.values():
            if not running.aborted:
                running.aborted = True
                if running.task is not None:
                    running.task.cancel()
                count += 1
        return count

    async def _release_lease(self) -> int:
        lease, self.lease = self.lease, None
        if self._watch_task is not None and self._watch_task is not asyncio.current_task():
            self._watch_task.cancel()
        self._watch_task = None
        self.metrics.lease_held.set(0)
        if lease is None:
            return 0
        await _release_quietly(lease)
        return lease.epoch

    async def _watch(self, lease: HeldLease) -> None:
        """Yield when the scheduler asks; stop at once when the lease is lost."""
        yield_asked = asyncio.ensure_future(lease.yield_requested.wait())
        lost = asyncio.ensure_future(lease.lost.wait())
        try:
            await asyncio.wait({yield_asked, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            yield_asked.cancel()
            lost.cancel()
        if lease.lost.is_set():
            await self._on_lease_lost(lease)
            return
        margin_s = self._sleep_estimate_s * 1.5 + 0.5
        drain_s = min(self._drain_timeout_s, max(0.0, lease.yield_deadline_unix_s - time.time() - margin_s))
        log_event(log, "inference.yield_requested", epoch=lease.epoch, drain_s=drain_s)
        with contextlib.suppress(BatonError):
            await self.sleep(drain_timeout_s=drain_s, stay_asleep=False, level=1, lease_epoch=None, why="yield")

    async def _on_lease_lost(self, lease: HeldLease) -> None:
        log_event(log, "inference.lease_lost", level=logging.WARNING, epoch=lease.epoch)
        async with self._transition:
            if self.lease is not lease:
                return
            self.abort_all()
            with contextlib.suppress(BatonError):
                await self._yield_gpu(0.0, 1, "lease lost")

    async def close(self) -> None:
        for task in (self._wake_task, self._watch_task):
            if task is not None and not task.done():
                task.cancel()
        self.abort_all()
        await self._release_lease()
        async with self._engine_lock:
            await self.engine.shutdown()
        await self.leases.close()


async def _release_quietly(lease: HeldLease) -> None:
    try:
        await lease.release()
    except BatonError as error:  # the scheduler frees it after its TTL anyway
        log_event(log, "inference.lease_release_failed", level=logging.WARNING, error=error.message)


def _consume_exception(task: asyncio.Task[WakeOutcome]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log_event(log, "inference.wake_failed", level=logging.WARNING, error=str(task.exception()))


class NoLease:
    """A LeaseProvider for machines where serving does not share the GPU through the scheduler."""

    uses_gpu_lease = False

    async def acquire(self, on_queued: QueuedCallback) -> HeldLease:
        return _FreeLease()

    async def close(self) -> None:
        return None


class _FreeLease:
    def __init__(self) -> None:
        self.yield_requested = asyncio.Event()
        self.lost = asyncio.Event()
        self.yield_deadline_unix_s = 0.0

    @property
    def epoch(self) -> int:
        return 0

    @property
    def lease_id(self) -> str:
        return ""

    @property
    def valid(self) -> bool:
        return True

    async def release(self) -> None:
        return None
