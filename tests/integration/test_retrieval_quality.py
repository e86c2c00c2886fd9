"""Retrieval quality on real benchmarks, through the whole path (upload → parse → chunk → embed → store → search).

Reads ../shared/data (never copied into the project). The thresholds are issue 3's: XQuAD-en hybrid recall@10
>= 0.97; SciFact hybrid nDCG@10 >= 0.70 and BM25 within 0.02 of 0.665.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from baton.beir import BeirDataset, evaluate, upload_corpus
from tests.conftest import REPO_ROOT
from tests.fixtures.gateway import GatewayHandle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

DATA = Path(os.environ.get("BATON_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def dataset(name: str) -> BeirDataset:
    folder = DATA / name
    assert (folder / "corpus.jsonl").exists(), f"benchmark data missing at {folder} (see ../shared/data/README.md)"
    return BeirDataset.load(folder)


def test_xquad_hybrid_recall_at_10(gateway_service: GatewayHandle) -> None:
    data = dataset("xquad-en")
    with gateway_service.client("eval-xquad") as client:
        upload_corpus(client, data, lambda _: None)
        scores = {mode: evaluate(client, data, mode) for mode in ("bm25", "vector", "hybrid")}
    for mode, score in scores.items():
        print(f"xquad-en {mode}: nDCG@10 {score.ndcg_at_10:.4f} recall@10 {score.recall_at_10:.4f}")
    assert scores["hybrid"].recall_at_10 >= 0.97
    assert scores["hybrid"].ndcg_at_10 >= max(scores["bm25"].ndcg_at_10, scores["vector"].ndcg_at_10) - 0.005


@pytest.mark.eval  # ~10 min of embedding on 2 CPU cores: `make eval` runs it; `make test` keeps XQuAD as the guard
def test_scifact_hybrid_ndcg_at_10(gateway_service: GatewayHandle) -> None:
    data = dataset("scifact")
    with gateway_service.client("eval-scifact") as client:
        upload_corpus(client, data, lambda _: None)
        scores = {mode: evaluate(client, data, mode) for mode in ("bm25", "vector", "hybrid")}
    for mode, score in scores.items():
        print(f"scifact {mode}: nDCG@10 {score.ndcg_at_10:.4f} recall@100 {score.recall_at_100:.4f}")
    assert scores["hybrid"].ndcg_at_10 >= 0.70
    assert abs(scores["bm25"].ndcg_at_10 - 0.665) <= 0.02
