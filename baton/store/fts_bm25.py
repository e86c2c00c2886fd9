"""BM25 top-k for the embedded store, over one SQLite FTS5 table per tenant.

The FTS5 tables hold the analysed text (``analysis.index_text``: stemmed, space-separated terms) and score with
FTS5's ``bm25()`` (k1 = 1.2, b = 0.75; ``analysis.bm25_*`` is the same formula). An OR query makes FTS5 score every
row that holds any query term — the cost at a million chunks: a term in 40 % of the rows means 400,000 rows scored.

- A term in half the rows or more has FTS5's floor IDF (1e-6): it adds nothing to a score, so it is not matched at
  all (unless every query term is like that). This is what keeps "the"/"и" in a question from costing seconds.
- Document frequencies come from the FTS5 vocabulary table, which counts them by walking the term's postings (60 ms
  for a term in every row of a million); they are cached per tenant and write generation (any write clears them).

Measured at 1 M chunks (benchmarks/bench_retrieval.py): the cache halved BM25's p50 (73 → 31 ms). Max-score (leave
frequent terms out of the MATCH, add their share from the rows' terms, keep the result only when provably exact)
was tried and dropped: p50 37 vs 31 ms, p99 554 vs 499 ms — the proof fails on the queries that are slow.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from baton.store.analysis import fts5_match_expression


@dataclass(frozen=True)
class RowFilter:
    """SQL selecting the row ids a filter allows (``SELECT id FROM chunks WHERE ...``) and its parameters."""

    sql: str
    params: Sequence[object]


@dataclass(frozen=True)
class TenantStats:
    rows: int
    generation: int = 0  # the tenant's write counter: cached document frequencies are valid for one generation


@dataclass
class FrequencyCache:
    """Document frequencies per tenant, valid for one write generation. Shared by the reading threads."""

    max_terms: int = 100_000
    _entries: dict[int, tuple[int, dict[str, int]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, conn: sqlite3.Connection, tenant_id: int, generation: int, terms: Sequence[str]) -> dict[str, int]:
        with self._lock:
            cached_generation, known = self._entries.get(tenant_id, (generation, {}))
            if cached_generation != generation or len(known) > self.max_terms:
                known = {}
            missing = [term for term in terms if term not in known]
        found = document_frequencies(conn, tenant_id, missing)
        with self._lock:
            known.update({term: found.get(term, 0) for term in missing})
            self._entries[tenant_id] = (generation, known)
            return {term: known[term] for term in terms}


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
    cache: FrequencyCache | None = None,
) -> dict[int, float]:
    """The ``limit`` best rows for ``terms`` by BM25, best first (scores positive, higher better)."""
    terms = list(dict.fromkeys(terms))
    if cache is None:
        frequencies = document_frequencies(conn, tenant_id, terms)
    else:
        frequencies = cache.get(conn, tenant_id, stats.generation, terms)
    present = [term for term in terms if frequencies.get(term, 0) > 0]
    informative = [term for term in present if 2 * frequencies[term] < stats.rows] or present
    if not informative:
        return {}
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
