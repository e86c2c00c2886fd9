"""The dynamic batcher on a fake model: merging across requests, the token budget, order, priority, overload."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from baton.runtime.errors import ResourceExhausted, UpstreamFailed
from services.embedder.batcher import BatchLimits, DynamicBatcher, Priority
from services.embedder.metrics import EmbedderMetrics


class FakeModel:
    """Records every batch; a vector is (first id, length), so results can be traced to their inputs.

    ``hold()`` makes the next batch wait in the inference thread until ``release()``: requests submitted meanwhile
    pile up in the queue, as they do behind a slow forward pass.
    """

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()

    def hold(self) -> None:
        self._gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self._gate.set()

    def __call__(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.batches.append([list(ids) for ids in batch])
        self.entered.set()
        self._gate.wait(timeout=10)
        return np.array([[ids[0], len(ids)] for ids in batch], dtype=np.float32)


def tokens(tag: int, length: int) -> list[int]:
    return [tag] * length


async def wait_until_running(model: FakeModel) -> None:
    await asyncio.to_thread(model.entered.wait, 5)


def limits(max_tokens: int = 1000, max_requests: int | None = None, max_concurrent: int = 100) -> BatchLimits:
    return BatchLimits(max_tokens, max_requests, max_concurrent)


async def test_concurrent_requests_are_merged_into_one_batch() -> None:
    model = FakeModel()
    async with DynamicBatcher(model, limits()) as batcher:
        model.hold()
        first = asyncio.create_task(batcher.submit([tokens(1, 5)]))
        await wait_until_running(model)  # batch 1 runs; the next three requests queue behind it
        others = [asyncio.create_task(batcher.submit([tokens(tag, 5), tokens(tag, 6)])) for tag in (2, 3, 4)]
        await asyncio.sleep(0.05)
        model.release()
        await asyncio.gather(first, *others)
    assert [len(batch) for batch in model.batches] == [1, 6]
    assert sorted(ids[0] for ids in model.batches[1]) == [2, 2, 3, 3, 4, 4]


async def test_token_budget_counts_padding_and_is_never_exceeded() -> None:
    model = FakeModel()
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(1, 64, size=120)]
    async with DynamicBatcher(model, limits(max_tokens=256)) as batcher:
        model.hold()
        blocker = asyncio.create_task(batcher.submit([tokens(0, 64)]))
        await wait_until_running(model)
        requests = [
            asyncio.create_task(batcher.submit([tokens(i + 1, n) for i, n in enumerate(lengths[start : start + 8])]))
            for start in range(0, len(lengths), 8)
        ]
        await asyncio.sleep(0.05)
        model.release()
        await asyncio.gather(blocker, *requests)
    for batch in model.batches:
        assert len(batch) * max(len(ids) for ids in batch) <= 256
    assert sum(len(batch) for batch in model.batches) == 1 + len(lengths)
    assert max(len(batch) for batch in model.batches) > 8  # batches span several requests


async def test_max_batch_requests_caps_the_inputs_per_batch() -> None:
    model = FakeModel()
    async with DynamicBatcher(model, limits(max_requests=3)) as batcher:
        await batcher.submit([tokens(i, 4) for i in range(10)])
    assert [len(batch) for batch in model.batches] == [3, 3, 3, 1]


async def test_results_come_back_in_input_order_though_batches_are_sorted_by_length() -> None:
    model = FakeModel()
    async with DynamicBatcher(model, limits(max_tokens=64)) as batcher:
        lengths = [30, 2, 17, 9, 30, 1, 5]
        result = await batcher.submit([tokens(100 + i, n) for i, n in enumerate(lengths)])
    assert result.vectors[:, 0].tolist() == [100 + i for i in range(len(lengths))]
    assert result.vectors[:, 1].tolist() == lengths
    for batch in model.batches:  # length bucketing: each batch's inputs are sorted by length
        assert [len(ids) for ids in batch] == sorted(len(ids) for ids in batch)


async def test_length_bucketing_puts_similar_lengths_together() -> None:
    model = FakeModel()
    async with DynamicBatcher(model, limits(max_tokens=400)) as batcher:
        await batcher.submit([tokens(1, 10), tokens(2, 200), tokens(3, 12), tokens(4, 190)])
    assert [[len(ids) for ids in batch] for batch in model.batches] == [[10, 12], [190, 200]]


async def test_interactive_requests_go_ahead_of_queued_bulk_work() -> None:
    model = FakeModel()
    async with DynamicBatcher(model, limits(max_requests=2)) as batcher:
        model.hold()
        blocker = asyncio.create_task(batcher.submit([tokens(0, 3)], Priority.BULK))
        await wait_until_running(model)
        bulk = asyncio.create_task(batcher.submit([tokens(1, 3)] * 6, Priority.BULK))
        await asyncio.sleep(0.02)
        query = asyncio.create_task(batcher.submit([tokens(9, 3)], Priority.INTERACTIVE))
        await asyncio.sleep(0.05)
        model.release()
        await asyncio.gather(blocker, bulk, query)
    tags = [[ids[0] for ids in batch] for batch in model.batches]
    assert tags[1] == [9]  # right after the batch that was running
    assert sum(len(batch) for batch in tags) == 8


async def test_a_full_queue_answers_resource_exhausted_at_once() -> None:
    model = FakeModel()
    async with DynamicBatcher(model, limits(max_concurrent=2)) as batcher:
        model.hold()
        running = [asyncio.create_task(batcher.submit([tokens(i, 3)])) for i in range(2)]
        await wait_until_running(model)
        with pytest.raises(ResourceExhausted) as refused:
            await batcher.submit([tokens(5, 3)])
        assert refused.value.reason == "OVERLOADED"
        assert refused.value.http_status == 429
        assert refused.value.retry_after_s is not None
        model.release()
        await asyncio.gather(*running)
        await batcher.submit([tokens(6, 3)])  # room again once they finish


async def test_a_model_failure_fails_the_requests_of_that_batch_as_upstream_failed() -> None:
    def broken(batch: Sequence[Sequence[int]]) -> np.ndarray:
        raise RuntimeError("CUDA out of memory")

    async with DynamicBatcher(broken, limits()) as batcher:
        with pytest.raises(UpstreamFailed, match="out of memory") as failed:
            await batcher.submit([tokens(1, 3)])
    assert failed.value.http_status == 424


async def test_inputs_of_a_cancelled_request_are_skipped() -> None:
    model = FakeModel()
    async with DynamicBatcher(model, limits(max_requests=1)) as batcher:
        model.hold()
        blocker = asyncio.create_task(batcher.submit([tokens(0, 3)]))
        await wait_until_running(model)
        doomed = asyncio.create_task(batcher.submit([tokens(7, 3)] * 5))
        await asyncio.sleep(0.02)
        doomed.cancel()  # the caller went away (deadline, disconnect)
        model.release()
        await blocker
        await batcher.submit([tokens(8, 3)])
    assert 7 not in [batch[0][0] for batch in model.batches]
    assert batcher.in_flight == 0


async def test_metrics_see_every_batch() -> None:
    metrics = EmbedderMetrics(CollectorRegistry())
    async with DynamicBatcher(FakeModel(), limits(max_tokens=20), metrics) as batcher:
        await batcher.submit([tokens(1, 10), tokens(2, 10), tokens(3, 4)])
    registry = metrics.registry
    assert registry.get_sample_value("baton_embedder_inputs_total") == 3
    assert registry.get_sample_value("baton_embedder_tokens_total") == 24
    assert registry.get_sample_value("baton_embedder_batch_size_count") == 2
    assert registry.get_sample_value("baton_embedder_padded_tokens_total") == 2 * 10 + 1 * 10  # [4,10] then [10]
    assert registry.get_sample_value("baton_embedder_queue_depth") == 0
