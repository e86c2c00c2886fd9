"""Hybrid fusion: relative-score and reciprocal-rank fusion, and the vector weight that gates a blind dense side."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from baton.store.fusion import (
    COVERED_VECTOR_WEIGHT,
    FLAT_BM25_VECTOR_WEIGHT,
    FusionMethod,
    bm25_weakness,
    choose_vector_weight,
    dense_flatness_z,
    fuse,
    language_covered,
    min_max_normalise,
    reciprocal_rank_fusion,
    relative_score_fusion,
)

CLEAR_WINNER = [0.9, *np.linspace(0.40, 0.30, 60).tolist()]  # z ≈ 30: the model tells the candidates apart
FLAT = np.linspace(0.62, 0.58, 61).tolist()  # z ≈ 1.7: everything looks alike


def test_min_max_normalise() -> None:
    assert min_max_normalise({"a": 2.0, "b": 4.0, "c": 3.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    assert min_max_normalise({"a": 5.0, "b": 5.0}) == {"a": 1.0, "b": 1.0}
    assert min_max_normalise({}) == {}


def test_relative_score_fusion_mixes_normalised_scores() -> None:
    fused = relative_score_fusion({"a": 0.9, "b": 0.5}, {"b": 12.0, "c": 4.0}, vector_weight=0.6)
    assert fused == pytest.approx({"a": 0.6, "b": 0.4, "c": 0.0})


def test_rrf_values_and_weights() -> None:
    fused = reciprocal_rank_fusion(["a", "b"], ["b", "c"], vector_weight=0.5)
    assert fused["b"] == pytest.approx(0.5 / 62 + 0.5 / 61)
    assert fused["a"] == pytest.approx(0.5 / 61)
    assert fused["c"] == pytest.approx(0.5 / 62)


@pytest.mark.parametrize("method", list(FusionMethod))
def test_weight_zero_ranks_as_bm25_and_one_as_vector(method: FusionMethod) -> None:
    vector = {"a": 0.9, "b": 0.8, "c": 0.1}
    bm25 = {"c": 9.0, "b": 3.0, "d": 1.0}
    assert [key for key, _ in fuse(vector, bm25, 0.0, method)][:3] == ["c", "b", "d"]
    assert [key for key, _ in fuse(vector, bm25, 1.0, method)][:3] == ["a", "b", "c"]


def test_ties_are_broken_deterministically() -> None:
    first = fuse({"x": 0.5, "y": 0.5}, {}, 1.0)
    second = fuse({"y": 0.5, "x": 0.5}, {}, 1.0)
    assert first == second


def test_fusion_rejects_a_weight_outside_0_1() -> None:
    with pytest.raises(ValueError, match=r"0\.\.1"):
        fuse({"a": 1.0}, {"a": 1.0}, 1.5)


@given(
    st.dictionaries(st.integers(0, 40), st.floats(-1, 1), max_size=30),
    st.dictionaries(st.integers(0, 40), st.floats(0.01, 50), min_size=1, max_size=30),
)
def test_gated_hybrid_keeps_the_bm25_order_for_any_scores(vector: dict, bm25: dict) -> None:
    fused = [key for key, _ in fuse(vector, bm25, 0.0)]
    head = fused[: len(bm25)]
    assert set(head) == set(bm25)  # every BM25 candidate before any vector-only one
    assert [bm25[key] for key in head] == sorted(bm25.values(), reverse=True)  # in BM25's order


def test_flatness_tells_an_informative_dense_side_from_a_blind_one() -> None:
    assert dense_flatness_z(CLEAR_WINNER) > 10
    assert dense_flatness_z(FLAT) < 2.5
    assert dense_flatness_z([0.5, 0.4]) is None  # too few candidates to judge


@pytest.mark.parametrize(
    ("language", "declared", "covered"),
    [("ru", ["en"], False), ("en", ["en"], True), ("ru", ["*"], True), ("ru", ["EN", "RU"], True), ("ru", [], None)],
)
def test_language_covered(language: str, declared: list[str], covered: bool | None) -> None:
    assert language_covered(language, declared) is covered


def test_a_language_the_embedder_does_not_declare_gates_the_dense_side_off() -> None:
    assert choose_vector_weight("философия свобода", ["en"], CLEAR_WINNER) == 0.0


def test_a_declared_language_gets_the_covered_weight() -> None:
    assert choose_vector_weight("what is philosophy of freedom", ["en"], FLAT) == COVERED_VECTOR_WEIGHT
    assert choose_vector_weight("философия свобода", ["*"], FLAT) == COVERED_VECTOR_WEIGHT


def test_a_covered_query_leans_on_the_dense_side_when_bm25_has_no_clear_winner() -> None:
    question = "what keeps a bridge from swaying"
    decisive_bm25 = [12.0, *np.linspace(3.0, 2.0, 60).tolist()]  # one passage shares the rare words
    flat_bm25 = np.linspace(2.6, 2.2, 61).tolist()  # a paraphrase: many passages share a common word or two
    assert bm25_weakness(decisive_bm25) == 0.0
    assert bm25_weakness(flat_bm25) == 1.0
    assert bm25_weakness([]) == 1.0  # no word of the query is in the texts (another language)
    assert bm25_weakness([3.0, 2.0]) == 0.0  # too few to judge: the covered weight stands
    assert choose_vector_weight(question, ["en"], FLAT, bm25_scores=decisive_bm25) == COVERED_VECTOR_WEIGHT
    assert choose_vector_weight(question, ["en"], FLAT, bm25_scores=flat_bm25) == FLAT_BM25_VECTOR_WEIGHT
    assert choose_vector_weight(question, ["en"], FLAT, bm25_scores=[]) == FLAT_BM25_VECTOR_WEIGHT
    middle = choose_vector_weight(question, ["en"], FLAT, bm25_scores=[2.75, *np.linspace(2.6, 2.2, 60).tolist()])
    assert COVERED_VECTOR_WEIGHT < middle < FLAT_BM25_VECTOR_WEIGHT
    # A language the embedder does not cover stays gated, however flat BM25 is.
    assert choose_vector_weight("философия свобода", ["en"], CLEAR_WINNER, bm25_scores=flat_bm25) == 0.0


def test_undeclared_languages_fall_back_to_the_score_distribution() -> None:
    assert choose_vector_weight("философия свобода", [], FLAT) == 0.0
    assert choose_vector_weight("философия свобода", [], CLEAR_WINNER) == COVERED_VECTOR_WEIGHT
    middle = choose_vector_weight("философия свобода", [], [0.7, *np.linspace(0.5, 0.3, 50).tolist()])
    assert 0.0 <= middle <= COVERED_VECTOR_WEIGHT


def test_a_query_without_letters_is_judged_by_its_scores() -> None:
    assert choose_vector_weight("1812", ["en"], FLAT) == 0.0
    assert choose_vector_weight("1812", ["en"], CLEAR_WINNER) == COVERED_VECTOR_WEIGHT
    assert choose_vector_weight("1812", ["en"], []) == COVERED_VECTOR_WEIGHT
