"""Property-based: random interleavings of every scheduler operation never break the lease invariants.

Invariants checked after every step:
- never two holders when one is exclusive, and the holders' VRAM never exceeds the capacity;
- epochs of grants strictly increase, also across a crash-and-restart of the scheduler;
- a non-preemptible holder is never asked to yield;
- what is persisted is exactly what is held (so a restart restores the truth).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from baton.runtime.errors import AlreadyExists, FailedPrecondition, ResourceExhausted
from services.scheduler.capacity import GIB
from services.scheduler.core import LeaseScheduler, Subscription
from services.scheduler.model import EventType, LeaseEvent, LeaseKind, LeaseRef, LeaseSpec
from tests.unit.test_scheduler_core import FakeClock, make_scheduler

HOLDERS = [f"h{i}" for i in range(6)]


class LeaseMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lease-prop-"))
        self.clock = FakeClock()
        self.sched: LeaseScheduler = make_scheduler(self.dir, self.clock)
        self.subs: dict[str, Subscription] = {}
        self.refs: dict[str, LeaseRef] = {}
        self.preemptible: dict[str, bool] = {}
        self.last_epoch = 0

    def _pump(self) -> None:
        # One pass may grant several waiters; their queues are read holder by holder, so the grants of a pass are
        # checked together: all newer than every earlier grant, and no epoch twice.
        granted: list[int] = []
        for holder, sub in list(self.subs.items()):
            while not sub._queue.empty():
                item = sub._queue.get_nowait()
                if not isinstance(item, LeaseEvent):
                    continue
                if item.type is EventType.GRANTED and item.lease != self.refs.get(holder):
                    granted.append(item.lease.epoch)
                    self.refs[holder] = item.lease
                elif item.type is EventType.YIELD_REQUESTED:
                    assert self.preemptible[holder], f"non-preemptible {holder} was asked to yield"
                elif item.type in (EventType.REVOKED, EventType.RELEASED):
                    self.refs.pop(holder, None)
        if granted:
            assert min(granted) > self.last_epoch, "epochs must strictly increase"
            assert len(set(granted)) == len(granted), "an epoch was granted twice"
            self.last_epoch = max(granted)

    @rule(
        holder=st.sampled_from(HOLDERS),
        gib=st.integers(1, 80),
        priority=st.integers(0, 3),
        exclusive=st.booleans(),
        preemptible=st.booleans(),
        no_queue=st.booleans(),
    )
    def acquire(self, holder: str, gib: int, priority: int, exclusive: bool, preemptible: bool, no_queue: bool) -> None:
        spec = LeaseSpec(holder, LeaseKind.TRAINING, priority, gib * GIB, exclusive, preemptible)
        try:
            sub = self.sched.acquire(spec, wait_timeout_s=-1 if no_queue else 0)
        except (AlreadyExists, ResourceExhausted):
            return
        self.subs[holder] = sub
        self.preemptible[holder] = preemptible
        self._pump()

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        holder = data.draw(st.sampled_from(sorted(self.refs)))
        with contextlib.suppress(FailedPrecondition):
            self.sched.release(self.refs[holder])
        self._pump()

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        holder = data.draw(st.sampled_from(sorted(self.refs)))
        try:
            self.sched.heartbeat(self.refs[holder])
        except FailedPrecondition:
            self.refs.pop(holder)

    @rule(holder=st.sampled_from(HOLDERS))
    def stream_breaks(self, holder: str) -> None:
        if holder in self.subs:
            self.sched.detach(self.subs.pop(holder))
            self._pump()

    @rule(seconds=st.floats(0, 12))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.sched.tick()
        self._pump()

    @rule()
    def scheduler_crashes_and_restarts(self) -> None:
        self.sched = make_scheduler(self.dir, self.clock)
        self.subs.clear()

    @invariant()
    def holders_fit(self) -> None:
        state = self.sched.state()
        assert state.used_bytes <= state.capacity_bytes
        if any(h.spec.exclusive for h in state.holders):
            assert len(state.holders) == 1

    @invariant()
    def persisted_is_held(self) -> None:
        stored = {(s.spec.holder_id, s.ref) for s in self.sched._store.held_leases()}
        held = {(h.spec.holder_id, h.ref) for h in self.sched.state().holders}
        assert stored == held

    @invariant()
    def epoch_never_goes_back(self) -> None:
        assert self.sched.state().epoch >= self.last_epoch


TestLeaseProperties = LeaseMachine.TestCase
TestLeaseProperties.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
