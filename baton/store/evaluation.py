"""Retrieval metrics over BEIR-style qrels, as pure functions (no I/O), so every caller scores alike.

``runs`` maps a query id to document ids ranked best first; ``qrels`` maps a query id to ``{document id: graded
relevance}``. Means are taken over the queries in ``qrels`` that have at least one relevant document (as BEIR and
pytrec_eval do); a query with no run scores 0. nDCG uses linear gains (pytrec_eval's ``ndcg_cut``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

Run = Sequence[str]
Runs = Mapping[str, Run]
Qrel = Mapping[str, int]
Qrels = Mapping[str, Qrel]


def _dedupe(ranked: Run, k: int) -> list[str]:
    """The first ``k`` distinct ids: a document retrieved twice (two chunks) counts once, at its best rank."""
    return list(dict.fromkeys(ranked))[:k]


def query_ndcg(ranked: Run, relevant: Qrel, k: int) -> float:
    gains = [relevant.get(doc_id, 0) for doc_id in _dedupe(ranked, k)]
    dcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains) if gain > 0)
    ideal = sorted((grade for grade in relevant.values() if grade > 0), reverse=True)[:k]
    idcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def query_recall(ranked: Run, relevant: Qrel, k: int) -> float:
    wanted = {doc_id for doc_id, grade in relevant.items() if grade > 0}
    if not wanted:
        return 0.0
    return len(wanted.intersection(_dedupe(ranked, k))) / len(wanted)


def query_reciprocal_rank(ranked: Run, relevant: Qrel, k: int) -> float:
    for rank, doc_id in enumerate(_dedupe(ranked, k)):
        if relevant.get(doc_id, 0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def _mean(metric: Callable[[Run, Qrel, int], float], runs: Runs, qrels: Qrels, k: int) -> float:
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    judged = [query_id for query_id, relevant in qrels.items() if any(grade > 0 for grade in relevant.values())]
    if not judged:
        return 0.0
    return sum(metric(runs.get(query_id, ()), qrels[query_id], k) for query_id in judged) / len(judged)


def ndcg_at_k(runs: Runs, qrels: Qrels, k: int = 10) -> float:
    return _mean(query_ndcg, runs, qrels, k)


def recall_at_k(runs: Runs, qrels: Qrels, k: int = 10) -> float:
    return _mean(query_recall, runs, qrels, k)


def mean_reciprocal_rank(runs: Runs, qrels: Qrels, k: int = 10) -> float:
    return _mean(query_reciprocal_rank, runs, qrels, k)
