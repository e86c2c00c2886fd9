"""The inference core and its lifecycle with a fake engine and fake leases (the integration suite runs real ones).

What only a fake can pin down exactly: the order of engine calls around a yield (drain, abort, sleep, then release),
the bounded queue, a lost lease aborting everything, and adapters that stay in the engine while requests use them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from baton.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.inference.adapters import AdapterFiles
from services.inference.core import ContrastInput, CoreLimits, GenerateCall, InferenceCore, SamplingInput
from services.inference.engine import AdapterSlot, Contrast, EngineDelta, EngineInfo, EngineRequest
from services.inference.lifecycle import Lifecycle, ServiceState
from services.inference.metrics import InferenceMetrics


class FakeEngine:
    """Emits token i+1 every ``step_s``; the adapter's slot id is added to each token so outputs differ."""

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.calls: list[str] = []
        self.adapters: dict[int, AdapterSlot] = {}
        self.aborted: list[str] = []
        self.info = EngineInfo("hf", "test", "float32", "none", "cpu", "offload", contrast=True)
        self.requests: list[EngineRequest] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def shutdown(self) -> None:
        self.calls.append("shutdown")

    async def sleep(self, level: int = 1) -> None:
        self.calls.append("sleep")

    async def wake(self) -> None:
        self.calls.append("wake")

    async def add_adapter(self, slot: AdapterSlot) -> None:
        self.calls.append(f"add:{slot.slot_id}")
        self.adapters[slot.slot_id] = slot

    async def remove_adapter(self, slot: AdapterSlot) -> None:
        self.calls.append(f"remove:{slot.slot_id}")
        self.adapters.pop(slot.slot_id, None)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        self.requests.append(request)
        offset = 100 * request.adapter.slot_id if request.adapter else 0
        try:
            for index in range(request.sampling.max_tokens):
                await asyncio.sleep(self.step_s)
                last = index == request.sampling.max_tokens - 1
                yield EngineDelta(text=f"<{offset + index}>", token_ids=[offset + index],
                                  finish_reason="length" if last else None)  # fmt: skip
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request.request_id)
            raise

    def kv_cache_usage(self) -> float:
        return 0.0

    def device_memory_bytes(self) -> int:
        return 0


class FakeLease:
    def __init__(self, epoch: int, log: list[str]) -> None:
        self._epoch = epoch
        self.log = log
        self.yield_requested = asyncio.Event()
        self.lost = asyncio.Event()
        self.yield_deadline_unix_s = 0.0

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def lease_id(self) -> str:
        return f"lease-{self._epoch}"

    @property
    def valid(self) -> bool:
        return not self.lost.is_set()

    async def release(self) -> None:
        self.log.append(f"release:{self._epoch}")


class FakeLeases:
    uses_gpu_lease = True

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.epoch = 0
        self.available = asyncio.Event()
        self.available.set()
        self.granted: list[FakeLease] = []

    async def acquire(self, on_queued: object) -> FakeLease:
        on_queued(1, 12.0)  # type: ignore[operator]
        await self.available.wait()
        self.epoch += 1
        self.log.append(f"grant:{self.epoch}")
        lease = FakeLease(self.epoch, self.log)
        self.granted.append(lease)
        return lease

    async def close(self) -> None:
        return None


