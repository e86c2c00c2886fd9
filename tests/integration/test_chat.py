"""Chat through the gateway with the `openai` package: real gateway + embedder (MiniLM) + inference (hf engine, the
tiny Qwen3 with a phrase adapter) processes.

The tiny model answers gibberish, so these tests check the protocol, the citations and the budgets — never the
wording — except that the phrase adapter makes the answer start with its phrase, which is how "chatting with the
adapter changes the answer" is seen.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from baton.clients.inference import InferenceClient
from baton.models.tiny import CHAT_PROMPTS, train_phrase_adapter
from services.gateway.chat.protocol import ChatCompletion, ChatCompletionChunk, ModelList
from tests.fixtures.gateway import GatewayHandle
from tests.fixtures.inference import PHRASE_A, InferenceHandle

pytestmark = pytest.mark.integration
# The packing test asks for whole chunks, as many as fit: the gateway's default source policy (a few best sources,
# focused on their sentences nearest the question: tuned for small models) would hide what the budget does.
WHOLE_SOURCES = {"sources": 0, "sentences": 0, "min_relative_score": 0}

MAX_MODEL_LEN = 1024
GARDEN = """# Growing tomatoes

Tomatoes need at least six hours of direct sunlight a day. Water them deeply twice a week, and add mulch to keep the
soil moist. Prune the suckers that grow between the stem and the branches.
"""
BREAD = """# Sourdough basics

A sourdough starter is a culture of wild yeast and lactic acid bacteria. Feed it flour and water every day, and bake
when it doubles in size within six hours.
"""
ORBITS = """# Comets

