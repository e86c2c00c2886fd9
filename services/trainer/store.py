"""Jobs and their events in SQLite (WAL): the source of truth that lets a restarted trainer take every job up again.

A job is one JSON document (``services.trainer.model.Job``) plus the columns the queries need; its events are rows
keyed by (job, seq). A change of a job and the events it produced are written in one transaction, so the event log
and the job never disagree (the newest event's seq is stored in the job).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from baton.runtime.sqlite import Durability, open_database, transaction
from services.trainer.model import ACTIVE_STATES, Job, JobEvent, JobState, from_json, to_json

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id          TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    state           TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    created_unix_s  REAL NOT NULL,
    body            TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request ON jobs (tenant, request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, job_id);
CREATE TABLE IF NOT EXISTS events (
    job_id       TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    body         TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""


class JobStore:
    def __init__(self, path: Path, *, durability: Durability = "NORMAL") -> None:
        # One writer (the service's event loop); transactions are explicit BEGIN IMMEDIATE blocks.
        self._db = open_database(path, _SCHEMA, SCHEMA_VERSION, durability=durability)

    # ---------------------------------------------------------------------------------------------- writes

    def save(self, job: Job, events: Iterable[JobEvent] = ()) -> None:
        """Insert or update ``job`` and append ``events`` atomically."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO jobs (job_id, tenant, state, request_id, created_unix_s, body) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (job_id) DO UPDATE SET state = excluded.state, body = excluded.body",
                (job.job_id, job.spec.tenant, job.state.value, job.request_id, job.created_unix_s, _job_body(job)),
            )
            self._db.executemany(
                "INSERT INTO events (job_id, seq, body) VALUES (?, ?, ?)",
                [(event.job_id, event.seq, json.dumps(to_json(event))) for event in events],
            )

    # ---------------------------------------------------------------------------------------------- reads

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT body FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row[0]) if row else None

    def by_request(self, tenant: str, request_id: str) -> Job | None:
        row = self._db.execute(
            "SELECT body FROM jobs WHERE tenant = ? AND request_id = ?", (tenant, request_id)
        ).fetchone()
        return _job(row[0]) if row else None

    def unfinished(self) -> list[Job]:
        """Jobs not yet in a terminal state, oldest first (the order they run in)."""
        states = [JobState.QUEUED.value, *(state.value for state in ACTIVE_STATES)]
        rows = self._db.execute(
            f"SELECT body FROM jobs WHERE state IN ({','.join('?' * len(states))}) ORDER BY job_id", states
        ).fetchall()
        return [_job(row[0]) for row in rows]

    def page(self, tenant: str, states: list[JobState], *, before: str, limit: int) -> tuple[list[Job], int]:
        """Jobs newest first with ids below ``before`` (empty: from the newest), and the total matching count."""
        where, params = _filter(tenant, states)
        total = int(self._db.execute(f"SELECT COUNT(*) FROM jobs{where}", params).fetchone()[0])
        if before:
            where += (" AND" if where else " WHERE") + " job_id < ?"
            params = [*params, before]
        rows = self._db.execute(
            f"SELECT body FROM jobs{where} ORDER BY job_id DESC LIMIT ?", [*params, limit]
        ).fetchall()
        return [_job(row[0]) for row in rows], total

    def events_after(self, job_id: str, seq: int) -> Iterator[JobEvent]:
        rows = self._db.execute(
            "SELECT body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq)
        ).fetchall()
        for (body,) in rows:
            yield from_json(JobEvent, json.loads(body))

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)


def _filter(tenant: str, states: list[JobState]) -> tuple[str, list[str]]:
    clauses, params = [], []
    if tenant:
        clauses.append("tenant = ?")
        params.append(tenant)
    if states:
        clauses.append(f"state IN ({','.join('?' * len(states))})")
        params += [state.value for state in states]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _job_body(job: Job) -> str:
    body = to_json(job)
    for transient in ("queue_position", "queue_eta_s"):
        body.pop(transient, None)
    return json.dumps(body)


def _job(body: str) -> Job:
    return from_json(Job, json.loads(body))