class FakeTokenizer:
    vocab_size = 1000
    has_chat_template = True
    generation_defaults: dict[str, float] = {}

    def text_ids(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [ord(char) % 1000 for char in text]


class FakeRegistry:
    def inspect(self, path_text: str) -> AdapterFiles:
        if path_text == "missing":
            raise NotFound("no such adapter", reason="ADAPTER_FILES_NOT_FOUND")
        return AdapterFiles(Path("/adapters") / path_text, 8, 16.0, ("q_proj",), "tiny", "", 100)


def make_core(
    *, queue_capacity: int = 8, max_concurrent: int = 4, step_s: float = 0.01, drain_s: float = 5.0
) -> tuple[InferenceCore, FakeEngine, FakeLeases, list[str]]:
    engine = FakeEngine(step_s)
    log = engine.calls
    leases = FakeLeases(log)
    metrics = InferenceMetrics(CollectorRegistry())
    lifecycle = Lifecycle(engine, leases, metrics, max_concurrent_requests=max_concurrent,  # type: ignore[arg-type]
                          queue_capacity=queue_capacity, drain_timeout_s=drain_s, yield_method="offload")  # fmt: skip
    limits = CoreLimits("tiny", max_model_len=64, max_logprobs=5, max_prompt_bytes=1000, max_wait_s=5.0,
                        max_loaded_adapters=2)  # fmt: skip
    core = InferenceCore(engine, lifecycle, FakeTokenizer(), FakeRegistry(), limits, metrics)  # type: ignore[arg-type]
    lifecycle.loaded()
    return core, engine, leases, log


async def eventually(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def run(core: InferenceCore, adapter: str = "", max_tokens: int = 3, **kwargs: object) -> tuple[str, str]:
    call = GenerateCall(prompt="hi", adapter_name=adapter, sampling=SamplingInput(max_tokens=max_tokens), **kwargs)
    text, finish = "", ""
    async for chunk in core.generate(call):  # type: ignore[arg-type]
        text += chunk.text
        finish = chunk.finish_reason or finish
    return text, finish


async def test_the_first_request_takes_the_lease_then_starts_the_engine() -> None:
    core, _, _, log = make_core()
    assert core.lifecycle.state == ServiceState.SLEEPING
    assert await run(core) == ("<0><1><2>", "length")
    assert log[:2] == ["grant:1", "start"]
    assert core.lifecycle.state == ServiceState.AWAKE


async def test_a_yield_drains_then_sleeps_then_releases() -> None:
    core, _, _, log = make_core(step_s=0.02)
    await run(core)
    running = asyncio.create_task(run(core, max_tokens=10))
    await asyncio.sleep(0.05)
    outcome = await core.lifecycle.sleep(drain_timeout_s=5, stay_asleep=False, level=1, lease_epoch=1, why="test")
    assert await running == ("".join(f"<{i}>" for i in range(10)), "length"), "drained, not aborted"
    assert outcome.aborted_requests == 0 and outcome.released_epoch == 1
    assert log[-2:] == ["sleep", "release:1"]
    assert core.lifecycle.state == ServiceState.SLEEPING
    assert await run(core) == ("<0><1><2>", "length")
    assert log[-2:] == ["grant:2", "wake"]


async def test_requests_past_the_drain_time_are_aborted_before_the_engine_sleeps() -> None:
    core, engine, _, log = make_core(step_s=0.05)
    await run(core)
    running = asyncio.create_task(run(core, max_tokens=50, request_id="long"))
    await asyncio.sleep(0.1)
    outcome = await core.lifecycle.sleep(drain_timeout_s=0.1, stay_asleep=False, level=1, lease_epoch=None, why="t")
    text, finish = await running
    assert finish == "aborted" and text.startswith("<0>")
    assert outcome.aborted_requests == 1 and engine.aborted == ["long"]
    assert log[-2:] == ["sleep", "release:1"]


async def test_a_stale_epoch_is_refused() -> None:
    core, *_ = make_core()
    await run(core)
    with pytest.raises(FailedPrecondition) as caught:
        await core.lifecycle.sleep(drain_timeout_s=0, stay_asleep=False, level=1, lease_epoch=7, why="t")
    assert caught.value.reason == "STALE_LEASE_EPOCH"


async def test_the_scheduler_asking_to_yield_makes_the_service_sleep() -> None:
    core, _, leases, log = make_core()
    await run(core)
    leases.granted[-1].yield_deadline_unix_s = 1e12
    leases.granted[-1].yield_requested.set()
    await eventually(lambda: core.lifecycle.state == ServiceState.SLEEPING)
    assert log[-1] == "release:1"


async def test_a_lost_lease_aborts_everything_at_once() -> None:
    core, _, leases, log = make_core(step_s=0.05)
    await run(core)
    running = asyncio.create_task(run(core, max_tokens=50, request_id="r"))
    await asyncio.sleep(0.1)
    leases.granted[-1].lost.set()
    assert (await running)[1] == "aborted"
    await eventually(lambda: core.lifecycle.state == ServiceState.SLEEPING)
    assert "sleep" in log


async def test_waiting_for_the_lease_times_out_with_a_retry_hint_and_the_wake_is_withdrawn() -> None:
    core, _, leases, _ = make_core()
    leases.available.clear()
    with pytest.raises(ResourceExhausted) as caught:
        await run(core, max_wait_s=0.1)
    assert caught.value.reason == "LEASE_WAIT_TIMEOUT" and caught.value.retry_after_s == 12.0
    assert caught.value.metadata["queue_position"] == "1"
    await asyncio.sleep(0.01)
    assert core.lifecycle.state == ServiceState.SLEEPING, "nobody waits: the wake is withdrawn"
    leases.available.set()
    assert (await run(core))[1] == "length"


async def test_the_queue_is_bounded() -> None:
    core, _, leases, _ = make_core(queue_capacity=2)
    leases.available.clear()
    waiting = [asyncio.create_task(run(core, max_wait_s=5)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(ResourceExhausted) as caught:
        await run(core)
    assert caught.value.reason == "OVERLOADED"
    leases.available.set()
    assert [result[1] for result in await asyncio.gather(*waiting)] == ["length", "length"]


async def test_stay_asleep_refuses_until_wake() -> None:
    core, *_ = make_core()
    await run(core)
    await core.lifecycle.sleep(drain_timeout_s=0, stay_asleep=True, level=1, lease_epoch=None, why="admin")
    with pytest.raises(Unavailable) as caught:
        await run(core)
    assert caught.value.reason == "STAY_ASLEEP"
    outcome = await core.lifecycle.wake(max_wait_s=5, return_immediately=False)
    assert outcome is not None and outcome.lease_epoch == 2
    assert (await run(core))[1] == "length"


async def test_adapters_stay_in_the_engine_until_their_requests_end() -> None:
    core, engine, _, log = make_core(step_s=0.03)
    await core.load_adapter("views", "v1", replace=False)
    assert (await run(core, "views"))[0] == "<100><101><102>"
    running = asyncio.create_task(run(core, "views", max_tokens=8))
    await asyncio.sleep(0.05)
    with pytest.raises(AlreadyExists):
        await core.load_adapter("views", "v2", replace=False)
    replaced = await core.load_adapter("views", "v2", replace=True)
    assert replaced.replaced and replaced.adapter.slot.slot_id == 2
    assert "remove:1" not in log, "the old slot serves the request in flight"
    assert (await running)[0].startswith("<100>") and (await running)[0].endswith("<107>")
    await asyncio.sleep(0.01)
    assert "remove:1" in log and set(engine.adapters) == {2}
    assert (await run(core, "views"))[0] == "<200><201><202>"
    unchanged = await core.load_adapter("views", "v2", replace=False)
    assert unchanged.unchanged
    await core.unload_adapter("views", allow_missing=False)
    with pytest.raises(NotFound):
        await run(core, "views")
    await asyncio.sleep(0.01)
    assert engine.adapters == {}


async def test_too_many_adapters_and_missing_files() -> None:
    core, *_ = make_core()
    await core.load_adapter("a", "a", replace=False)
    await core.load_adapter("b", "b", replace=False)
    with pytest.raises(ResourceExhausted) as caught:
        await core.load_adapter("c", "c", replace=False)
    assert caught.value.reason == "TOO_MANY_ADAPTERS"
    with pytest.raises(NotFound):
        await core.load_adapter("a", "missing", replace=True)
    assert sorted(core.adapters) == ["a", "b"]


async def test_adapters_loaded_before_the_engine_starts_are_added_when_it_starts() -> None:
    core, _, _, log = make_core()
    await core.load_adapter("early", "early", replace=False)  # e.g. --load-adapters at start-up
    assert log == [] and core.lifecycle.state == ServiceState.SLEEPING, "no engine, no lease yet"
    assert (await run(core, "early"))[0] == "<100><101><102>"
    assert log[:3] == ["grant:1", "start", "add:1"]


def test_every_yield_method_has_a_wire_value_and_a_sleep_estimate() -> None:
    import typing

    from services.inference.engine import YieldMethod
    from services.inference.lifecycle import _DEFAULT_SLEEP_ESTIMATE_S
    from services.inference.server import _YIELD_METHODS

    methods = set(typing.get_args(YieldMethod))
    assert methods == set(_YIELD_METHODS) == set(_DEFAULT_SLEEP_ESTIMATE_S)
    assert len(set(_YIELD_METHODS.values())) == len(methods)


async def test_a_contrast_reaches_the_engine_tokenized_and_is_checked_first() -> None:
    core, engine, _, _ = make_core()
    await run(core, contrast=ContrastInput(0.5, prompt="ab"))
    assert engine.requests[-1].contrast == Contrast([ord("a"), ord("b")], 0.5)
    await run(core)
    assert engine.requests[-1].contrast is None
    for weight in (0.0, -1.0, 10.5):
        with pytest.raises(InvalidArgument) as caught:
            await run(core, contrast=ContrastInput(weight, prompt="ab"))
        assert caught.value.reason == "BAD_CONTRAST_WEIGHT"
    with pytest.raises(InvalidArgument) as caught:
        await run(core, contrast=ContrastInput(0.5))
    assert caught.value.reason == "EMPTY_INPUT"
    engine.info = dataclasses.replace(engine.info, engine="vllm", contrast=False)
    with pytest.raises(FailedPrecondition) as caught:
        await run(core, contrast=ContrastInput(0.5, prompt="ab"))
    assert caught.value.reason == "CONTRAST_UNSUPPORTED" and "vllm" in caught.value.message
    assert len(engine.requests) == 2  # nothing refused reached the engine