Halley's comet returns to the inner solar system every 76 years; its last visit was in 1986 and the next is due in
2061. Its nucleus is about fifteen kilometres long.
"""


def archive_text() -> str:
    """A long document of distinct paragraphs: many chunks to rank, merge and pack."""
    topics = ["lighthouses", "glaciers", "violins", "saffron", "tunnels", "kites", "clocks", "salt", "maps", "owls"]
    paragraphs = []
    for n, topic in enumerate(topics):
        sentences = [
            f"The {topic} ledger, entry {n}, records that the keeper counted {n * 13 + 7} {topic} in the valley.",
            f"Every spring the {topic} were inspected by the guild of Varnholm, founded in {1700 + n * 11}.",
            f"Notes on {topic} mention the river Oskel and the market town of Brennick several times.",
            f"A later hand added that the {topic} survey was repeated after the flood of {1800 + n * 7}.",
        ]
        paragraphs.append(f"## Ledger of {topic}\n\n" + " ".join(sentences))
    return "# The Varnholm archive\n\n" + "\n\n".join(paragraphs) + "\n"


@dataclass
class ChatStack:
    gateway: GatewayHandle
    inference: InferenceHandle
    base_model: str

    def client(self, tenant: str, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=self.gateway.key(tenant), **kwargs)

    def async_client(self, tenant: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.gateway.url}/v1", api_key=self.gateway.key(tenant))

    def headers(self, tenant: str) -> dict[str, str]:
        return self.gateway.headers(tenant)


@pytest.fixture(scope="module")
def chat_stack(embedder_service, tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatStack]:
    adapters = tmp_path_factory.mktemp("chat-adapters")
    train_phrase_adapter(tiny_llm, adapters / "phrase-a", phrase=PHRASE_A, seed=1)
    inference = InferenceHandle(
        "hf",
        tmp_path_factory.mktemp("chat-inference"),
        tiny_llm,
        adapters,
        scheduler=None,
        extra_args=["--max-model-len", str(MAX_MODEL_LEN)],
    )
    inference.start()
    asyncio.run(load_adapter(inference.target, "phrase-a"))
    gateway = GatewayHandle(
        home=tmp_path_factory.mktemp("chat-gateway"),
        allowed_root=tmp_path_factory.mktemp("chat-allowed"),
        embedder_addr=embedder_service.grpc_target,
        # Small chunks: a long document gives many to rank, merge and pack into the tiny model's context.
        extra_args=["--inference-addr", inference.target, "--chunk-tokens", "96", "--chunk-overlap-tokens", "16"],
    )
    gateway.start()
    yield ChatStack(gateway, inference, tiny_llm.name)
    gateway.stop()
    inference.stop()


async def load_adapter(target: str, name: str) -> None:
    # Not --load-adapters: the hf engine refuses it at start-up while it is not yet awake (reported).
    async with InferenceClient(target) as client:
        await client.load_adapter(name, name)


def new_tenant() -> str:
    return f"chat-{uuid.uuid4().hex[:10]}"


def upload(stack: ChatStack, tenant: str, files: list[tuple[str, str]]) -> dict[str, str]:
    """Ingest ``files``; returns file name → document id."""
    with stack.gateway.client(tenant) as client:
        report = client.upload_texts(files)
    return {Path(d["source"]).name: d["id"] for d in report["documents"]}


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


# ------------------------------------------------------------------------------------------------ models


def test_models_list_the_base_model_and_every_adapter(chat_stack: ChatStack) -> None:
    client = chat_stack.client(new_tenant())
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {chat_stack.base_model, "phrase-a"}
    base, adapter = models[chat_stack.base_model], models["phrase-a"]
    assert base.object == "model" and base.owned_by == "baton" and base.max_model_len == MAX_MODEL_LEN
    assert adapter.parent == chat_stack.base_model and adapter.baton["kind"] == "adapter"
    assert adapter.baton["rank"] == 8 and adapter.created > 0
    assert client.models.retrieve("phrase-a").id == "phrase-a"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"


# ------------------------------------------------------------------------------------------------ chat shapes


def test_sync_chat_cites_the_document_that_holds_the_answer(chat_stack: ChatStack) -> None:
    tenant = new_tenant()
    ids = upload(chat_stack, tenant, [("garden.md", GARDEN), ("bread.md", BREAD), ("comets.md", ORBITS)])
    client = chat_stack.client(tenant)
    completion = client.chat.completions.create(
        model=chat_stack.base_model,
        messages=ask("How often does Halley's comet come back to the inner solar system?"),
        max_tokens=12,
        temperature=0,
    )
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == chat_stack.base_model
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.completion_tokens <= 12 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    citations = completion.baton["citations"]
    first = citations[0]
    assert first["index"] == 1 and first["marker"] == "[1]"
    assert first["document_id"] == ids["comets.md"] and first["title"] == "Comets"
    assert first["chunk_id"].startswith(ids["comets.md"] + ":") and first["score"] > 0
    assert {"heading", "page", "source", "chunk_ids", "snippet", "cited"} <= set(first)
    assert [c["index"] for c in citations] == list(range(1, len(citations) + 1))
    rag = completion.baton["rag"]
    assert rag["packed"] == len(citations) and rag["prompt_tokens"] == usage.prompt_tokens, "the count is exact"


def test_packing_counts_with_the_served_tokenizer_in_the_gateway_and_stays_exact(chat_stack: ChatStack) -> None:
    """The gateway reads the inference service's model folder (same machine, same tokenizer hash): after the first
    chat loads it, packing counts without CountTokens — and its count is still the engine's own."""
    tenant = new_tenant()
    upload(chat_stack, tenant, [("comets.md", ORBITS), ("bread.md", BREAD)])
    client = chat_stack.client(tenant)
    deadline = time.monotonic() + 60
    while True:
        completion = client.chat.completions.create(
            model=chat_stack.base_model, messages=ask("What is a comet made of?"), max_tokens=4, temperature=0
        )
        rag = completion.baton["rag"]
        assert rag["prompt_tokens"] == completion.usage.prompt_tokens, rag["token_counts"]
        if rag["token_counts"] == "local":
            break
        assert rag["token_counts"] == "service" and time.monotonic() < deadline, "never counted locally"
        time.sleep(0.5)
    system = [{"role": "system", "content": "Answer in one word."}, *ask("How often does Halley's comet come back?")]
    completion = client.chat.completions.create(
        model=chat_stack.base_model,
        messages=system,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
    )
    rag = completion.baton["rag"]
    assert (rag["token_counts"], rag["prompt_tokens"]) == ("local", completion.usage.prompt_tokens)


