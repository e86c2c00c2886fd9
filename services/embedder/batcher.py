"""Dynamic batching: inputs of concurrent requests merged into forward batches bounded by a token budget.

Requests arrive already tokenised: an input is anything whose ``len`` is its token count (a ``ModelInput``), and the
batch reaches the model as the inputs themselves. One worker task forms batches and runs them, one at a time, in a
single inference thread (a model is not made faster by two threads fighting over the same cores, and a GPU runs
one batch at a time anyway). Batches are formed in *rounds*: the worker takes everything queued, sorts it by length
(so that neighbours in a batch have similar lengths and little padding), and cuts it into batches whose padded size
``count x longest`` stays within ``max_batch_tokens`` and whose count stays within ``max_batch_requests``.
Whatever arrives meanwhile waits for the next round, so nothing starves.

Interactive requests (a search query) go ahead of bulk ones (ingest): when one arrives during a bulk round, the
unstarted rest of the round goes back to the bulk queue and an interactive round runs first.

The number of requests queued or running is bounded by ``max_concurrent_requests``; beyond it ``submit`` fails at
once with ``ResourceExhausted`` (TEI's 429), which is cheaper for everyone than an ever-growing queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Callable, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from baton.runtime.errors import BatonError, ResourceExhausted, Unavailable, UpstreamFailed
from services.embedder.metrics import EmbedderMetrics

RunBatch = Callable[[Sequence[Sized]], np.ndarray]


class Priority(enum.IntEnum):
    INTERACTIVE = 0
    BULK = 1


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int
    max_batch_requests: int | None
    max_concurrent_requests: int


@dataclass(frozen=True)
class BatchResult:
    """The vectors of one request, in input order, and where its time went."""

    vectors: np.ndarray
    queue_s: float
    inference_s: float


@dataclass
class _Request:
    size: int
    future: asyncio.Future[BatchResult]
    submitted_at: float
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    inference_s: float = 0.0
    last_batch: int = -1

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # cancelled (caller gone, deadline passed) or already failed

    def deliver(self, index: int, vector: np.ndarray, batch_number: int, batch_s: float) -> None:
        if self.abandoned:
            return
        self.rows[index] = vector
        if self.last_batch != batch_number:
            self.last_batch = batch_number
            self.inference_s += batch_s
        if len(self.rows) == self.size:
            vectors = np.stack([self.rows[i] for i in range(self.size)])
            queue_s = max(0.0, time.monotonic() - self.submitted_at - self.inference_s)
            self.future.set_result(BatchResult(vectors, queue_s, self.inference_s))

    def fail(self, error: BaseException) -> None:
        if not self.abandoned:
            self.future.set_exception(error)


@dataclass(frozen=True)
class _Item:
    ids: Sized
    index: int
    request: _Request


class DynamicBatcher:
    """Use as ``async with DynamicBatcher(run_batch, limits) as batcher: await batcher.submit(...)``."""

    def __init__(self, run_batch: RunBatch, limits: BatchLimits, metrics: EmbedderMetrics | None = None) -> None:
        self._run_batch = run_batch
        self._limits = limits
        self._metrics = metrics
        self._queues: dict[Priority, deque[_Item]] = {priority: deque() for priority in Priority}
        self._round: deque[_Item] = deque()
        self._round_priority = Priority.INTERACTIVE
        self._in_flight = 0
        self._batches_run = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder-inference")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> DynamicBatcher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work_forever(), name="embedder-batcher")

    async def close(self) -> None:
        """Fail what is still queued (UNAVAILABLE: come back to another replica), stop the worker and the thread."""
        self._closed = True
        shutting_down = Unavailable("the embedder is shutting down; retry", reason="SHUTTING_DOWN", retry_after_s=1)
        for item in [*self._round, *self._queues[Priority.INTERACTIVE], *self._queues[Priority.BULK]]:
            item.request.fail(shutting_down)
        self._round.clear()
        for queue in self._queues.values():
            queue.clear()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    @property
    def in_flight(self) -> int:
        """Requests queued or running now."""
        return self._in_flight

    @property
    def queued_inputs(self) -> int:
        return len(self._round) + sum(len(queue) for queue in self._queues.values())

    async def submit(self, token_ids: Sequence[Sized], priority: Priority = Priority.INTERACTIVE) -> BatchResult:
        """Embed one request's inputs (each token ids with special tokens, or a ``ModelInput``); vectors in input
        order.

        Cancelling the caller (client gone, deadline passed) drops its inputs that have not started yet.
        """
        if self._closed:
            raise Unavailable("the embedder is shutting down; retry", reason="SHUTTING_DOWN", retry_after_s=1)
        if self._in_flight >= self._limits.max_concurrent_requests:
            raise ResourceExhausted(
                f"the embedder is overloaded: {self._in_flight} requests are queued or running (limit "
                f"{self._limits.max_concurrent_requests}); retry shortly or send fewer requests at once",
                reason="OVERLOADED",
                metadata={"in_flight": str(self._in_flight), "queued_inputs": str(self.queued_inputs)},
                retry_after_s=1.0,
            )
        request = _Request(len(token_ids), asyncio.get_running_loop().create_future(), time.monotonic())
        self._queues[priority].extend(_Item(ids, index, request) for index, ids in enumerate(token_ids))
        self._in_flight += 1
        self._observe_queue()
        self._wakeup.set()
        try:
            return await request.future
        finally:
            self._in_flight -= 1
            if not request.future.done():
                request.future.cancel()  # the worker skips its remaining inputs

    # ------------------------------------------------------------------------------------------ the worker

    async def _work_forever(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._execute(batch)

    def _next_batch(self) -> list[_Item]:
        if self._round and self._round_priority is Priority.BULK and self._queues[Priority.INTERACTIVE]:
            self._queues[Priority.BULK].extendleft(reversed(self._round))
            self._round.clear()
        if not self._round:
            self._start_round()
        batch: list[_Item] = []
        longest = 0
        while self._round:
            item = self._round[0]
            if item.request.abandoned:
                self._round.popleft()
                continue
            longest = max(longest, len(item.ids))
            if batch and not self._fits(len(batch) + 1, longest):
                break
            batch.append(self._round.popleft())
        self._observe_queue()
        return batch

    def _start_round(self) -> None:
        priority = Priority.INTERACTIVE if self._queues[Priority.INTERACTIVE] else Priority.BULK
        queue = self._queues[priority]
        self._round = deque(sorted(queue, key=lambda item: len(item.ids)))  # length bucketing
        self._round_priority = priority
        queue.clear()

    def _fits(self, count: int, longest: int) -> bool:
        limit = self._limits.max_batch_requests
        return count * longest <= self._limits.max_batch_tokens and (limit is None or count <= limit)

    async def _execute(self, batch: list[_Item]) -> None:
        ids = [item.ids for item in batch]
        started = time.monotonic()
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, ids)
        except Exception as error:  # the model failed: every request in the batch learns why
            failure = (
                error
                if isinstance(error, BatonError)
                else UpstreamFailed(
                    f"the model failed on a batch of {len(batch)} inputs: {error}", reason="BACKEND_FAILED"
                )
            )
            for item in batch:
                item.request.fail(failure)
            return
        elapsed = time.monotonic() - started
        self._batches_run += 1
        for item, vector in zip(batch, vectors, strict=True):
            item.request.deliver(item.index, vector, self._batches_run, elapsed)
        if self._metrics is not None:
            self._metrics.observe_batch(
                size=len(batch),
                padded_tokens=len(batch) * max(len(i) for i in ids),
                tokens=sum(len(i) for i in ids),
                inference_s=elapsed,
            )

    def _observe_queue(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self.queued_inputs)
