"""The EMBEDDING_BULK GPU lease for bulk (EmbedStream) work.

One lease is shared by every open bulk stream: the first bulk request acquires it (its answer waits for the grant),
later ones reuse it, and it is released ``linger_s`` after the last stream closes, so back-to-back ingest batches do
not pay a handover each. The lease is preemptible: when the scheduler asks for the GPU back (a chat needs it), the
bulk requests already running finish, the lease is released at once, and the next bulk request waits for a new
grant — embedding holds no state worth a checkpoint, so yielding is just pausing between requests. Before each bulk
request the lease is checked locally (fencing): a revoked or unconfirmed lease is dropped and acquired again.

Interactive Embed calls (a query or two) never wait for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from baton.lease import Lease, LeaseClient, LeaseKind, LeaseRequest
from baton.runtime.errors import BatonError, ResourceExhausted, Unavailable
from baton.runtime.logging import log_event
from services.embedder.metrics import EmbedderMetrics

log = logging.getLogger(__name__)


class BulkLease:
    """A ``BulkGate`` (see core) backed by the GPU-lease scheduler."""

    uses_gpu_lease = True

    def __init__(
        self,
        client: LeaseClient,
        *,
        vram_bytes: int,
        priority: int,
        wait_s: float,
        linger_s: float,
        metrics: EmbedderMetrics,
    ) -> None:
        self._client = client
        self._request = LeaseRequest(
            holder_id=f"embedder/{socket.gethostname()}/{os.getpid()}",
            kind=LeaseKind.EMBEDDING_BULK,
            vram_bytes=vram_bytes,
            priority=priority,
            exclusive=True,
            preemptible=True,  # yielding costs nothing but a pause between requests
            wait_timeout_s=wait_s,
            description="bulk embedding (ingest)",
        )
        self._wait_s = wait_s
        self._linger_s = linger_s
        self._metrics = metrics
        self._lease: Lease | None = None
        self._lock = asyncio.Lock()  # one acquire/release at a time
        self._streams = 0
        self._running = 0  # bulk requests using the GPU now
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._release_task: asyncio.Task[None] | None = None
        self._yield_watcher: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        self._streams += 1
        if self._release_task is not None:
            self._release_task.cancel()
            self._release_task = None
        try:
            yield
        finally:
            self._streams -= 1
            if self._streams == 0:
                self._release_task = self._spawn(self._release_later(), "embedder-lease-linger")

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        await self._ensure()
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._lock:
            await self._drop("shutdown")
        await self._client.close()

    # ---------------------------------------------------------------------------------------------- internals

    async def _ensure(self) -> None:
        async with self._lock:
            lease = self._lease
            if lease is not None:
                if lease.valid and not lease.yield_requested.is_set():
                    return
                await self._idle.wait()  # let the requests on the GPU finish first
                await self._drop("yield requested" if lease.valid else f"lost: {lease.lost_reason or 'unconfirmed'}")
            self._lease = await self._acquire()
            self._yield_watcher = self._spawn(self._yield_when_asked(self._lease), "embedder-lease-yield")

    async def _acquire(self) -> Lease:
        try:
            # The scheduler enforces wait_timeout_s; the local bound only covers a scheduler that stops answering.
            lease = await asyncio.wait_for(self._client.acquire(self._request), self._wait_s + 10)
        except (TimeoutError, ResourceExhausted) as error:
            raise ResourceExhausted(
                f"bulk embedding waited {self._wait_s:g} s for the GPU (EMBEDDING_BULK lease) in vain; retry later "
                "or raise BATON_EMBEDDER_LEASE_WAIT_S",
                reason="LEASE_WAIT_TIMEOUT",
                retry_after_s=getattr(error, "retry_after_s", None) or 5.0,
            ) from error
        except BatonError as error:
            raise Unavailable(
                f"the GPU-lease scheduler at {self._client.target} refused or did not answer ({error.message}); "
                "start it or set BATON_EMBEDDER_SCHEDULER_ADDR",
                reason="SCHEDULER_UNAVAILABLE",
                retry_after_s=2.0,
            ) from error
        self._metrics.lease_held.set(1)
        log_event(log, "embedder.lease_granted", epoch=lease.epoch)
        return lease

    async def _yield_when_asked(self, lease: Lease) -> None:
        """Give the GPU back promptly when asked, not only when the next bulk request comes."""
        await lease.yield_requested.wait()
        async with self._lock:
            if self._lease is lease:
                await self._idle.wait()
                await self._drop("yield requested")

    async def _drop(self, why: str) -> None:
        if self._lease is None:
            return
        lease, self._lease = self._lease, None
        if self._yield_watcher is not None and self._yield_watcher is not asyncio.current_task():
            self._yield_watcher.cancel()  # it watched this lease only
        self._yield_watcher = None
        try:
            await lease.release()
        except BatonError as error:  # the scheduler frees it after its TTL anyway
            log_event(log, "embedder.lease_release_failed", level=logging.WARNING, error=error.message)
        self._metrics.lease_held.set(0)
        log_event(log, "embedder.lease_released", epoch=lease.epoch, why=why)

    async def _release_later(self) -> None:
        await asyncio.sleep(self._linger_s)
        async with self._lock:
            if self._streams == 0:
                await self._idle.wait()
                await self._drop("no bulk stream open")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
