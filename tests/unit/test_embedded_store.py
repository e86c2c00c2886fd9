"""The embedded store's own machinery, below the protocol: the per-tenant vector index (exact and HNSW, tombstones,
filters, snapshots), how the store treats a missing, stale, damaged or foreign snapshot, and BM25 over FTS5
(the formula, and max-score giving exactly FTS5's own ranking)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from baton.runtime.errors import FailedPrecondition, Unavailable
from baton.store import fts_bm25
from baton.store.analysis import bm25_idf, bm25_term_score, index_text
from baton.store.base import ChunkRecord, SearchMode, StoreQuery
from baton.store.embedded import EmbeddedStore
from baton.store.vector_index import IndexParams, TenantIndex

DIM = 32
PARAMS = IndexParams(hnsw_threshold=500, exact_filter_limit=50, compact_minimum=100)


def clustered(n: int, seed: int = 0, centres: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, DIM)).astype(np.float32)
    points = middle[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def exact_top(vectors: np.ndarray, rowids: np.ndarray, query: np.ndarray, k: int) -> set[int]:
    return set(rowids[np.argsort(-(vectors @ query))[:k]].tolist())


def filled(hnsw: bool, n: int = 2000) -> tuple[TenantIndex, np.ndarray, np.ndarray]:
    index = TenantIndex(DIM, PARAMS, hnsw=hnsw)
    vectors = clustered(n)
    rowids = np.arange(1, n + 1, dtype=np.int64) * 3  # sparse, increasing: ids of a shared SQLite table
    index.add(rowids, vectors)
    return index, rowids, vectors


@pytest.mark.parametrize("hnsw", [False, True])
def test_search_matches_exact_top_10(hnsw: bool) -> None:
    index, rowids, vectors = filled(hnsw)
    queries = clustered(50, seed=1)
    recall = np.mean(
        [len(set(index.search(q, 10).rowids.tolist()) & exact_top(vectors, rowids, q, 10)) / 10 for q in queries]
    )
    assert recall >= (0.95 if hnsw else 1.0)
    hits = index.search(queries[0], 10)
    assert list(hits.scores) == sorted(hits.scores, reverse=True)


@pytest.mark.parametrize("hnsw", [False, True])
def test_removed_rows_are_never_returned_and_compaction_drops_them(hnsw: bool) -> None:
    index, rowids, vectors = filled(hnsw)
    removed = rowids[::2]
    assert index.remove(removed) == removed.size
    assert index.remove(removed) == 0  # already gone
    for query in clustered(20, seed=2):
        assert not set(index.search(query, 20).rowids.tolist()) & set(removed.tolist())
    assert index.wants_compaction()
    compact = index.rebuilt(hnsw=hnsw)
    assert (compact.size, compact.tombstones) == (rowids.size // 2, 0)
    np.testing.assert_array_equal(compact.live_rowids(), rowids[1::2])
    np.testing.assert_allclose(compact.vectors(), vectors[1::2])


@pytest.mark.parametrize(("hnsw", "allowed_count"), [(False, 30), (True, 30), (True, 400)])
def test_a_filter_restricts_the_search_to_allowed_rows(hnsw: bool, allowed_count: int) -> None:
    """Few allowed rows: exact search over them; many (above ``exact_filter_limit``): HNSW with a bitmap."""
    index, rowids, vectors = filled(hnsw)
    allowed = np.sort(np.random.default_rng(3).choice(rowids, allowed_count, replace=False))
    positions = np.searchsorted(rowids, allowed)
    for query in clustered(10, seed=4):
        found = index.search(query, 10, allowed).rowids
        assert set(found.tolist()) <= set(allowed.tolist())
        assert len(set(found.tolist()) & exact_top(vectors[positions], allowed, query, 10)) >= 9


def test_rows_must_arrive_in_increasing_order() -> None:
    index, rowids, vectors = filled(False, n=10)
    with pytest.raises(ValueError, match="increasing"):
        index.add(rowids[:1], vectors[:1])


@pytest.mark.parametrize("hnsw", [False, True])
def test_snapshot_round_trip(tmp_path: Path, hnsw: bool) -> None:
    index, rowids, _ = filled(hnsw)
    index.remove(rowids[:10])
    index.generation = 42
    index.save(tmp_path)
    (tmp_path / "snapshot-99-unfinished").mkdir()  # a crash mid-save leaves a folder CURRENT does not name
    loaded = TenantIndex.load(tmp_path, DIM, PARAMS)
    assert loaded is not None
    assert (loaded.generation, loaded.tombstones, loaded.is_hnsw) == (42, 10, hnsw)
    query = clustered(1, seed=9)[0]
    np.testing.assert_array_equal(loaded.search(query, 10).rowids, index.search(query, 10).rowids)
    assert TenantIndex.load(tmp_path / "nothing", DIM, PARAMS) is None


# --- the store and its snapshots ------------------------------------------------------------------------------------


def records(document_id: str, count: int, seed: int) -> list[ChunkRecord]:
    vectors = clustered(count, seed=seed)
    return [
        ChunkRecord(f"{document_id}:{i}", document_id, "t", f"{document_id} text {i}", vector)
        for i, vector in enumerate(vectors)
    ]


def open_store(path: Path) -> EmbeddedStore:
    return EmbeddedStore(path, index_params=IndexParams(hnsw_threshold=100), durable=False)


def fill_store(path: Path, documents: range) -> None:
    store = open_store(path)
    for number in documents:
        store.replace_document("t", f"d{number}", records(f"d{number}", 20, seed=number))
    store.close()


def search_all(store: EmbeddedStore) -> set[str]:
    query = StoreQuery(tenant="t", vector=clustered(1, seed=77)[0], k=10_000, mode=SearchMode.VECTOR)
    return {hit.chunk_id for hit in store.search(query)}


def own_vector_finds_itself(store: EmbeddedStore, document_id: str, seed: int) -> bool:
    record = records(document_id, 20, seed=seed)[5]
    query = StoreQuery(tenant="t", vector=record.vector, k=1, mode=SearchMode.VECTOR)
    return store.search(query)[0].chunk_id == record.chunk_id


def test_a_big_backlog_is_indexed_with_hnsw_on_first_use(tmp_path: Path) -> None:
    fill_store(tmp_path, range(10))  # 200 chunks written without a single search: nothing indexed yet
    store = open_store(tmp_path)
    store.warm("t")
    assert store.index_info("t")["kind"] == "hnsw"
    assert len(search_all(store)) == 200
    store.close()


def test_a_stale_snapshot_is_caught_up(tmp_path: Path) -> None:
    fill_store(tmp_path, range(5))
    store = open_store(tmp_path)
    store.warm("t")
    store.close()  # snapshot at this generation
    store = open_store(tmp_path)  # writes while the index is not loaded: the snapshot falls behind
    store.delete_document("t", "d0")
    store.replace_document("t", "d7", records("d7", 20, seed=7))
    store.close()
    store = open_store(tmp_path)
    chunks = search_all(store)
    assert len(chunks) == 100 and not any(chunk.startswith("d0:") for chunk in chunks)
    assert own_vector_finds_itself(store, "d7", seed=7)
    # The deleted chunks are tombstoned in the index, not just filtered out after it: they take no top-k slot.
    gone = records("d0", 20, seed=0)[3]
    assert len(store.search(StoreQuery(tenant="t", vector=gone.vector, k=1, mode=SearchMode.VECTOR))) == 1
    store.close()


def test_a_damaged_snapshot_is_rebuilt_from_sqlite(tmp_path: Path) -> None:
    fill_store(tmp_path, range(6))
    store = open_store(tmp_path)
    store.warm("t")
    store.close()
    [snapshot] = (tmp_path / "vectors" / "1").glob("snapshot-*")
    (snapshot / "index.faiss").write_bytes(b"not a faiss index")
    store = open_store(tmp_path)
    assert len(search_all(store)) == 120
    assert own_vector_finds_itself(store, "d3", seed=3)
    store.close()


def test_a_snapshot_from_another_history_is_not_trusted(tmp_path: Path) -> None:
    """SQLite restored from a backup, then written again: the same generation and row ids, other vectors."""
    fill_store(tmp_path / "a", range(3))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name, seed in (("a", 100), ("b", 200)):  # both replace d1: the new rows get the same ids, other vectors
        store = open_store(tmp_path / name)
        store.replace_document("t", "d1", records("d1", 20, seed=seed))
        store.warm("t")
        store.close()
    shutil.rmtree(tmp_path / "b" / "vectors")
    shutil.copytree(tmp_path / "a" / "vectors", tmp_path / "b" / "vectors")
    store = open_store(tmp_path / "b")
    assert own_vector_finds_itself(store, "d1", seed=200)
    store.close()


def test_a_snapshot_newer_than_sqlite_is_removed_at_open(tmp_path: Path) -> None:
    fill_store(tmp_path / "a", range(3))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    store = open_store(tmp_path / "a")
    store.replace_document("t", "d9", records("d9", 20, seed=9))
    store.warm("t")
    store.close()
    shutil.copytree(tmp_path / "a" / "vectors", tmp_path / "b" / "vectors")
    store = open_store(tmp_path / "b")
    assert not (tmp_path / "b" / "vectors" / "1").exists()
    store.replace_document("t", "d8", records("d8", 20, seed=8))  # the same generation and ids as a's d9
    assert own_vector_finds_itself(store, "d8", seed=8)
    store.close()


def test_one_process_at_a_time_and_no_use_after_close(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(FailedPrecondition, match="another process"):
        open_store(tmp_path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(Unavailable):
        store.count()
    open_store(tmp_path).close()  # the lock went with the first store


# --- BM25 over FTS5 -------------------------------------------------------------------------------------------------


def zipf_corpus(rows: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(2000)]
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    chosen = rng.choice(len(words), size=(rows, 30), p=weights / weights.sum())
    return [" ".join(words[i] for i in row) for row in chosen]


@pytest.fixture
def fts_table() -> tuple[sqlite3.Connection, fts_bm25.TenantStats]:
    conn = sqlite3.connect(":memory:")
    fts_bm25.create_tables(conn, 1)
    texts = [index_text(text) for text in zipf_corpus(3000)]
    conn.executemany("INSERT INTO fts_1 (rowid, terms) VALUES (?, ?)", list(enumerate(texts, start=1)))
    return conn, fts_bm25.TenantStats(rows=len(texts))


def test_bm25_formula_is_the_one_fts5_uses(fts_table: tuple[sqlite3.Connection, fts_bm25.TenantStats]) -> None:
    conn, stats = fts_table
    terms = ["w3", "w150", "w999"]
    frequencies = fts_bm25.document_frequencies(conn, 1, terms)
    average_length = sum(len(text.split()) for (text,) in conn.execute("SELECT terms FROM fts_1")) / stats.rows
    expression = " OR ".join(terms)
    for rowid, rank, text in conn.execute(f"SELECT rowid, rank, terms FROM fts_1 WHERE fts_1 MATCH '{expression}'"):
        tokens = text.split()
        expected = sum(
            bm25_term_score(tokens.count(t), len(tokens), average_length, bm25_idf(frequencies[t], stats.rows))
            for t in terms
        )
        assert -rank == pytest.approx(expected, rel=1e-9), rowid


def test_terms_without_idf_are_not_matched_and_the_ranking_stays(
    fts_table: tuple[sqlite3.Connection, fts_bm25.TenantStats], monkeypatch: pytest.MonkeyPatch
) -> None:
    """w0 is in 2,983 of the 3,000 rows (IDF floored at 1e-6): left out, the ranking is FTS5's own."""
    conn, stats = fts_table
    # The 12 rows with w700, all of them: within them, w0's 1e-6 shares only reorder exact ties.
    full = dict(conn.execute("SELECT rowid, -rank FROM fts_1 WHERE fts_1 MATCH 'w0 OR w700' ORDER BY rank LIMIT 12"))
    matched: list[list[str]] = []
    ranked = fts_bm25._ranked

    def spy(conn: sqlite3.Connection, tenant_id: int, terms: list[str], *args: object) -> object:
        matched.append(list(terms))
        return ranked(conn, tenant_id, terms, *args)

    monkeypatch.setattr(fts_bm25, "_ranked", spy)
    found = fts_bm25.top(conn, 1, stats, ["w0", "w700"], 12)
    assert matched == [["w700"]]
    assert set(found) == set(full)
    assert sorted(found.values()) == pytest.approx(sorted(full.values()), abs=1e-5)
    assert fts_bm25.top(conn, 1, stats, ["w0", "w1"], 3)  # only IDF-less terms: matched after all


def test_document_frequencies_are_cached_for_one_generation(
    fts_table: tuple[sqlite3.Connection, fts_bm25.TenantStats],
) -> None:
    conn, _ = fts_table
    cache = fts_bm25.FrequencyCache()
    assert cache.get(conn, 1, 7, ["w10", "nothing"]) == {"w10": 899, "nothing": 0}
    conn.execute("INSERT INTO fts_1 (rowid, terms) VALUES (9999, 'w10')")
    assert cache.get(conn, 1, 7, ["w10"]) == {"w10": 899}  # same generation: no lookup
    assert cache.get(conn, 1, 8, ["w10"]) == {"w10": 900}  # a write moved the generation on
