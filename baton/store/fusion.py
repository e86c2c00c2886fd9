"""Hybrid fusion shared by every store backend, so that the same query ranks alike on each of them.

Two fusions of a vector ranking and a BM25 ranking:

- relative-score fusion (the default): each side's scores are min-max normalised over the candidates and mixed
  convexly, ``w * vector + (1 - w) * bm25`` (Weaviate's ``relativeScoreFusion``). It keeps how far apart the
  candidates are, which plain ranks throw away. A backend takes ``HYBRID_CANDIDATE_DEPTH`` candidates from each side
  and gives every candidate both scores before fusing: the exact cosine of a BM25-only one, and BM25's floor, 0, to
  a vector-only one outside BM25's list (its true BM25 changed SciFact nDCG@10 by 0.0002). A side that lacks a
  candidate gives it 0.
- reciprocal-rank fusion: ``w / (c + rank_vector) + (1 - w) / (c + rank_bm25)``, ``c = 60`` (Cormack et al.).

Either way the weight ``w`` of the vector side is what matters, and ``choose_vector_weight`` decides it. A dense
model is blind to a language it was not trained on: measured on a Russian question set with the English-only
MiniLM, BM25 scored nDCG@10 0.87, dense 0.18 and naive RRF 0.48 — the noise of the blind side drowned BM25. So the
weight is 0 when the query's language is not among the embedder's declared languages (hybrid then ranks exactly as
BM25 does), and when the embedder's languages are not declared it shrinks with the flatness of the dense scores
(top hit no better than the crowd: the model cannot tell the candidates apart).

Measured on MiniLM through the embedded store (nDCG@10; relative-score fusion over the top 100 of each side, every
candidate scored on both, w = 0.6), BM25 / dense / hybrid (naive RRF): SciFact 0.689 / 0.645 / 0.734 (0.711);
XQuAD-en 0.970 / 0.942 / 0.983 (0.969); the Russian set of tests/fixtures/store.py 0.951 / 0.392 / 0.951 (0.824).

A good multilingual dense side (multilingual-e5-small, issue 15) turns the weakness around: on paraphrased Russian
questions (tests/data/ru-retrieval) BM25 scored 0.612, dense 0.894, and w = 0.6 hybrid 0.873 — BM25's share let
passages that merely share a word outrank the answer. So a covered query's weight also reads BM25's own flatness
(``bm25_weakness``): 0.6 while BM25 has a clear winner, up to 0.9 when it has none. With it, in-process, one vector
per document, nDCG@10 (w = 0.6 in brackets): e5 on that set's paraphrases 0.912 (0.873), on all 100 questions
0.925 (0.909; BM25 0.505, dense 0.918); e5 on XQuAD-en 0.988 (0.987); MiniLM on XQuAD-en 0.982 (0.983) and on
SciFact 0.736 (0.734).
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from baton.store.analysis import UNDETERMINED, detect_language

K = TypeVar("K", bound=Hashable)

RRF_RANK_CONSTANT = 60
HYBRID_CANDIDATE_DEPTH = 100
# The vector weight for a query in a language the embedder covers. On SciFact nDCG@10 is flat (±0.004) for
# w = 0.4–0.6 and XQuAD-en peaks at 0.6; the English set of the conformance tests needs >= 0.6, where short
# queries whose only BM25 matches are function words ("tallest peak in the world") stop outranking the dense hit.
COVERED_VECTOR_WEIGHT = 0.6
# Dense score flatness: the top cosine's distance from the mean of the next ``FLATNESS_DEPTH`` candidates, in
# standard deviations. A covered language gives a clear winner (median: SciFact 4.3, XQuAD 5.2; 10th percentile
# 3.0 and 3.6); MiniLM on Russian gives 2.3 (10th–90th percentile 1.9–3.3). Used only when the embedder's
# languages are not declared: below ``BLIND_Z`` the dense side is treated as noise, above ``INFORMATIVE_Z`` it is
# trusted fully, linear in between. (For a declared, covered language it cost 0.001–0.015 nDCG@10, so it is off.)
FLATNESS_DEPTH = 50
BLIND_Z = 2.5
INFORMATIVE_Z = 4.0
# The mirror image, for the BM25 side of a covered language: a query that shares few words with its answer (a
# paraphrase; a question in another language than the texts) gives BM25 no clear winner, only passages that happen to
# share a word — with multilingual-e5 on tests/data/ru-retrieval, BM25's top stood out by a median z of 3.5 for
# paraphrases and 0 for cross-lingual questions, against 16.5 for questions that reuse the passage's words and 9.3 on
# XQuAD-en (10th percentile 5.1). Below ``BM25_DECISIVE_Z`` the vector weight rises linearly, up to
# ``FLAT_BM25_VECTOR_WEIGHT`` at ``BM25_FLAT_Z`` and below; BM25 keeps a say, never the last word. Chosen over
# (6, 3.5, 0.85), (5, 3, 0.85), (5, 3, 0.8) and (4.5, 2.5, 0.85) as the best or within 0.0003 of the best on each of
# SciFact (MiniLM), XQuAD-en (MiniLM and e5) and the Russian set (e5).
BM25_DECISIVE_Z = 4.0
BM25_FLAT_Z = 2.0
FLAT_BM25_VECTOR_WEIGHT = 0.9
ALL_LANGUAGES = "*"


class FusionMethod(enum.StrEnum):
    RELATIVE_SCORE = "relative_score"
    RRF = "rrf"


def ranking(scores: Mapping[K, float]) -> list[K]:
    """Keys best first; ties broken by the key so the order is deterministic across backends."""
    return sorted(scores, key=lambda key: (-scores[key], str(key)))


def min_max_normalise(scores: Mapping[K, float]) -> dict[K, float]:
    """Scores mapped to 0..1 over the candidates given; all-equal scores map to 1 (every candidate is the best)."""
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    if high - low <= 1e-12:
        return dict.fromkeys(scores, 1.0)
    return {key: (value - low) / (high - low) for key, value in scores.items()}


def relative_score_fusion(
    vector_scores: Mapping[K, float], bm25_scores: Mapping[K, float], vector_weight: float = 0.5
) -> dict[K, float]:
    """``w * norm(vector) + (1 - w) * norm(bm25)``; a candidate missing from one side gets 0 there."""
    _check_weight(vector_weight)
    vector_norm = min_max_normalise(vector_scores)
    bm25_norm = min_max_normalise(bm25_scores)
    keys = list(dict.fromkeys([*bm25_norm, *vector_norm]))
    return {
        key: vector_weight * vector_norm.get(key, 0.0) + (1.0 - vector_weight) * bm25_norm.get(key, 0.0) for key in keys
    }


def reciprocal_rank_fusion(
    vector_ranking: Sequence[K],
    bm25_ranking: Sequence[K],
    vector_weight: float = 0.5,
    rank_constant: int = RRF_RANK_CONSTANT,
) -> dict[K, float]:
    """``w / (c + rank_v) + (1 - w) / (c + rank_b)`` with 1-based ranks; a side that lacks a key adds 0."""
    _check_weight(vector_weight)
    fused: dict[K, float] = {}
    for weight, ranked in ((1.0 - vector_weight, bm25_ranking), (vector_weight, vector_ranking)):
        for rank, key in enumerate(ranked, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (rank_constant + rank)
    return fused


def fuse(
    vector_scores: Mapping[K, float],
    bm25_scores: Mapping[K, float],
    vector_weight: float,
    method: FusionMethod = FusionMethod.RELATIVE_SCORE,
) -> list[tuple[K, float]]:
    """Fused (key, score) pairs, best first. With ``vector_weight == 0`` the order is BM25's, then vector-only
    candidates; with 1 it is the vector order, then BM25-only candidates."""
    if method is FusionMethod.RRF:
        fused = reciprocal_rank_fusion(ranking(vector_scores), ranking(bm25_scores), vector_weight)
    else:
        fused = relative_score_fusion(vector_scores, bm25_scores, vector_weight)
    # Ties (w = 0 puts BM25's last candidate and every vector-only one at 0) go to the side that carries the
    # weight: its candidates first, in its order; then the other side's order; then the key, for determinism.
    primary, secondary = (bm25_scores, vector_scores) if vector_weight < 0.5 else (vector_scores, bm25_scores)
    missing = float("inf")

    def order(item: tuple[K, float]) -> tuple[float, bool, float, float, str]:
        key, score = item
        return (-score, key not in primary, -primary.get(key, -missing), -secondary.get(key, -missing), str(key))

    return sorted(fused.items(), key=order)


def dense_flatness_z(vector_scores: Sequence[float] | np.ndarray, depth: int = FLATNESS_DEPTH) -> float | None:
    """How far the best cosine stands above the next ``depth`` candidates, in standard deviations; None when
    there are too few candidates (< 5) to say."""
    scores = np.sort(np.asarray(vector_scores, dtype=np.float64))[::-1][: depth + 1]
    if scores.size < 5:
        return None
    rest = scores[1:]
    spread = float(rest.std())
    if spread <= 1e-9:
        return 0.0 if scores[0] - rest.mean() <= 1e-9 else float("inf")
    return float((scores[0] - rest.mean()) / spread)


def language_covered(language: str, embedder_languages: Sequence[str]) -> bool | None:
    """True/False when the embedder's languages are declared and the query's language is known; None otherwise."""
    if not embedder_languages or language == UNDETERMINED:
        return None
    declared = {code.lower() for code in embedder_languages}
    return ALL_LANGUAGES in declared or language in declared


def choose_vector_weight(
    query_text: str,
    embedder_languages: Sequence[str],
    vector_scores: Sequence[float] | np.ndarray = (),
    *,
    bm25_scores: Sequence[float] | np.ndarray | None = None,
    covered_weight: float = COVERED_VECTOR_WEIGHT,
    blind_z: float = BLIND_Z,
    informative_z: float = INFORMATIVE_Z,
) -> float:
    """The weight of the vector side for this query, 0..1.

    - The embedder declares its languages and the query's is not among them: 0 (a blind dense side, gated off).
    - It declares them and the query's is among them: ``covered_weight``, raised towards
      ``FLAT_BM25_VECTOR_WEIGHT`` when BM25 has no clear winner (``bm25_weakness`` of the top ``bm25_scores``).
    - Otherwise (languages not declared, or no letters in the query): ``covered_weight`` scaled by how informative
      the dense scores are (``dense_flatness_z`` of the top ``vector_scores``), 0 when they are flat.
    """
    _check_weight(covered_weight)
    covered = language_covered(detect_language(query_text), embedder_languages)
    if covered is not None:
        if not covered:
            return 0.0
        weakness = 0.0 if bm25_scores is None else bm25_weakness(bm25_scores)
        return covered_weight + (max(covered_weight, FLAT_BM25_VECTOR_WEIGHT) - covered_weight) * weakness
    z = dense_flatness_z(vector_scores)
    if z is None:
        return covered_weight
    trust = (z - blind_z) / (informative_z - blind_z)
    return covered_weight * float(min(1.0, max(0.0, trust)))


def bm25_weakness(bm25_scores: Sequence[float] | np.ndarray) -> float:
    """0 when BM25's best candidate stands out (``BM25_DECISIVE_Z`` or more), 1 when it does not (``BM25_FLAT_Z`` or
    less, or no match at all), linear in between; 0 when there are too few candidates to judge (< 5) but some."""
    scores = np.asarray(bm25_scores, dtype=np.float64)
    if scores.size == 0:
        return 1.0  # no word of the query is in the texts: BM25 has nothing to say
    z = dense_flatness_z(scores)
    if z is None:
        return 0.0
    return float(min(1.0, max(0.0, (BM25_DECISIVE_Z - z) / (BM25_DECISIVE_Z - BM25_FLAT_Z))))


def _check_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the vector weight must be within 0..1 (got {weight})")
