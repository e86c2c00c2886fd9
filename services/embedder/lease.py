"""The EMBEDDING_BULK GPU lease for bulk (EmbedStream) work.

One lease is shared by every open bulk stream: the first bulk request acquires it (the first response waits for the
grant), later ones reuse it, and it is released ``linger_s`` after the last stream closes, so back-to-back ingest
runs do not pay a handover each. Before each bulk request the lease is checked (fencing, locally): if the scheduler
revoked it, or asked for the GPU back (a chat needs it), it is released at once and the request waits for a new
grant — embedding holds no state worth a checkpoint, so yielding is just stopping between batches.

Interactive Embed calls (a query or two) never wait for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator

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
            preemptible=True,  # yielding costs nothing but a pause between batches
            wait_timeout_s=wait_s,
            description="bulk embedding (ingest)",
        )
        self._wait_s = wait_s
        self._linger_s = linger_s
        self._metrics = metrics
        self._lease: Lease | None = None
        self._lock = asyncio.Lock()
        self._streams = 0
        self._release_task: asyncio.Task[None] | None = None

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
                self._release_task = asyncio.create_task(self._release_later(), name="embedder-lease-linger")

    async def ensure(self) -> None:
        async with self._lock:
            if self._lease is not None and self._lease.valid and not self._lease.yield_requested.is_set():
                return
            await self._drop("yield requested" if self._lease is not None else "")
            self._lease = await self._acquire()

    async def close(self) -> None:
        if self._release_task is not None:
            self._release_task.cancel()
        async with self._lock:
            await self._drop("shutdown")
        await self._client.close()

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

    async def _drop(self, why: str) -> None:
        if self._lease is None:
            return
        lease, self._lease = self._lease, None
        try:
            await lease.release()
        except BatonError as error:  # the scheduler frees it after its TTL anyway
            log_event(log, "embedder.lease_release_failed", level=logging.WARNING, error=error.message)
        self._metrics.lease_held.set(0)
        log_event(log, "embedder.lease_released", epoch=lease.epoch, why=why or "idle")

    async def _release_later(self) -> None:
        await asyncio.sleep(self._linger_s)
        async with self._lock:
            if self._streams == 0:
                await self._drop("no bulk stream open")
