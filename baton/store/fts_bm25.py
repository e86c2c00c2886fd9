"""BM25 top-k for the embedded store, over one SQLite FTS5 table per tenant.

The FTS5 tables hold the analysed text (``analysis.index_text``: stemmed, space-separated terms) and score with
FTS5's ``bm25()`` (k1 = 1.2, b = 0.75). An OR query makes FTS5 score every row that holds any query term, which is
what costs at a million chunks: a term in 40 % of the rows means 400,000 rows scored. Two cuts, both exact:

- a term in half the rows or more has FTS5's floor IDF (1e-6): it adds nothing, so it is not matched at all
  (unless every query term is like that);
- max-score: frequent terms (in ``FREQUENT_TERM_SHARE`` of the rows or more) are left out of the MATCH. FTS5 ranks
  the rows holding a rarer term; their frequent-term shares are added here from the rows' terms, with FTS5's
  formula (``analysis.bm25_*``); and the result is kept only when it is provably the true top-k — no row left
  unscored could reach the k-th score even with the frequent terms' upper bound. Otherwise: the full OR query.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from baton.store.analysis import bm25_idf, bm25_term_score, bm25_upper_bound, fts5_match_expression

FREQUENT_TERM_SHARE = 0.05
MAX_SCORE_MIN_ROWS = 20_000  # below this, FTS5 scores everything fast enough
MAX_SCORE_DEPTH_FACTOR = 4  # rows ranked by the rare terms: this many times k (at least MAX_SCORE_MIN_DEPTH)
MAX_SCORE_MIN_DEPTH = 200


@dataclass(frozen=True)
class RowFilter:
    """SQL selecting the row ids a filter allows (``SELECT id FROM chunks WHERE ...``) and its parameters."""

    sql: str
    params: Sequence[object]


@dataclass(frozen=True)
class TenantStats:
    rows: int
    tokens: int

    @property
    def average_length(self) -> float:
        return self.tokens / self.rows if self.rows else 1.0


def table_name(tenant_id: int) -> str:
    return f"fts_{int(tenant_id)}"


def create_tables(conn: sqlite3.Connection, tenant_id: int) -> None:
    """The tenant's FTS5 table and its vocabulary (document frequencies). The terms are pre-analysed and separated
    by spaces; the 'ascii' tokenizer splits on ASCII non-alphanumerics only, so it keeps every Unicode term whole."""
    table = table_name(tenant_id)
    conn.execute(f"CREATE VIRTUAL TABLE {table} USING fts5(terms, tokenize = 'ascii')")
    conn.execute(f"CREATE VIRTUAL TABLE {table}_vocab USING fts5vocab({table}, 'row')")


def top(
    conn: sqlite3.Connection,
    tenant_id: int,
    stats: TenantStats,
    terms: Sequence[str],
    limit: int,
    row_filter: RowFilter | None = None,
    *,
    max_score_min_rows: int | None = None,
) -> dict[int, float]:
    """The ``limit`` best rows for ``terms`` by BM25, best first (scores positive, higher better)."""
    if max_score_min_rows is None:
        max_score_min_rows = MAX_SCORE_MIN_ROWS
    frequencies = document_frequencies(conn, tenant_id, terms)
    present = [term for term in dict.fromkeys(terms) if frequencies.get(term, 0) > 0]
    informative = [term for term in present if 2 * frequencies[term] < stats.rows] or present
    if not informative:
        return {}
    frequent = [term for term in informative if frequencies[term] >= FREQUENT_TERM_SHARE * stats.rows]
    rare = [term for term in informative if term not in frequent]
    if rare and frequent and stats.rows >= max_score_min_rows:
        found = _max_score_top(conn, tenant_id, stats, rare, {t: frequencies[t] for t in frequent}, limit, row_filter)
        if found is not None:
            return found
    return dict(_ranked(conn, tenant_id, informative, limit, row_filter))


def document_frequencies(conn: sqlite3.Connection, tenant_id: int, terms: Sequence[str]) -> dict[str, int]:
    if not terms:
        return {}
    marks = ",".join("?" * len(terms))
    rows = conn.execute(f"SELECT term, doc FROM {table_name(tenant_id)}_vocab WHERE term IN ({marks})", list(terms))
    return {term: int(count) for term, count in rows}


def _ranked(
    conn: sqlite3.Connection, tenant_id: int, terms: Sequence[str], limit: int, row_filter: RowFilter | None
) -> list[tuple[int, float]]:
    table = table_name(tenant_id)
    sql = f"SELECT rowid, rank FROM {table} WHERE {table} MATCH ?"
    params: list[object] = [fts5_match_expression(terms)]
    if row_filter is not None:
        sql += f" AND rowid IN ({row_filter.sql})"
        params.extend(row_filter.params)
    rows = conn.execute(f"{sql} ORDER BY rank LIMIT ?", [*params, limit]).fetchall()
    return [(int(rowid), -float(rank)) for rowid, rank in rows]


def _max_score_top(
    conn: sqlite3.Connection,
    tenant_id: int,
    stats: TenantStats,
    rare: Sequence[str],
    frequent: dict[str, int],
    limit: int,
    row_filter: RowFilter | None,
) -> dict[int, float] | None:
    """The exact top ``limit`` from the rows holding a rare term, or None when that cannot be proved."""
    depth = max(MAX_SCORE_DEPTH_FACTOR * limit, MAX_SCORE_MIN_DEPTH)
    partial = _ranked(conn, tenant_id, rare, depth, row_filter)
    if len(partial) < limit:
        return None  # too few rows hold a rare term to fix the k-th score
    idf = {term: bm25_idf(count, stats.rows) for term, count in frequent.items()}
    texts = _terms_of(conn, tenant_id, [rowid for rowid, _ in partial])
    scores: dict[int, float] = {}
    for rowid, score in partial:
        tokens = texts[rowid].split()
        counts = Counter(token for token in tokens if token in idf)
        scores[rowid] = score + sum(
            bm25_term_score(counts[term], len(tokens), stats.average_length, idf[term]) for term in counts
        )
    ranked = sorted(scores.items(), key=lambda item: -item[1])[:limit]
    kth = ranked[-1][1]
    bound = sum(bm25_upper_bound(value) for value in idf.values())
    unseen_rare_score = partial[-1][1] if len(partial) == depth else 0.0  # rows past the depth score at most this
    if unseen_rare_score + bound > kth:
        return None
    return dict(ranked)


def _terms_of(conn: sqlite3.Connection, tenant_id: int, rowids: Sequence[int]) -> dict[int, str]:
    table = table_name(tenant_id)
    marks = ",".join("?" * len(rowids))
    return dict(conn.execute(f"SELECT rowid, terms FROM {table} WHERE rowid IN ({marks})", list(rowids)).fetchall())
