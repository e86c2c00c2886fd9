"""The trainer's core: jobs, their queue, and the one job that is being worked on. No gRPC here.

    QUEUED ─► PREPARING ─► WAITING_FOR_GPU ─► RUNNING ─► FINALIZING ─► SUCCEEDED
    (dataset built by        (TRAINING        │   ▲          (copied into the registry,
     services.trainer.prepare, lease)         │   │           hot-load requested)
     in a child process)                      ▼   │
                                    YIELDING ─► PAUSED   (checkpoint, lease released, queued for it again)
    any state before the end ─► FAILED | CANCELLED

One job is worked on at a time, in submission order (jobs recovered after a restart first). Training runs in a child
process (``worker_module``, the FIXED contract in services/trainer/runner.py); the core tails its events into the
job's progress, its persisted event log and the WatchJob streams (services.trainer.reports reads each record), and
turns its exit into the next state:

- the scheduler asks for the GPU back → SIGUSR1, YIELDING; the child checkpoints and exits 75 → lease released,
  PAUSED, queued for the lease again; granted → RUNNING, and the child resumes from its checkpoint;
- the lease is lost (revoked, or unconfirmed for a TTL) → SIGKILL at once (fencing: no GPU work without the lease),
  then PAUSED and resumed from the last checkpoint when granted again;
- the child crashes (no error of its own) → restarted from its last checkpoint up to ``max_crash_restarts`` times,
  then FAILED (TRAINER_CRASHED) with the tail of its log; an error it reports (exit 1) → FAILED with its reason;
- CancelJob → SIGKILL, checkpoints and output deleted, nothing registered, CANCELLED;
- the service stops (SIGTERM) → the child gets SIGTERM, checkpoints and exits 75, the lease is released, the job is
  PAUSED; ``kill -9`` of the service kills the child too (PR_SET_PDEATHSIG) and loses nothing either: on start every
  unfinished job is taken up again from the checkpoints in its folder.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from baton.runtime.errors import (
    AlreadyExists,
    BatonError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from baton.runtime.logging import log_event
from services.trainer import reports, runner
from services.trainer.lease import HeldLease, LeaseProvider, TrainingLeaseRequest
from services.trainer.metrics import TrainerMetrics
from services.trainer.model import (
    EventType,
    Job,
    JobError,
    JobEvent,
    JobSpec,
    JobState,
)
from services.trainer.registry import REQUIRED_FILES, AdapterRegistry, RegisteredVersion
from services.trainer.store import JobStore
from services.trainer.validation import ValidationContext, resolve_spec

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_S = 0.2  # how often a running child's events are read and its lease checked
_SCHEDULER_RETRY_S = 2.0
_CANCEL_WAIT_S = 10.0  # CancelJob waits this long for the job to reach CANCELLED before answering
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class CoreConfig:
    jobs_dir: Path
    texts_dir: Path
    worker_module: str
    device: str
    max_queued_jobs: int
    max_crash_restarts: int
    child_stop_timeout_s: float
    validation: ValidationContext
    prepare_module: str = "services.trainer.prepare"  # PREPARING's process (unit tests substitute a light one)


class HotLoader(Protocol):
    async def load(self, name: str, relative_path: str) -> None:
        """Ask the inference service to load (replace) adapter ``name`` from ``relative_path`` in the registry."""


class _Outcome(enum.Enum):
    DONE = "done"
    YIELDED = "yielded"
    LOST = "lost"
    CRASHED = "crashed"


class _Cancel(Exception):
    """CancelJob was called for the job being worked on."""


class _Stop(Exception):
    """The service is stopping: leave the job where it is (it resumes at the next start)."""


class _Fail(Exception):
    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Active:
    """The job being worked on, and how to interrupt it."""

    job: Job
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Run:
    """One run of the training process: what it reported and what it was told."""

    child: runner.ChildProcess
    tail: runner.EventTail
    started: float
    train_s_base: float
    signalled: str = ""  # "" | "yield" | "shutdown" | "kill:cancel" | "kill:lost" | "kill:shutdown"
    signalled_at: float = 0.0
    error: JobError | None = None


class TrainerCore:
    def __init__(
        self,
        store: JobStore,
        registry: AdapterRegistry,
        leases: LeaseProvider,
        config: CoreConfig,
        metrics: TrainerMetrics,
        hot_loader: HotLoader | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._leases = leases
        self._config = config
        self._metrics = metrics
        self._hot_loader = hot_loader
        self._jobs: dict[str, Job] = {}  # every unfinished job (the live objects)
        self._queue: list[str] = []  # unfinished jobs not being worked on, in the order they will run
        self._active: _Active | None = None
        self._watchers: dict[str, set[asyncio.Queue[JobEvent | None]]] = {}
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._submit_lock = asyncio.Lock()
        self._finished_counts: dict[JobState, int] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._ready = False

    # ================================================================================================ lifecycle

    async def start(self) -> int:
        """Take up every unfinished job (recovery after a restart) and start working; returns how many."""
        recovered = self._store.unfinished()
        resumed = [job for job in recovered if job.state != JobState.QUEUED]
        for job in resumed + [job for job in recovered if job.state == JobState.QUEUED]:
            self._jobs[job.job_id] = job
            self._queue.append(job.job_id)
        for job in resumed:
            await asyncio.to_thread(runner.kill_stale_child, job.worker_pid, self._job_dir(job))
            self._recover(job)
        self._count_states()
        self._ready = True
        self._loop_task = asyncio.get_running_loop().create_task(self._work_forever(), name="trainer-jobs")
        return len(recovered)

    def _recover(self, job: Job) -> None:
        job.worker_pid, job.lease_epoch = 0, 0
        at = f"step {job.last_checkpoint.step}" if job.last_checkpoint else "the start"
        if job.state in (JobState.RUNNING, JobState.YIELDING, JobState.WAITING_FOR_GPU):
            self._set_state(job, JobState.WAITING_FOR_GPU, f"the trainer restarted; the job resumes from {at}")
        else:
            self._commit(job, [self._event(job, EventType.LOG, f"the trainer restarted; the job resumes from {at}")])

    async def close(self) -> None:
        """Stop: the child checkpoints (SIGTERM) and exits, the lease is released; the job stays resumable."""
        self._ready = False
        self._stopping.set()
        self._wakeup.set()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(self._loop_task, self._config.child_stop_timeout_s + 30)
            except TimeoutError:
                log_event(log, "trainer.stop_timeout", level=logging.WARNING)
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)
        await self._leases.close()

    def _check_ready(self) -> None:
        if self._stopping.is_set():
            raise Unavailable("the trainer is shutting down; retry against the restarted service", retry_after_s=5.0)
        if not self._ready:
            raise Unavailable("the trainer is starting (recovering jobs); retry shortly", retry_after_s=1.0)

    # ================================================================================================ the API

    async def submit(self, request: JobSpec, *, request_id: str = "", validate_only: bool = False) -> Job:
        self._check_ready()
        if request_id and not validate_only:
            existing = self._store.by_request(request.tenant, request_id)
            if existing is not None:
                return self._view(existing)
        if not validate_only:
            self._check_queue_room()
        resolved = await asyncio.to_thread(resolve_spec, request, self._config.validation)
        owner = await asyncio.to_thread(self._registry.owner, resolved.spec.name)
        if owner is not None and owner != resolved.spec.tenant:
            # Adapter names are served in one namespace: a name is its first tenant's. The message does not say whose.
            raise AlreadyExists(
                f"the adapter name {resolved.spec.name!r} is taken; choose another name", reason="ADAPTER_NAME_TAKEN"
            )
        now = time.time()
        job = Job(
            job_id="" if validate_only else _new_job_id(),
            spec=resolved.spec,
            created_unix_s=now,
            updated_unix_s=now,
            estimate=resolved.estimate,
            request_id=request_id,
            requested_target_modules=list(request.lora.target_modules),
        )
        if validate_only:
            await self._validate_dataset(job)
            return job
        async with self._submit_lock:
            existing = self._store.by_request(request.tenant, request_id) if request_id else None
            if existing is not None:  # a concurrent retry got here first
                return self._view(existing)
            self._check_queue_room()
            self._jobs[job.job_id] = job
            self._queue.append(job.job_id)
            self._commit(job, [self._event(job, EventType.STATE_CHANGED, f"queued ({request.name})")])
        log_event(log, "trainer.submitted", job=job.job_id, name=job.spec.name, tenant=job.spec.tenant,
                  vram_gib=round(job.estimate.vram_bytes / (1 << 30), 2))  # fmt: skip
        self._count_states()
        self._wakeup.set()
        return self._view(job)

    def get(self, job_id: str, tenant: str = "") -> Job:
        self._check_ready()
        return self._view(self._visible(job_id, tenant))

    def list(self, tenant: str, states: list[JobState], page_size: int, page_token: str) -> tuple[list[Job], str, int]:
        self._check_ready()
        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be 0..{MAX_PAGE_SIZE}", reason="OUT_OF_RANGE")
        fingerprint = hashlib.sha256(json.dumps([tenant, sorted(s.value for s in states)]).encode()).hexdigest()[:16]
        before = _decode_page_token(page_token, fingerprint)
        jobs, total = self._store.page(tenant, states, before=before, limit=size + 1)
        token = _encode_page_token(jobs[size - 1].job_id, fingerprint) if len(jobs) > size else ""
        return [self._view(self._jobs.get(job.job_id, job)) for job in jobs[:size]], token, total

    async def watch(self, job_id: str, tenant: str = "", after_seq: int = 0) -> AsyncIterator[JobEvent]:
        self._check_ready()
        job = self._visible(job_id, tenant)
        queue: asyncio.Queue[JobEvent | None] = asyncio.Queue()
        self._watchers.setdefault(job_id, set()).add(queue)  # before reading: no event can slip in between
        try:
            last = after_seq
            if after_seq == 0:
                view = self._view(job)
                last = job.last_seq
                yield JobEvent(0, job_id, EventType.SNAPSHOT, time.time(), view.state, view.progress, job=view,
                               message=f"{view.state.value}")  # fmt: skip
                if job.terminal:
                    return
            else:
                for event in self._store.events_after(job_id, after_seq):
                    last = event.seq
                    yield event
                    if _ends_stream(event):
                        return
                if job.terminal and last >= job.last_seq:
                    return
            while True:
                event = await queue.get()
                if event is None:
                    raise Unavailable(
                        "the trainer is shutting down; watch again with after_seq set to the last seq you saw",
                        retry_after_s=5.0,
                    )
                if event.seq <= last:
                    continue
                last = event.seq
                yield event
                if _ends_stream(event):
                    return
        finally:
            self._watchers[job_id].discard(queue)
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    async def cancel(self, job_id: str, tenant: str = "") -> Job:
        self._check_ready()
        job = self._visible(job_id, tenant)
        if job.state == JobState.CANCELLED:
            return self._view(job)
        if job.terminal:
            raise FailedPrecondition(
                f"job {job_id} already {job.state.value}; only unfinished jobs can be cancelled",
                reason="JOB_FINISHED",
            )
        job.cancel_requested = True
        active = self._active
        if active is not None and active.job is job:
            self._commit(job, [self._event(job, EventType.LOG, "cancel requested")])
            active.cancel.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(active.done.wait(), _CANCEL_WAIT_S)
        else:
            self._queue.remove(job_id)
            await self._finish_cancelled(job)
        return self._view(job)

    # ================================================================================================ views

    def _visible(self, job_id: str, tenant: str) -> Job:
        job = self._jobs.get(job_id) or (self._store.get(job_id) if job_id else None)
        if job is None or (tenant and job.spec.tenant != tenant):
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND")  # the same words for another tenant's job
        return job

    def _view(self, job: Job) -> Job:
        """A copy to hand out, with the queue position filled in."""
        view = dataclasses.replace(job, progress=dataclasses.replace(job.progress))
        if job.state == JobState.QUEUED and job.job_id in self._queue:
            view.queue_position, view.queue_eta_s = self._queue.index(job.job_id) + 1, -1.0
        elif job.state not in (JobState.WAITING_FOR_GPU, JobState.PAUSED):
            view.queue_position, view.queue_eta_s = 0, 0.0
        return view

    def _check_queue_room(self) -> None:
        if len(self._jobs) >= self._config.max_queued_jobs:
            eta = self._active.job.progress.eta_s if self._active is not None else None
            raise ResourceExhausted(
                f"{len(self._jobs)} jobs are unfinished (max_queued_jobs={self._config.max_queued_jobs}); submit "
                "again when one finishes, or cancel one",
                reason="QUEUE_FULL",
                retry_after_s=eta if eta and eta > 0 else 60.0,
            )

    # ================================================================================================ events

    def _event(self, job: Job, type_: EventType, message: str = "", **extra: Any) -> JobEvent:
        job.last_seq += 1
        now = time.time()
        job.updated_unix_s = now
        progress = dataclasses.replace(job.progress)
        return JobEvent(job.last_seq, job.job_id, type_, now, job.state, progress, message=message, **extra)

    def _commit(self, job: Job, events: list[JobEvent]) -> None:
        """Persist the job with its new events, then hand them to its watchers."""
        if not job.job_id:
            return
        self._store.save(job, events)
        for queue in self._watchers.get(job.job_id, ()):
            for event in events:
                queue.put_nowait(event)

    def _set_state(self, job: Job, state: JobState, message: str = "", **extra: Any) -> None:
        previous, job.state = job.state, state
        if state.terminal:
            job.finished_unix_s = time.time()
            job.queue_position, job.queue_eta_s = 0, 0.0
        self._commit(job, [self._event(job, EventType.STATE_CHANGED, message, **extra)])
        log_event(log, "trainer.state", job=job.job_id, state=state.value, previous=previous.value, why=message or "-")
        if state.terminal:
            self._jobs.pop(job.job_id, None)
            self._finished_counts[state] = self._finished_counts.get(state, 0) + 1
            self._metrics.finished.labels(state.value).inc()
        self._count_states()

    def _count_states(self) -> None:
        counts = dict(self._finished_counts)
        for job in self._jobs.values():
            counts[job.state] = counts.get(job.state, 0) + 1
        self._metrics.count_states(counts)

    # ================================================================================================ the worker

    async def _work_forever(self) -> None:
        while True:
            self._wakeup.clear()
            if self._stopping.is_set():
                return
            if not self._queue:
                await self._wakeup.wait()
                continue
            job = self._jobs[self._queue.pop(0)]
            self._active = _Active(job)
            try:
                await self._drive(self._active)
            finally:
                self._active.done.set()
                self._active = None
                self._metrics.clear_progress()

    async def _drive(self, active: _Active) -> None:
        job = active.job
        try:
            if job.cancel_requested:
                raise _Cancel
            if job.state in (JobState.QUEUED, JobState.PREPARING):
                await self._prepare(active)
            if job.state != JobState.FINALIZING and not self._output_complete(job):
                await self._train(active)
            await self._finalize(active)
        except _Cancel:
            await self._finish_cancelled(job)
        except _Stop:
            if job.state in (JobState.RUNNING, JobState.YIELDING):
                self._set_state(job, JobState.PAUSED, "the trainer stopped; the job resumes when it starts again")
        except _Fail as failure:
            await self._fail(job, failure.error)
        except Exception as error:  # a bug here must fail one job, not stop the queue
            log.exception("job %s failed inside the trainer", job.job_id)
            await self._fail(job, JobError("TRAINER_INTERNAL", f"internal error in the trainer service: {error!r}"))

    async def _race(
        self, active: _Active, awaitable: Awaitable[T], discard: Callable[[T], Awaitable[None]] | None = None
    ) -> T:
        """Await ``awaitable`` unless the job is cancelled (``_Cancel``) or the service stops (``_Stop``) first.

        ``discard`` disposes of a result that arrives while the interruption is being handled (a lease granted
        just then must still be released)."""
        task = asyncio.ensure_future(awaitable)
        interrupts = [asyncio.ensure_future(active.cancel.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait([task, *interrupts], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for interrupt in interrupts:
                interrupt.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            late = await task
            if discard is not None:
                await discard(late)
        raise _Cancel if active.cancel.is_set() else _Stop

    # ---------------------------------------------------------------------------------------------- PREPARING

    async def _prepare(self, active: _Active) -> None:
        job = active.job
        self._set_state(job, JobState.PREPARING, "building the dataset")
        job_dir = self._job_dir(job)
        spec_path = job_dir / runner.SPEC_FILE
        if not spec_path.is_file():  # written once: checkpoints are only valid for the spec they were made with
            runner.write_json_atomically(spec_path, self._worker_spec(job))
        started = time.monotonic()
        result = await self._race(active, self._run_prepare(spec_path, job_dir / "dataset.json", job_dir))
        self._metrics.prepare_seconds.observe(time.monotonic() - started)
        self._apply_prepared(job, result)
        self._set_state(job, JobState.WAITING_FOR_GPU, "dataset ready; waiting for the GPU")

    async def _run_prepare(self, spec_path: Path, result_path: Path, job_dir: Path) -> dict[str, Any]:
        await asyncio.to_thread(result_path.unlink, missing_ok=True)
        args = [str(spec_path), str(result_path)]
        child = runner.ChildProcess(self._config.prepare_module, args, job_dir / runner.LOG_FILE)
        await child.start()
        try:
            code = await child.wait()
        finally:
            child.kill()  # cancelled (job cancelled, service stopping): no orphan tokenizing on
        result = await asyncio.to_thread(runner.read_json, result_path)
        if code != 0 or result is None:
            raise _Fail(JobError(
                "PREPARE_CRASHED",
                f"building the dataset crashed (exit {code}); the end of its log:\n"
                f"{runner.log_tail(job_dir / runner.LOG_FILE)}",
                {"exit_code": str(code)},
            ))  # fmt: skip
        return result

    def _apply_prepared(self, job: Job, result: dict[str, Any]) -> None:
        if "error" in result:
            error = result["error"]
            metadata = {str(k): str(v) for k, v in (error.get("metadata") or {}).items()}
            raise _Fail(JobError(str(error.get("reason") or "DATASET_INVALID"), str(error.get("message")), metadata))
        job.dataset = reports.dataset_stats(result["stats"])
        job.progress.total_steps = int(result["stats"].get("total_steps") or 0)
        stats = job.dataset
        notes = "".join(f"; {note}" for note in result.get("notes", []))
        message = (
            f"dataset: {stats.documents} documents ({stats.train_documents} train, {stats.eval_documents} eval), "
            f"{stats.train_tokens} training tokens in {stats.train_blocks} blocks, {job.progress.total_steps} steps; "
            f"data hash {stats.data_hash[:12]}{notes}"
        )
        self._commit(job, [self._event(job, EventType.LOG, message)])

    async def _validate_dataset(self, job: Job) -> None:
        """validate_only: build the dataset statistics now (a scratch folder, deleted after)."""
        scratch = self._config.jobs_dir / f".validate-{uuid.uuid4().hex}"
        scratch.mkdir(parents=True)
        try:
            runner.write_json_atomically(scratch / runner.SPEC_FILE, self._worker_spec(job))
            result = await self._run_prepare(scratch / runner.SPEC_FILE, scratch / "dataset.json", scratch)
        except _Fail as failure:
            raise InvalidArgument(failure.error.message, reason=failure.error.reason) from None
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        if "error" in result:
            error = result["error"]
            metadata = {str(k): str(v) for k, v in (error.get("metadata") or {}).items()}
            raise InvalidArgument(str(error.get("message")), reason=str(error.get("reason")), metadata=metadata)
        job.dataset = reports.dataset_stats(result["stats"])
        job.progress.total_steps = int(result["stats"].get("total_steps") or 0)

    # ---------------------------------------------------------------------------------------------- the lease

    async def _train(self, active: _Active) -> None:
        job = active.job
        while True:
            if job.state not in (JobState.WAITING_FOR_GPU, JobState.PAUSED):
                self._set_state(job, JobState.WAITING_FOR_GPU, "waiting for the GPU")
            lease = await self._acquire(active)
            outcome = await self._train_under(active, lease)
            if outcome == _Outcome.DONE:
                return
            if job.state != JobState.PAUSED:
                why = "yielded the GPU" if outcome == _Outcome.YIELDED else "lost the GPU lease"
                self._set_state(job, JobState.PAUSED, f"{why}; resumes from step {_resume_step(job)} when granted")

    async def _acquire(self, active: _Active) -> HeldLease:
        job = active.job
        spec = job.spec
        remaining = job.progress.eta_s or 0.0
        request = TrainingLeaseRequest(
            job_id=f"{job.job_id}/{os.getpid()}",  # a killed predecessor's lease may linger until its TTL
            name=spec.name,
            vram_bytes=int(spec.gpu.vram_bytes or job.estimate.vram_bytes),
            priority=int(spec.gpu.priority or 0),
            preemptible=bool(spec.gpu.preemptible),
            expected_duration_s=remaining,
        )
        started = time.monotonic()
        reported = False
        while True:
            try:
                acquiring = self._leases.acquire(request, self._on_queued(job))
                lease = await self._race(active, acquiring, discard=_release_quietly)
                break
            except BatonError as error:  # scheduler down or refusing: keep the job, try again
                if not reported:
                    self._commit(job, [self._event(job, EventType.LOG, f"{error.message}; retrying")])
                    reported = True
                await self._race(active, asyncio.sleep(_SCHEDULER_RETRY_S))
        waited = time.monotonic() - started
        self._metrics.lease_wait_seconds.observe(waited)
        job.lease_epoch, job.queue_position, job.queue_eta_s = lease.epoch, 0, 0.0
        log_event(log, "trainer.lease_granted", job=job.job_id, epoch=lease.epoch, waited_s=waited)
        return lease

    def _on_queued(self, job: Job) -> Any:
        def on_queued(position: int, eta_s: float) -> None:
            moved = position != job.queue_position
            job.queue_position, job.queue_eta_s = position, eta_s
            if moved:
                eta = f"ETA {eta_s:.0f} s" if eta_s >= 0 else "ETA unknown"
                self._commit(job, [self._event(job, EventType.LOG, f"waiting for the GPU: position {position}, {eta}")])

        return on_queued

    async def _train_under(self, active: _Active, lease: HeldLease) -> _Outcome:
        job = active.job
        self._metrics.lease_held.set(1 if self._leases.uses_gpu_lease else 0)
        try:
            while True:
                outcome = await self._run_worker(active, lease)
                if outcome != _Outcome.CRASHED:
                    return outcome
                if lease.valid and not lease.yield_requested.is_set():
                    continue  # restart at once under the same lease
                return _Outcome.LOST
        finally:
            await _release_quietly(lease)
            job.lease_epoch = 0
            self._metrics.lease_held.set(0)
            self._commit(job, [])

    # ---------------------------------------------------------------------------------------------- RUNNING

    async def _run_worker(self, active: _Active, lease: HeldLease) -> _Outcome:
        job = active.job
        if active.cancel.is_set():
            raise _Cancel
        if self._stopping.is_set():
            raise _Stop
        job_dir = self._job_dir(job)
        tail = runner.EventTail(job_dir / runner.EVENTS_FILE, job.events_offset)
        tail.seal()
        child = runner.ChildProcess(self._config.worker_module, [str(job_dir)], job_dir / runner.LOG_FILE)
        run = _Run(child, tail, time.monotonic(), job.progress.train_s)
        if not job.started_unix_s:
            job.started_unix_s = time.time()
        if job.state != JobState.RUNNING:  # a restart after a crash stays RUNNING
            why = f"training (lease epoch {lease.epoch})" if lease.epoch else "training"
            self._set_state(job, JobState.RUNNING, why)
        await child.start()
        job.worker_pid = child.pid
        self._commit(job, [])
        exit_task = asyncio.ensure_future(child.wait())
        try:
            while not exit_task.done():
                await asyncio.wait([exit_task], timeout=POLL_S)
                self._apply_events(job, run)
                if not exit_task.done():
                    self._steer(active, lease, run)
        finally:
            if not exit_task.done():  # the driver itself was cancelled: never leave the child running
                child.kill()
                await asyncio.shield(exit_task)
        self._apply_events(job, run)
        job.worker_pid = 0
        job.progress.train_s = run.train_s_base + (time.monotonic() - run.started)
        self._commit(job, [])
        return self._outcome(job, run, exit_task.result())

    def _steer(self, active: _Active, lease: HeldLease, run: _Run) -> None:
        """Turn what happened around the running child into a signal for it (each at most once)."""
        job, killed = active.job, run.signalled.startswith("kill")
        if killed:
            return
        if active.cancel.is_set():
            self._signal(run, signal.SIGKILL, "kill:cancel")
        elif not lease.valid:
            self._signal(run, signal.SIGKILL, "kill:lost")
            self._metrics.lease_losses.inc()
            why = getattr(lease, "lost_reason", "") or "unconfirmed for a whole TTL"
            self._commit(job, [self._event(job, EventType.LOG, f"lease lost ({why}): training stopped at once")])
        elif self._stopping.is_set() and run.signalled in ("", "yield"):
            self._signal(run, signal.SIGTERM, "shutdown")
        elif run.signalled == "shutdown" and time.monotonic() - run.signalled_at > self._config.child_stop_timeout_s:
            self._signal(run, signal.SIGKILL, "kill:shutdown")
        elif lease.yield_requested.is_set() and not run.signalled:
            self._signal(run, signal.SIGUSR1, "yield")
            left = lease.yield_deadline_unix_s - time.time() if lease.yield_deadline_unix_s else -1
            deadline = f"; deadline in {left:.0f} s" if left >= 0 else ""
            self._set_state(job, JobState.YIELDING, f"asked to yield the GPU: saving a checkpoint{deadline}")

    def _signal(self, run: _Run, signum: int, why: str) -> None:
        run.child.signal(signum)
        run.signalled, run.signalled_at = why, time.monotonic()
        log_event(log, "trainer.child_signalled", pid=run.child.pid, signal=signal.Signals(signum).name, why=why)

    def _outcome(self, job: Job, run: _Run, code: int) -> _Outcome:
        reason = run.signalled
        if reason == "kill:cancel":
            raise _Cancel
        if code == runner.EXIT_DONE and self._output_complete(job):  # output/ appears only complete
            if reason == "yield":  # asked to yield on its last steps, it finished instead: a handover all the same
                self._metrics.yield_seconds.observe(time.monotonic() - run.signalled_at)
            return _Outcome.DONE
        if run.error is not None:  # the child understood what went wrong: no point in retrying
            run.error.metadata.setdefault("exit_code", str(code))
            raise _Fail(run.error)
        if reason == "kill:lost":
            return _Outcome.LOST
        if reason in ("shutdown", "kill:shutdown"):
            if code == runner.EXIT_YIELDED:
                self._metrics.yield_seconds.observe(time.monotonic() - run.signalled_at)
            raise _Stop
        # -SIGUSR1: the signal came before the child installed its handler; its last checkpoint stands.
        if reason == "yield" and code in (runner.EXIT_YIELDED, -signal.SIGUSR1):
            self._metrics.yield_seconds.observe(time.monotonic() - run.signalled_at)
            self._metrics.preemptions.inc()
            job.progress.preemptions += 1
            self._commit(job, [])
            return _Outcome.YIELDED
        return self._crashed(job, code)

    def _crashed(self, job: Job, code: int) -> _Outcome:
        self._metrics.child_crashes.inc()
        job.crash_restarts += 1
        why = {
            runner.EXIT_DONE: "exited without writing its output",
            runner.EXIT_FAILED: "failed without saying why",
            runner.EXIT_YIELDED: "stopped by a signal from outside the trainer",
        }.get(code, f"crashed (exit {code}{_signal_name(code)})")
        if job.crash_restarts > self._config.max_crash_restarts:
            raise _Fail(JobError(
                "TRAINER_CRASHED",
                f"the training process {why}, {job.crash_restarts} times; the end of its log:\n"
                f"{runner.log_tail(self._job_dir(job) / runner.LOG_FILE)}",
                {"exit_code": str(code), "restarts": str(job.crash_restarts - 1)},
            ))  # fmt: skip
        message = (
            f"the training process {why}; restarting from step {_resume_step(job)} "
            f"(restart {job.crash_restarts} of {self._config.max_crash_restarts})"
        )
        self._commit(job, [self._event(job, EventType.LOG, message)])
        log_event(log, "trainer.child_crashed", level=logging.WARNING, job=job.job_id, exit_code=code)
        return _Outcome.CRASHED

    # ---------------------------------------------------------------------------------------------- events

    def _apply_events(self, job: Job, run: _Run) -> None:
        """Apply what the child wrote since the last read (services.trainer.reports), then persist and publish."""
        records = run.tail.read()
        events: list[JobEvent] = []
        for record in records:
            train_s = run.train_s_base + (time.monotonic() - run.started)
            try:
                report = reports.apply_record(job, record, self._metrics, train_s)
            except (KeyError, TypeError, ValueError) as error:
                log_event(log, "trainer.event_malformed", level=logging.WARNING, job=job.job_id, error=repr(error))
                continue
            if report.error is not None:
                run.error = report.error
            if report.type is not None:
                events.append(self._event(job, report.type, report.message, **report.extra))
        if records or job.events_offset != run.tail.offset:
            job.events_offset = run.tail.offset
            self._commit(job, events)

    # ---------------------------------------------------------------------------------------------- FINALIZING

    def _output_complete(self, job: Job) -> bool:
        output = self._job_dir(job) / runner.OUTPUT_DIR
        return all((output / name).is_file() for name in REQUIRED_FILES)

    async def _finalize(self, active: _Active) -> None:
        job = active.job
        if job.state != JobState.FINALIZING:
            self._set_state(job, JobState.FINALIZING, "registering the adapter")
        if active.cancel.is_set():  # the last moment a cancel wins: after the rename the version exists
            raise _Cancel
        output = self._job_dir(job) / runner.OUTPUT_DIR
        record = {"tenant": job.spec.tenant, "base_model_path": job.spec.base_model_path}
        try:
            version = await asyncio.to_thread(self._registry.publish, job.spec.name, job.job_id, output, record)
        except FileNotFoundError as error:
            message = f"the training process left no complete adapter: {error}"
            raise _Fail(JobError("OUTPUT_INCOMPLETE", message)) from None
        adapter = reports.trained_adapter(version, job)
        if active.cancel.is_set():  # too late: the version is complete and registered
            job.cancel_requested = False
            self._commit(job, [self._event(job, EventType.LOG, "cancel came after the adapter was registered")])
        if job.spec.hot_load:
            adapter.hot_loaded, adapter.hot_load_error = await self._hot_load(version)
        job.adapter = adapter
        await asyncio.to_thread(self._remove_work_files, job)
        message = f"adapter {version.relative_path} registered" + (" and hot-loaded" if adapter.hot_loaded else "")
        self._set_state(job, JobState.SUCCEEDED, message, adapter=adapter)

    async def _hot_load(self, version: RegisteredVersion) -> tuple[bool, str]:
        if self._hot_loader is None:
            return False, "no inference service is configured (BATON_TRAINER_INFERENCE_ADDR); load it with LoadAdapter"
        try:
            await self._hot_loader.load(version.name, version.relative_path)
        except BatonError as error:
            return False, f"{error.reason}: {error.message}"
        except (OSError, TimeoutError) as error:
            return False, f"the inference service did not answer: {error!r}"
        return True, ""

    # ---------------------------------------------------------------------------------------------- endings

    async def _fail(self, job: Job, error: JobError) -> None:
        job.error = error
        await asyncio.to_thread(self._remove_work_files, job)
        self._set_state(job, JobState.FAILED, f"{error.reason}: {error.message.splitlines()[0]}", error=error)

    async def _finish_cancelled(self, job: Job) -> None:
        job.cancel_requested = True
        await asyncio.to_thread(self._registry.remove_staging, job.spec.name, job.job_id)
        await asyncio.to_thread(self._remove_work_files, job)
        self._set_state(job, JobState.CANCELLED, "cancelled; nothing was registered")

    def _remove_work_files(self, job: Job) -> None:
        """Checkpoints and output go; spec, events and the log stay for people to read."""
        job_dir = self._job_dir(job)
        for name in (runner.CHECKPOINTS_DIR, runner.OUTPUT_DIR):
            shutil.rmtree(job_dir / name, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- helpers

    def _job_dir(self, job: Job) -> Path:
        return self._config.jobs_dir / job.job_id

    def _worker_spec(self, job: Job) -> dict[str, Any]:
        return runner.worker_spec(job, device=self._config.device, texts_dir=self._config.texts_dir)


def _resume_step(job: Job) -> int:
    return job.last_checkpoint.step if job.last_checkpoint else 0


def _ends_stream(event: JobEvent) -> bool:
    return event.type == EventType.STATE_CHANGED and event.state.terminal


def _signal_name(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f", {signal.Signals(-code).name}"
    return ""


def _new_job_id() -> str:
    """Sortable by creation time: milliseconds in fixed-width hex, then randomness."""
    return f"job-{int(time.time() * 1000):012x}{uuid.uuid4().hex[:8]}"


def _encode_page_token(last_job_id: str, fingerprint: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": last_job_id, "filter": fingerprint}).encode()).decode()


def _decode_page_token(token: str, fingerprint: str) -> str:
    if not token:
        return ""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        before, filter_ = str(data["before"]), str(data["filter"])
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        message = "page_token is malformed; pass next_page_token unchanged"
        raise InvalidArgument(message, reason="BAD_PAGE_TOKEN") from None
    if filter_ != fingerprint:
        raise InvalidArgument("page_token belongs to another filter (tenant, states)", reason="BAD_PAGE_TOKEN")
    return before


async def _release_quietly(lease: HeldLease) -> None:
    try:
        await lease.release()
    except BatonError as error:  # the scheduler frees it after its TTL anyway
        log_event(log, "trainer.lease_release_failed", level=logging.WARNING, error=error.message)
