"""Retrieval metrics over BEIR qrels (nDCG@k, recall@k, MRR), checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from baton.store.evaluation import mean_reciprocal_rank, ndcg_at_k, query_ndcg, recall_at_k

QRELS = {"q1": {"d1": 1, "d2": 1}, "q2": {"d9": 2, "d8": 1}}


def test_perfect_ranking_scores_one() -> None:
    runs = {"q1": ["d1", "d2", "x"], "q2": ["d9", "d8"]}
    assert ndcg_at_k(runs, QRELS, 10) == pytest.approx(1.0)
    assert recall_at_k(runs, QRELS, 10) == 1.0
    assert mean_reciprocal_rank(runs, QRELS, 10) == 1.0


def test_ndcg_uses_linear_gains_and_log2_discounts() -> None:
    # d8 (grade 1) at rank 1, d9 (grade 2) at rank 3: DCG = 1 + 2/log2(4); ideal = 2 + 1/log2(3).
    expected = (1 + 2 / 2) / (2 + 1 / math.log2(3))
    assert query_ndcg(["d8", "x", "d9"], QRELS["q2"], 10) == pytest.approx(expected)


def test_cutoff_and_reciprocal_rank() -> None:
    runs = {"q1": ["x", "y", "d1"], "q2": ["x", "d9"]}
    assert recall_at_k(runs, QRELS, 2) == pytest.approx((0 + 0.5) / 2)
    assert mean_reciprocal_rank(runs, QRELS, 10) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert mean_reciprocal_rank(runs, QRELS, 2) == pytest.approx((0 + 1 / 2) / 2)


def test_a_document_retrieved_twice_counts_once() -> None:
    # Two chunks of d1 before d2: d2 is the second distinct document, not the third hit.
    assert ndcg_at_k({"q1": ["d1", "d1", "d2"]}, {"q1": QRELS["q1"]}, 2) == pytest.approx(1.0)


def test_missing_runs_score_zero_and_unjudged_queries_are_left_out() -> None:
    qrels = {**QRELS, "q3": {"d5": 0}}
    assert ndcg_at_k({"q1": ["d1", "d2"]}, qrels, 10) == pytest.approx(0.5)


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k({}, QRELS, 0)
