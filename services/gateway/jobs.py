"""Folder ingests run as background jobs: POST returns at once with a job id, GET shows progress.

A folder can hold a million pages; no HTTP request should wait for that. Progress is written to the catalog
(throttled), so it survives the request and `baton ingest` can draw a progress bar from it. A gateway killed
mid-ingest marks the job interrupted at its next start; running the same ingest again resumes it (unchanged
documents are skipped by hash).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from baton.runtime.errors import AlreadyExists, BatonError
from baton.runtime.logging import log_event
from services.gateway.catalog import Catalog
from services.gateway.ingest.pipeline import IngestPipeline, IngestReport

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 0.5
_FAILED_SHOWN = 100


class IngestJobs:
    def __init__(self, catalog: Catalog, pipeline: IngestPipeline) -> None:
        self._catalog = catalog
        self._pipeline = pipeline
        self._running: dict[tuple[str, str], str] = {}
        self._finished: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        interrupted = catalog.interrupt_running_jobs()
        if interrupted:
            log_event(log, "ingest.jobs_interrupted", level=logging.WARNING, jobs=interrupted)

    def start(self, tenant: str, collection: str, root: Path) -> str:
        key = (tenant, str(root))
        if key in self._running:
            raise AlreadyExists(
                f"{root} is already being ingested (job {self._running[key]}); follow it with GET /v1/ingest/jobs/"
                f"{self._running[key]}",
                reason="INGEST_RUNNING",
                metadata={"job_id": self._running[key]},
            )
        job_id = uuid.uuid4().hex[:16]
        self._catalog.create_job(job_id, tenant, str(root), collection)
        self._running[key] = job_id
        self._finished[job_id] = asyncio.Event()
        task = asyncio.create_task(self._run(job_id, tenant, collection, root), name=f"ingest-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job_id

    def get(self, tenant: str, job_id: str) -> dict[str, object]:
        return self._catalog.get_job(tenant, job_id)

    async def wait(self, tenant: str, job_id: str) -> dict[str, object]:
        self.get(tenant, job_id)  # NotFound for another tenant's job
        finished = self._finished.get(job_id)
        if finished is not None:
            await finished.wait()
        return self.get(tenant, job_id)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job_id: str, tenant: str, collection: str, root: Path) -> None:
        last_write = 0.0

        def progress(report: IngestReport) -> None:
            nonlocal last_write
            if time.monotonic() - last_write >= _PROGRESS_EVERY_S:
                last_write = time.monotonic()
                self._catalog.update_job(job_id, state="running", report=job_report(report))

        try:
            report = await self._pipeline.ingest_folder(tenant, collection, root, progress)
            self._catalog.update_job(job_id, state="succeeded", report=job_report(report))
        except BatonError as error:
            self._catalog.update_job(job_id, state="failed", report={}, error=error.message)
        except Exception as error:  # the job fails; the gateway lives on
            log.exception("ingest job %s failed", job_id)
            self._catalog.update_job(job_id, state="failed", report={}, error=repr(error))
        finally:
            self._running.pop((tenant, str(root)), None)
            self._finished.pop(job_id).set()


def job_report(report: IngestReport) -> dict[str, object]:
    """Counts and the failures (capped): a job over a million files must not store a million outcomes."""
    body = report.to_json()
    failed = [o.to_json() for o in report.outcomes if o.status == "failed"]
    body["documents"] = failed[:_FAILED_SHOWN]
    return body
