"""Retrieval evaluation on BEIR-layout data (corpus.jsonl, queries.jsonl, qrels/test.tsv) through the gateway.

The corpus is uploaded as one text file per document (``<id>.txt``: title line, blank line, text), so the
measurement covers the whole path a user's documents take: parse, clean, chunk, embed, store, retrieve. A
document may be split into several chunks; hits are folded to documents by their best-ranked chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from baton.clients.gateway import GatewayClient
from baton.store.evaluation import mean_reciprocal_rank, ndcg_at_k, recall_at_k

UPLOAD_BATCH = 64


@dataclass(frozen=True)
class BeirDataset:
    name: str
    corpus: dict[str, tuple[str, str]]  # id -> (title, text)
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}

    @classmethod
    def load(cls, folder: Path, *, split: str = "test", max_queries: int | None = None) -> BeirDataset:
        corpus = {row["_id"]: (row.get("title", ""), row["text"]) for row in _jsonl(folder / "corpus.jsonl")}
        qrels: dict[str, dict[str, int]] = {}
        lines = (folder / "qrels" / f"{split}.tsv").read_text().splitlines()
        for line in lines[1:]:
            query_id, doc_id, score = line.split("\t")
            if int(score) > 0:
                qrels.setdefault(query_id, {})[doc_id] = int(score)
        queries = {row["_id"]: row["text"] for row in _jsonl(folder / "queries.jsonl") if row["_id"] in qrels}
        if max_queries is not None:
            queries = dict(list(queries.items())[:max_queries])
        return cls(folder.name, corpus, queries, {q: qrels[q] for q in queries})


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def upload_corpus(client: GatewayClient, dataset: BeirDataset, on_batch: Callable[[int], None]) -> None:
    batch: list[tuple[str, str]] = []
    for doc_id, (title, text) in dataset.corpus.items():
        batch.append((f"{doc_id}.txt", f"{title}\n\n{text}" if title else text))
        if len(batch) == UPLOAD_BATCH:
            client.upload_texts(batch, collection=dataset.name)
            on_batch(len(batch))
            batch = []
    if batch:
        client.upload_texts(batch, collection=dataset.name)
        on_batch(len(batch))


def rank_documents(client: GatewayClient, dataset: BeirDataset, query: str, mode: str, depth: int) -> list[str]:
    """Document ids, best first, from the top ``depth`` chunks."""
    # The tenant holds only this dataset, so no collection filter is needed (filters take a slower path).
    hits = client.search(query, k=depth, mode=mode)["hits"]
    ranked: list[str] = []
    for hit in hits:
        doc_id = Path(str(hit["source"])).name.removesuffix(".txt")
        if doc_id not in ranked:
            ranked.append(doc_id)
    return ranked


@dataclass(frozen=True)
class ModeScores:
    mode: str
    ndcg_at_10: float
    recall_at_10: float
    recall_at_100: float
    mrr_at_10: float


def evaluate(
    client: GatewayClient, dataset: BeirDataset, mode: str, *, depth: int = 200, concurrency: int = 4
) -> ModeScores:
    def run(item: tuple[str, str]) -> tuple[str, list[str]]:
        return item[0], rank_documents(client, dataset, item[1], mode, depth)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:  # the gateway serves searches concurrently
        runs = dict(pool.map(run, dataset.queries.items()))
    return ModeScores(
        mode=mode,
        ndcg_at_10=ndcg_at_k(runs, dataset.qrels, 10),
        recall_at_10=recall_at_k(runs, dataset.qrels, 10),
        recall_at_100=recall_at_k(runs, dataset.qrels, 100),
        mrr_at_10=mean_reciprocal_rank(runs, dataset.qrels, 10),
    )
