"""The lease history behind the GPU timeline: every grant and its end, kept across a restart, windowed, pruned."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton.runtime.errors import InvalidArgument
from services.scheduler.model import LeaseKind
from services.scheduler.store import HISTORY_KEPT_S
from tests.unit.test_scheduler_core import POLICY, FakeClock, granted_ref, make_scheduler, spec


def test_history_records_grants_and_how_each_lease_ended(tmp_path: Path) -> None:
    clock = FakeClock()
    sched = make_scheduler(tmp_path, clock)
    served = granted_ref(sched.acquire(spec("inference-0", kind=LeaseKind.SERVING, exclusive=True)))
    clock.advance(30)
    sched.release(served)
    trained = granted_ref(sched.acquire(spec("trainer/job-1/1", exclusive=True)))
    clock.advance(POLICY.ttl_s + 1)
    sched.tick()  # the trainer stopped heartbeating: revoked
    now, intervals = sched.history(0)
    assert now == clock.wall()
    assert [(i.holder_id, i.kind, i.end_reason) for i in intervals] == [
        ("inference-0", LeaseKind.SERVING, "released"),
        ("trainer/job-1/1", LeaseKind.TRAINING, "revoked"),
    ]
    first, second = intervals
    assert first.ended_at_unix is not None and first.ended_at_unix - first.granted_at_unix == 30
    assert (first.epoch, second.epoch) == (served.epoch, trained.epoch)


def test_history_survives_a_restart_and_keeps_a_held_lease_open(tmp_path: Path) -> None:
    clock = FakeClock()
    ref = granted_ref(make_scheduler(tmp_path, clock).acquire(spec("a", exclusive=True)))
    clock.advance(5)
    restarted = make_scheduler(tmp_path, clock)
    (held,) = restarted.history(60)[1]
    assert (held.epoch, held.ended_at_unix, held.end_reason) == (ref.epoch, None, "")
    assert granted_ref(restarted.acquire(spec("a", exclusive=True), reclaim=ref)) == ref
    restarted.release(ref)
    assert restarted.history(60)[1][0].end_reason == "released"


def test_window_leaves_out_older_leases_and_is_validated(tmp_path: Path) -> None:
    clock = FakeClock()
    sched = make_scheduler(tmp_path, clock)
    sched.release(granted_ref(sched.acquire(spec("old", exclusive=True))))
    clock.advance(600)
    sched.release(granted_ref(sched.acquire(spec("new", exclusive=True))))
    assert [i.holder_id for i in sched.history(300)[1]] == ["new"]
    assert [i.holder_id for i in sched.history(900)[1]] == ["old", "new"]
    for bad in (-1.0, HISTORY_KEPT_S + 1):
        with pytest.raises(InvalidArgument):
            sched.history(bad)


def test_history_older_than_a_day_is_pruned(tmp_path: Path) -> None:
    clock = FakeClock()
    sched = make_scheduler(tmp_path, clock)
    sched.release(granted_ref(sched.acquire(spec("old", exclusive=True))))
    clock.advance(HISTORY_KEPT_S + 10)
    sched.release(granted_ref(sched.acquire(spec("new", exclusive=True))))
    rows = sched._store._db.execute("SELECT holder_id FROM lease_history").fetchall()
    assert rows == [("new",)]
