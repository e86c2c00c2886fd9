"""The SERVING lease from the GPU-lease scheduler (a ``LeaseProvider`` for the lifecycle).

Serving asks with a higher priority than bulk embedding and is preemptible: the scheduler may ask it to yield (a
training job the user started, an admin), and it does so by sleeping. The scheduler's own wait timeout is not used:
the lifecycle withdraws a wake when no request waits for it any more, which cancels the Acquire stream.
"""

from __future__ import annotations

import os
import socket

from baton.lease import LeaseClient, LeaseKind, LeaseRequest
from baton.runtime.errors import BatonError, ResourceExhausted, Unavailable
from services.inference.lifecycle import HeldLease, QueuedCallback


class ServingLeases:
    uses_gpu_lease = True

    def __init__(self, client: LeaseClient, *, vram_bytes: int, priority: int, exclusive: bool, model_id: str) -> None:
        self._client = client
        self._request = LeaseRequest(
            holder_id=f"inference/{socket.gethostname()}/{os.getpid()}",
            kind=LeaseKind.SERVING,
            vram_bytes=vram_bytes,
            priority=priority,
            exclusive=exclusive,
            preemptible=True,
            description=f"serving {model_id}",
        )

    async def acquire(self, on_queued: QueuedCallback) -> HeldLease:
        try:
            return await self._client.acquire(self._request, on_queued=on_queued)
        except ResourceExhausted:
            raise
        except BatonError as error:
            raise Unavailable(
                f"the GPU-lease scheduler at {self._client.target} refused or did not answer ({error.message}); "
                "start it (baton serve scheduler) or set BATON_INFERENCE_SCHEDULER_ADDR",
                reason="SCHEDULER_UNAVAILABLE",
                retry_after_s=2.0,
            ) from error

    async def close(self) -> None:
        await self._client.close()