def test_streaming_gives_the_same_answer_and_citations_in_the_last_chunk(chat_stack: ChatStack) -> None:
    tenant = new_tenant()
    ids = upload(chat_stack, tenant, [("garden.md", GARDEN), ("comets.md", ORBITS)])
    client = chat_stack.client(tenant)
    request = {"model": chat_stack.base_model, "messages": ask("How many hours of sun do tomatoes need?")}
    request |= {"max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content, "greedy: the stream and the whole answer agree"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.baton["citations"][0]["document_id"] == ids["garden.md"]
    assert last.baton["citations"] == whole.baton["citations"]
    assert all(getattr(c, "baton", None) is None for c in chunks[:-1]), "citations come once, at the end"
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing_and_documented_shapes(chat_stack: ChatStack) -> None:
    tenant = new_tenant()
    body = {"model": chat_stack.base_model, "messages": ask("Hello! Who are you?"), "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", f"{chat_stack.gateway.url}/v1/chat/completions", json=body, headers=chat_stack.headers(tenant)
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert payloads[-1]["baton"]["citations"] == [] and payloads[-1]["baton"]["rag"]["retrieved"] == 0
    for payload in payloads:
        ChatCompletionChunk.model_validate(payload)  # the documented shapes, exactly
    url, headers = f"{chat_stack.gateway.url}/v1/chat/completions", chat_stack.headers(tenant)
    ChatCompletion.model_validate(httpx.post(url, json=body | {"stream": False}, headers=headers).json())
    models = httpx.get(f"{chat_stack.gateway.url}/v1/models", headers=chat_stack.headers(tenant))
    ModelList.model_validate(models.json())


async def test_async_client_streams_and_not(chat_stack: ChatStack) -> None:
    tenant = new_tenant()
    ids = upload(chat_stack, tenant, [("bread.md", BREAD), ("garden.md", GARDEN)])
    client = chat_stack.async_client(tenant)
    request = {"model": chat_stack.base_model, "messages": ask("What do you feed a sourdough starter?")}
    request |= {"max_tokens": 10, "temperature": 0}
    whole = await client.chat.completions.create(**request)
    assert whole.baton["citations"][0]["document_id"] == ids["bread.md"]
    stream = await client.chat.completions.create(**request, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].baton["citations"][0]["document_id"] == ids["bread.md"]
    await client.close()


# ------------------------------------------------------------------------------------------------ adapters, rag


def test_an_adapter_changes_the_answer(chat_stack: ChatStack) -> None:
    client = chat_stack.client(new_tenant())
    request = {
        "messages": ask(CHAT_PROMPTS[0]),
        "max_tokens": 32,
        "temperature": 0,
        "extra_body": {"baton": {"rag": False}},
    }
    with_adapter = client.chat.completions.create(model="phrase-a", **request)
    base = client.chat.completions.create(model=chat_stack.base_model, **request)
    assert with_adapter.model == "phrase-a"
    assert with_adapter.choices[0].message.content.startswith(PHRASE_A)
    assert not base.choices[0].message.content.startswith(PHRASE_A)
    assert with_adapter.baton["rag"] is None and with_adapter.baton["citations"] == []


def test_grounding_decodes_against_the_question_without_its_sources(chat_stack: ChatStack) -> None:
    """With memory the gateway asks for context-aware decoding (the hf engine runs it) at its default weight; a
    request's baton.grounding sets the weight, 0 turns it off, and a weight changes the tiny model's answer — the
    contrast reached the engine. Without memory there is nothing to contrast."""
    tenant = new_tenant()
    upload(chat_stack, tenant, [("comets.md", ORBITS)])
    client = chat_stack.client(tenant)
    question = {"model": chat_stack.base_model, "messages": ask("When is Halley's comet due next?"), "max_tokens": 16,
                "temperature": 0}  # fmt: skip

    def answer(**baton: object) -> tuple[str, dict[str, Any] | None]:
        reply = client.chat.completions.create(**question, extra_body={"baton": baton})
        return reply.choices[0].message.content or "", reply.baton["rag"]

    default_text, default_rag = answer()
    off_text, off_rag = answer(grounding=0)
    strong_text, strong_rag = answer(grounding=4)
    assert (default_rag["grounding"], off_rag["grounding"], strong_rag["grounding"]) == (0.5, 0, 4)
    assert strong_text != off_text, "the contrast changes what the model says"
    assert answer(grounding=0.5)[0] == default_text, "greedy and contrastive: the same answer twice"
    assert answer(rag=False)[1] is None
    bad = httpx.post(f"{chat_stack.gateway.url}/v1/chat/completions", headers=chat_stack.headers(tenant),
                     json={**question, "baton": {"grounding": -1}})  # fmt: skip
    assert bad.status_code in (400, 422) and "grounding" in bad.text


def test_rag_off_collections_and_tenants(chat_stack: ChatStack) -> None:
    tenant, other = new_tenant(), new_tenant()
    with chat_stack.gateway.client(tenant) as client:
        client.upload_texts([("garden.md", GARDEN)], collection="plants")
        client.upload_texts([("comets.md", ORBITS)], collection="sky")
    question = {"model": chat_stack.base_model, "messages": ask("When is Halley's comet due next?"), "max_tokens": 4}
    mine = chat_stack.client(tenant)
    sky = mine.chat.completions.create(**question, extra_body={"baton": {"collection": "sky"}})
    assert {c["collection"] for c in sky.baton["citations"]} == {"sky"}
    plants = mine.chat.completions.create(**question, extra_body={"baton": {"collection": "plants", "k": 1}})
    assert [c["title"] for c in plants.baton["citations"]] == ["Growing tomatoes"] and plants.baton["rag"][
        "retrieved"
    ] == 1
    off = mine.chat.completions.create(**question, extra_body={"baton": {"rag": False}})
    assert off.baton["citations"] == [] and off.usage.prompt_tokens < sky.usage.prompt_tokens
    theirs = chat_stack.client(other).chat.completions.create(**question)
    assert theirs.baton["citations"] == [], "another tenant's memory is never used"


def test_packing_fits_the_budget_and_keeps_the_best_chunks(chat_stack: ChatStack) -> None:
    tenant = new_tenant()
    upload(chat_stack, tenant, [("archive.md", archive_text()), ("garden.md", GARDEN)])
    question = "What did the guild of Varnholm inspect every spring near the river Oskel?"
    k, max_tokens = 10, 200  # the tenant has 11 chunks
    client = chat_stack.client(tenant)
    completion = client.chat.completions.create(
        model=chat_stack.base_model,
        messages=[{"role": "system", "content": "Be brief."}, *ask(question)],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"baton": {"k": k, **WHOLE_SOURCES}},
    )
    rag, citations = completion.baton["rag"], completion.baton["citations"]
    assert completion.usage.prompt_tokens + max_tokens <= MAX_MODEL_LEN, "the engine's own count, within budget"
    assert rag["prompt_tokens"] == completion.usage.prompt_tokens and rag["reserved_tokens"] == max_tokens
    assert rag["retrieved"] == k and 0 < rag["packed"] < k, ("the budget holds some chunks, not all", rag)
    with httpx.Client(headers=chat_stack.headers(tenant)) as http:
        hits = http.post(f"{chat_stack.gateway.url}/v1/search", json={"query": question, "k": k}).json()["hits"]
    scores = {hit["chunk_id"]: hit["score"] for hit in hits}
    packed = {chunk for citation in citations for chunk in citation["chunk_ids"]}
    left_out = set(scores) - packed
    assert citations[0]["chunk_id"] == hits[0]["chunk_id"], "[1] is the best hit"
    assert min(scores[c] for c in packed) >= max(scores[c] for c in left_out), "a best-first prefix is kept"
    assert [c["score"] for c in citations] == sorted((c["score"] for c in citations), reverse=True)
    # More room for sources when less is reserved for the answer.
    roomier = client.chat.completions.create(
        model=chat_stack.base_model,
        messages=ask(question),
        max_tokens=16,
        extra_body={"baton": {"k": k, **WHOLE_SOURCES}},
    )
    assert roomier.usage.prompt_tokens + 16 <= MAX_MODEL_LEN
    assert roomier.usage.prompt_tokens > completion.usage.prompt_tokens


# ------------------------------------------------------------------------------------------------ errors


def test_errors_come_in_openai_shape(chat_stack: ChatStack) -> None:
    client = chat_stack.client(new_tenant(), max_retries=0)
    base = chat_stack.base_model
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nobody", messages=ask("hi"), max_tokens=4)
    assert unknown.value.body["code"] == "model_not_found" and "GET /v1/models" in unknown.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.chat.completions.create(model=base, messages=ask("hi"), max_tokens=MAX_MODEL_LEN)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.UnprocessableEntityError) as hot:
        client.chat.completions.create(model=base, messages=ask("hi"), temperature=7)
    assert hot.value.body["param"] == "temperature" and hot.value.body["type"] == "invalid_request_error"
    for bad in ({"n": 2}, {"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                {"extra_body": {"baton": {"rag": True, "typo": 1}}}, {"stop": [""]}, {"logprobs": True},
                {"tools": [{"type": "function", "function": {"name": "f"}}]},
                {"response_format": {"type": "json_object"}}):  # fmt: skip
        request = {"model": base, "messages": ask("hi"), "max_tokens": 4} | bad
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(**request)
    no_key = openai.OpenAI(base_url=f"{chat_stack.gateway.url}/v1", api_key="bt_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        no_key.chat.completions.create(model=base, messages=ask("hi"))
    assert refused.value.body["type"] == "authentication_error"
    raw = httpx.post(f"{chat_stack.gateway.url}/v1/models", headers=chat_stack.headers(new_tenant()))
    assert raw.status_code == 405


def test_inference_down_is_503_in_openai_shape(chat_stack: ChatStack, tmp_path: Path, embedder_service) -> None:
    dead = GatewayHandle(
        home=tmp_path / "gw",
        allowed_root=tmp_path,
        embedder_addr=embedder_service.grpc_target,
        extra_args=["--inference-addr", "127.0.0.1:9"],
    )
    dead.home.mkdir()
    dead.start()
    try:
        response = httpx.post(
            f"{dead.url}/v1/chat/completions",
            json={"model": "x", "messages": ask("hi")},
            headers=dead.headers(new_tenant()),
        )
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        error = response.json()["error"]
        assert error["code"] == "inference_unreachable" and "BATON_GATEWAY_INFERENCE_ADDR" in error["message"]
        assert httpx.get(f"{dead.url}/health").status_code == 200, "memory still works without inference"
    finally:
        dead.stop()


def test_a_client_that_leaves_stops_the_generation(chat_stack: ChatStack) -> None:
    body = {"model": chat_stack.base_model, "messages": ask(CHAT_PROMPTS[2]), "max_tokens": 900, "temperature": 0}
    body |= {"stream": True, "baton": {"rag": False}}
    url = f"{chat_stack.gateway.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=chat_stack.headers(new_tenant()), timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert asyncio.run(running_requests(chat_stack.inference.target)) == 1
    deadline = time.monotonic() + 5
    while asyncio.run(running_requests(chat_stack.inference.target)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert asyncio.run(running_requests(chat_stack.inference.target)) == 0, "900 tokens take seconds; it stopped"


async def running_requests(target: str) -> int:
    async with InferenceClient(target) as client:
        return (await client.health()).running_requests
