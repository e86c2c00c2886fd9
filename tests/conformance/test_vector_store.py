"""The VectorStore conformance suite: every backend (fixture ``store``, tests/fixtures/store.py) must pass it.

Only the protocol is used here — no backend internals — so a new backend joins by adding itself to the fixture's
parametrisation. Ranking tests use the real offline MiniLM in-process.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from baton.runtime.errors import InvalidArgument
from baton.store.base import ChunkRecord, Hit, SearchMode, StoreQuery, VectorStore
from baton.store.evaluation import ndcg_at_k
from baton.store.fusion import FusionMethod
from tests.fixtures.store import ENGLISH_SET, RUSSIAN_SET, LabelledSet, MiniLM, StoreFactory

REPO_ROOT = Path(__file__).resolve().parents[2]
DIM = 16
TENANT = "alice"


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def chunk(document_id: str, index: int, text: str, vector: np.ndarray, tenant: str = TENANT, **metadata) -> ChunkRecord:
    return ChunkRecord(f"{document_id}:{index}", document_id, tenant, text, vector, metadata)


def document(document_id: str, texts: Sequence[str], seed: int, tenant: str = TENANT, **metadata) -> list[ChunkRecord]:
    return [chunk(document_id, i, text, unit(seed * 100 + i), tenant, **metadata) for i, text in enumerate(texts)]


def vector_search(store: VectorStore, vector: np.ndarray, k: int = 10, tenant: str = TENANT, **kw) -> list[Hit]:
    return store.search(StoreQuery(tenant=tenant, vector=vector, k=k, mode=SearchMode.VECTOR, **kw))


def bm25_search(store: VectorStore, text: str, k: int = 10, tenant: str = TENANT, **kw) -> list[Hit]:
    return store.search(StoreQuery(tenant=tenant, text=text, k=k, mode=SearchMode.BM25, **kw))


def hybrid_search(store: VectorStore, text: str, vector: np.ndarray, k: int = 10, tenant: str = TENANT, **kw):
    return store.search(StoreQuery(tenant=tenant, text=text, vector=vector, k=k, mode=SearchMode.HYBRID, **kw))


def ids(hits: Sequence[Hit]) -> list[str]:
    return [hit.chunk_id for hit in hits]


# --- basics ---------------------------------------------------------------------------------------------------------


def test_empty_store_and_unknown_tenant(store: VectorStore) -> None:
    assert store.health()
    assert store.count() == 0
    assert store.count(TENANT) == 0
    assert store.document_ids(TENANT) == set()
    assert vector_search(store, unit(1)) == []
    assert bm25_search(store, "anything") == []
    assert hybrid_search(store, "anything", unit(1)) == []
    assert store.delete_document(TENANT, "missing") == 0


def test_upsert_then_every_mode_finds_the_chunk(store: VectorStore) -> None:
    store.replace_document(
        TENANT, "d1", document("d1", ["red apples", "green pears", "yellow lemons"], seed=1, title="Fruit", page=3)
    )
    assert store.count(TENANT) == 3
    assert store.document_ids(TENANT) == {"d1"}

    [top, *_] = vector_search(store, unit(101))
    assert (top.chunk_id, top.document_id, top.text) == ("d1:1", "d1", "green pears")
    assert top.metadata == {"title": "Fruit", "page": 3}
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert top.vector_score == pytest.approx(1.0, abs=1e-5)

    [hit] = bm25_search(store, "pears")
    assert hit.chunk_id == "d1:1" and hit.bm25_score is not None and hit.bm25_score > 0

    assert ids(hybrid_search(store, "lemons", unit(102)))[0] == "d1:2"


def test_the_store_records_the_model_of_its_vectors_and_samples_them(store: VectorStore) -> None:
    assert store.embedding_model() is None  # nothing recorded yet (or a store from before models were recorded)
    assert store.sample_chunks(4) == []
    store.set_embedding_model("intfloat/multilingual-e5-small (sha256 0123456789abcdef)")
    store.replace_document(TENANT, "d1", document("d1", ["red apples", "green pears"], seed=1))
    store.replace_document("bob", "d2", document("d2", ["blue plums"], seed=2, tenant="bob"))
    assert store.embedding_model() == "intfloat/multilingual-e5-small (sha256 0123456789abcdef)"
    sample = dict(store.sample_chunks(8))
    assert set(sample) == {"red apples", "green pears", "blue plums"}
    assert np.allclose(sample["green pears"], unit(101), atol=1e-5)
    assert len(store.sample_chunks(1)) == 1


def test_reupsert_replaces_every_chunk_of_the_document(store: VectorStore) -> None:
    store.replace_document(TENANT, "d1", document("d1", ["alpha one", "alpha two", "alpha three"], seed=1))
    store.replace_document(TENANT, "d2", document("d2", ["beta"], seed=2))
    store.replace_document(TENANT, "d1", document("d1", ["gamma one", "gamma two"], seed=3))

    assert store.count(TENANT) == 3
    assert bm25_search(store, "alpha") == []
    assert ids(bm25_search(store, "gamma")) == ["d1:0", "d1:1"] or set(ids(bm25_search(store, "gamma"))) == {
        "d1:0",
        "d1:1",
    }
    everything = vector_search(store, unit(100), k=100)
    assert {hit.text for hit in everything} == {"gamma one", "gamma two", "beta"}
    # The old vectors are gone: the best match for an old chunk's vector is not an old chunk.
    assert "alpha" not in vector_search(store, unit(102))[0].text


def test_replacing_with_no_chunks_deletes_the_document(store: VectorStore) -> None:
    store.replace_document(TENANT, "d1", document("d1", ["one"], seed=1))
    store.replace_document(TENANT, "d1", [])
    assert store.count(TENANT) == 0
    assert store.document_ids(TENANT) == set()


def test_delete_document(store: VectorStore) -> None:
    store.replace_document(TENANT, "d1", document("d1", ["cats purr", "cats sleep"], seed=1))
    store.replace_document(TENANT, "d2", document("d2", ["dogs bark"], seed=2))

    assert store.delete_document(TENANT, "d1") == 2
    assert store.delete_document(TENANT, "d1") == 0
    assert store.count(TENANT) == 1
    assert bm25_search(store, "cats") == []
    assert ids(vector_search(store, unit(100), k=10)) == ["d2:0"]
    assert ids(hybrid_search(store, "cats", unit(100))) == ["d2:0"]


def test_k_larger_than_the_collection_returns_everything(store: VectorStore) -> None:
    store.replace_document(TENANT, "d1", document("d1", ["a b", "b c", "c d"], seed=1))
    assert len(vector_search(store, unit(5), k=1000)) == 3
    assert len(bm25_search(store, "b", k=1000)) == 2
    assert len(hybrid_search(store, "b", unit(5), k=1000)) == 3


def test_results_are_best_first(store: VectorStore) -> None:
    store.replace_document(TENANT, "d1", document("d1", [f"text {i}" for i in range(30)], seed=1))
    for hits in (vector_search(store, unit(7), k=30), bm25_search(store, "text 3", k=30)):
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True)


# --- filters and tenants --------------------------------------------------------------------------------------------


@pytest.fixture
def library(store: VectorStore) -> VectorStore:
    store.replace_document(TENANT, "a", document("a", ["river notes", "river map"], 1, collection="work", page=1))
    store.replace_document(TENANT, "b", document("b", ["river song"], 2, collection="home", draft=True))
    store.replace_document(TENANT, "c", document("c", ["river fish"], 3, collection="travel", draft=False))
    return store


@pytest.mark.parametrize(
    ("filters", "documents"),
    [
        ({"document_id": "a"}, {"a"}),
        ({"document_id": ["a", "c"]}, {"a", "c"}),
        ({"collection": "home"}, {"b"}),
        ({"collection": ["home", "travel"]}, {"b", "c"}),
        ({"draft": True}, {"b"}),
        ({"draft": False}, {"c"}),
        ({"page": 1}, {"a"}),
        ({"collection": "work", "document_id": "c"}, set()),
        ({"collection": []}, set()),
        ({"collection": "nowhere"}, set()),
    ],
)
def test_filters_apply_in_every_mode_and_to_counts(library: VectorStore, filters: dict, documents: set) -> None:
    for hits in (
        vector_search(library, unit(5), k=100, filters=filters),
        bm25_search(library, "river", k=100, filters=filters),
        hybrid_search(library, "river", unit(5), k=100, filters=filters),
    ):
        assert {hit.document_id for hit in hits} == documents
    expected_chunks = sum({"a": 2, "b": 1, "c": 1}[name] for name in documents)
    assert library.count(TENANT, filters) == expected_chunks


def hybrid_with_prefetch(store: VectorStore, text: str, vector: np.ndarray, **kw) -> list[Hit]:
    """A hybrid search whose BM25 side was asked for first, without the vector (as the gateway overlaps it with the
    query's embedding), then handed back in ``lexical``."""
    query = StoreQuery(tenant=TENANT, text=text, k=kw.pop("k", 10), mode=SearchMode.HYBRID, **kw)
    lexical = store.lexical_candidates(query)
    return store.search(dataclasses.replace(query, vector=vector, lexical=lexical))


@pytest.mark.parametrize("filters", [{}, {"collection": ["home", "travel"]}, {"collection": "nowhere"}])
def test_bm25_candidates_computed_ahead_change_nothing(library: VectorStore, filters: dict) -> None:
    for text, seed in (("river", 5), ("river map", 1), ("song of the fish", 3), ("", 2)):
        expected = hybrid_search(library, text, unit(seed), k=3, filters=filters)
        got = hybrid_with_prefetch(library, text, unit(seed), k=3, filters=filters)
        assert [(hit.chunk_id, hit.score, hit.bm25_score) for hit in got] == [
            (hit.chunk_id, hit.score, hit.bm25_score) for hit in expected
        ]


def test_bm25_candidates_from_before_a_write_are_not_used_after_it(library: VectorStore) -> None:
    query = StoreQuery(tenant=TENANT, text="river", k=10, mode=SearchMode.HYBRID)
    stale = library.lexical_candidates(query)
    library.delete_document(TENANT, "b")
    library.replace_document(TENANT, "d", document("d", ["river delta"], 4))
    hits = library.search(dataclasses.replace(query, vector=unit(4), lexical=stale))
    assert {hit.document_id for hit in hits} == {"a", "c", "d"}
    assert ids(hits) == ids(hybrid_search(library, "river", unit(4)))
    # Made for another query, they are not used for this one.
    other = library.lexical_candidates(dataclasses.replace(query, text="fish"))
    assert ids(library.search(dataclasses.replace(query, vector=unit(4), lexical=other))) == ids(hits)


def test_tenants_are_isolated(store: VectorStore) -> None:
    for tenant, word in (("alice", "apple"), ("bob", "banana")):
        store.replace_document(tenant, "shared", document("shared", [f"{word} pie"], seed=1, tenant=tenant))

    assert [hit.text for hit in vector_search(store, unit(100), tenant="alice")] == ["apple pie"]
    assert [hit.text for hit in vector_search(store, unit(100), tenant="bob")] == ["banana pie"]
    assert bm25_search(store, "banana", tenant="alice") == []
    assert [hit.text for hit in hybrid_search(store, "banana pie", unit(100), tenant="alice")] == ["apple pie"]
    assert store.count() == 2 and store.count("alice") == 1

    assert store.delete_document("alice", "shared") == 1
    assert store.count("bob") == 1
    assert store.document_ids("bob") == {"shared"}
    assert vector_search(store, unit(100), tenant="carol") == []


# --- text: languages, Unicode, long texts ---------------------------------------------------------------------------


def test_russian_word_forms_are_found_by_bm25(store: VectorStore) -> None:
    store.replace_document(TENANT, "essay", document("essay", ["Эссе о философии и свободе", "Рецепт борща"], 1))
    store.replace_document(TENANT, "tree", document("tree", ["Под ёлкой лежали подарки"], 2))

    assert ids(bm25_search(store, "философия свобода")) == ["essay:0"]
    assert ids(bm25_search(store, "свободы")) == ["essay:0"]
    assert ids(bm25_search(store, "ЁЛКА")) == ["tree:0"]  # case and ё folded, another word form
    assert ids(bm25_search(store, "елки")) == ["tree:0"]


def test_unicode_mixed_scripts_and_emoji_round_trip(store: VectorStore) -> None:
    texts = ["Библиотека Python для машинного обучения 🙂", "東京の天気 ☔ and naïve café", "Ünïcödé — «кавычки» 👋🏽"]
    store.replace_document(TENANT, "u", document("u", texts, 1, title="Заголовок 📚"))

    assert sorted(hit.text for hit in vector_search(store, unit(100), k=10)) == sorted(texts)
    assert ids(bm25_search(store, "python")) == ["u:0"]
    assert ids(bm25_search(store, "библиотеки")) == ["u:0"]
    assert ids(bm25_search(store, "naïve café")) == ["u:1"]
    assert bm25_search(store, "🙂")[:1] == []  # an emoji is not a word
    assert vector_search(store, unit(100))[0].metadata["title"] == "Заголовок 📚"


def test_very_long_text(store: VectorStore) -> None:
    long_text = " ".join(f"слово{i % 997} word{i}" for i in range(40_000)) + " уникальныйконец"
    store.replace_document(TENANT, "long", [chunk("long", 0, long_text, unit(1))])
    store.replace_document(TENANT, "short", document("short", ["слово1 короткий"], 2))

    [hit] = bm25_search(store, "уникальныйконец")
    assert hit.chunk_id == "long:0" and hit.text == long_text
    assert ids(vector_search(store, unit(1), k=1)) == ["long:0"]


# --- ranking on labelled sets with the real MiniLM -------------------------------------------------------------------


def ndcg_by_mode(store: VectorStore, minilm: MiniLM, labelled: LabelledSet, tenant: str) -> dict[str, float]:
    ids_ = list(labelled.documents)
    vectors = minilm.embed([labelled.documents[doc_id] for doc_id in ids_])
    for doc_id, vector in zip(ids_, vectors, strict=True):
        text = labelled.documents[doc_id]
        store.replace_document(tenant, doc_id, [chunk(doc_id, 0, text, vector, tenant, language=labelled.language)])
    questions = [question for question, _ in labelled.questions]
    query_vectors = minilm.embed(questions)
    qrels = {str(i): {doc_id: 1} for i, (_, doc_id) in enumerate(labelled.questions)}
    variants = {
        "bm25": {"mode": SearchMode.BM25},
        "vector": {"mode": SearchMode.VECTOR},
        "hybrid": {"mode": SearchMode.HYBRID, "embedder_languages": minilm.languages},
        "hybrid_undeclared": {"mode": SearchMode.HYBRID, "embedder_languages": ()},
        "naive_rrf": {"mode": SearchMode.HYBRID, "vector_weight": 0.5, "fusion": FusionMethod.RRF},
    }
    scores = {}
    for name, options in variants.items():
        runs = {
            str(i): [
                hit.document_id
                for hit in store.search(StoreQuery(tenant=tenant, text=question, vector=vector, k=10, **options))
            ]
            for i, (question, vector) in enumerate(zip(questions, query_vectors, strict=True))
        }
        scores[name] = ndcg_at_k(runs, qrels, 10)
    print(f"\n{labelled.language} nDCG@10: " + ", ".join(f"{name} {value:.3f}" for name, value in scores.items()))
    return scores


def test_russian_hybrid_gates_the_blind_dense_side(store: VectorStore, minilm: MiniLM) -> None:
    """MiniLM does not know Russian: hybrid must rank at least as well as BM25, far above naive fusion."""
    ndcg = ndcg_by_mode(store, minilm, RUSSIAN_SET, "ru-reader")
    assert ndcg["bm25"] >= 0.85  # stemming makes other word forms match
    assert ndcg["vector"] <= 0.6  # the dense side is close to blind here (measured 0.39)
    assert ndcg["hybrid"] >= ndcg["bm25"]
    assert ndcg["hybrid"] >= ndcg["naive_rrf"] + 0.1
    # Without declared languages the flat dense scores alone must keep hybrid near BM25.
    assert ndcg["hybrid_undeclared"] >= ndcg["bm25"] - 0.02
    assert ndcg["hybrid_undeclared"] >= ndcg["naive_rrf"] + 0.1


def test_english_hybrid_is_at_least_as_good_as_both_sides(store: VectorStore, minilm: MiniLM) -> None:
    ndcg = ndcg_by_mode(store, minilm, ENGLISH_SET, "en-reader")
    assert ndcg["hybrid"] >= max(ndcg["bm25"], ndcg["vector"])
    assert ndcg["hybrid"] > ndcg["bm25"] + 0.1  # paraphrased questions BM25 cannot match


def test_gated_hybrid_ranks_exactly_as_bm25(store: VectorStore, minilm: MiniLM) -> None:
    docs = list(RUSSIAN_SET.documents.items())
    for (doc_id, text), vector in zip(docs, minilm.embed([text for _, text in docs]), strict=True):
        store.replace_document(TENANT, doc_id, [chunk(doc_id, 0, text, vector)])
    for question, _ in RUSSIAN_SET.questions[:10]:
        [vector] = minilm.embed([question])
        bm25 = bm25_search(store, question, k=5)
        hybrid = hybrid_search(store, question, vector, k=5, embedder_languages=("en",))
        assert ids(hybrid) == ids(bm25)
        assert all(hit.vector_score is not None for hit in hybrid)  # still reported, just not used


# --- persistence, crash safety, concurrency -------------------------------------------------------------------------

VERSIONED_DOCUMENTS = 20


def versioned_chunks(document_id: str, version: int, tenant: str = TENANT) -> list[ChunkRecord]:
    """Version ``version`` of a document: 1–5 chunks whose ids, texts, vectors and metadata all carry it."""
    parts = 1 + version % 5
    return [
        chunk(
            document_id, i, f"{document_id} v{version} part{i} marker", unit(version * 10 + i), tenant, version=version
        )
        for i in range(parts)
    ]


def write_version(store: VectorStore, version: int, documents: int = VERSIONED_DOCUMENTS) -> None:
    document_id = f"d{version % documents}"
    store.replace_document(TENANT, document_id, versioned_chunks(document_id, version))


def assert_consistent(store: VectorStore, documents: int = VERSIONED_DOCUMENTS) -> int:
    """Every document holds exactly one version, complete; every chunk's own vector finds that chunk first."""
    probe = unit(999_999)
    documents_found = store.document_ids(TENANT)
    assert documents_found == {f"d{number}" for number in range(documents)}  # none lost between versions
    total = 0
    for document_id in documents_found:
        hits = vector_search(store, probe, k=100, filters={"document_id": document_id})
        versions = {hit.metadata["version"] for hit in hits}
        assert len(versions) == 1, f"{document_id} mixes versions {versions}"
        version = int(versions.pop())
        expected = versioned_chunks(document_id, version)
        assert sorted(ids(hits)) == sorted(c.chunk_id for c in expected)
        for record in expected:
            top = vector_search(store, record.vector, k=1)[0]
            assert (top.chunk_id, top.metadata["version"]) == (record.chunk_id, version)
        total += len(hits)
    assert store.count(TENANT) == total
    everything = vector_search(store, probe, k=10_000)
    assert len(everything) == total
    assert {hit.document_id for hit in bm25_search(store, "marker", k=10_000)} == documents_found
    return total


def test_persistence_across_close_and_reopen(store_factory: StoreFactory, tmp_path: Path) -> None:
    path = tmp_path / "persistent"
    store = store_factory(path)
    for version in range(120):  # enough chunks to pass the approximate-index threshold
        store.replace_document(
            TENANT, f"d{version % VERSIONED_DOCUMENTS}", versioned_chunks(f"d{version % 20}", version)
        )
    store.replace_document("bob", "x", document("x", ["bob's only chunk"], seed=5, tenant="bob"))
    before = assert_consistent(store)
    store.close()
    assert not store.health()

    reopened = store_factory(path)
    assert assert_consistent(reopened) == before
    assert reopened.count("bob") == 1
    reopened.replace_document(TENANT, "d0", versioned_chunks("d0", 1000))
    assert_consistent(reopened)


CHILD = """
import sys
from pathlib import Path
from tests.conformance.test_vector_store import unit, vector_search, write_version
from tests.fixtures.store import open_store

backend, path, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
store = open_store(backend, path)
vector_search(store, unit(1))  # load the vector index, so a crash can leave it stale on disk
version = start
while True:
    write_version(store, version)
    if version % 7 == 0:
        vector_search(store, unit(version))
    print(version, flush=True)
    version += 1
"""


def run_and_kill(backend: str, path: Path, start: int, writes_before_kill: int) -> int:
    """Start a writer process, SIGKILL it after ``writes_before_kill`` committed writes; returns the last one."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, backend, str(path), str(start)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.stdout is not None
    last = start - 1
    deadline = time.monotonic() + 120
    while last < start + writes_before_kill - 1:
        line = child.stdout.readline()
        if not line:
            raise AssertionError(f"writer died early: {child.stderr.read() if child.stderr else ''}")
        last = int(line)
        assert time.monotonic() < deadline, "writer too slow"
    time.sleep(random.uniform(0, 0.01))  # land anywhere in the next write
    child.send_signal(signal.SIGKILL)
    child.wait()
    return last


def test_kill_9_in_the_middle_of_writes_leaves_a_consistent_store(
    store_factory: StoreFactory, store_backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "crash"
    store = store_factory(path)
    for version in range(60):
        write_version(store, version)
    store.close()  # a vector snapshot on disk, which the crashed writer will leave behind

    start = 60
    for writes in (5, 17, 31, 43, 58, 71):
        last = run_and_kill(store_backend, path, start, writes)
        reopened = store_factory(path)
        assert_consistent(reopened)
        # Every write the child reported is there (a write is reported after its commit).
        newest = max(int(hit.metadata["version"]) for hit in vector_search(reopened, unit(0), k=100_000))
        assert newest >= last
        reopened.close()
        start = newest + 1


def test_readers_never_see_half_a_document_while_a_writer_replaces_it(store: VectorStore) -> None:
    for version in range(20):
        write_version(store, version, documents=10)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                probe = unit(int(rng.integers(1 << 30)))
                for hits in (vector_search(store, probe, k=200), hybrid_search(store, "marker v5", probe, k=200)):
                    assert {hit.document_id for hit in hits} == {f"d{number}" for number in range(10)}
                    by_document: dict[str, set] = {}
                    for hit in hits:
                        by_document.setdefault(hit.document_id, set()).add(hit.metadata["version"])
                    assert all(len(versions) == 1 for versions in by_document.values()), by_document
                    for document_id, versions in by_document.items():
                        expected = len(versioned_chunks(document_id, int(next(iter(versions)))))
                        assert sum(hit.document_id == document_id for hit in hits) == expected
        except BaseException as error:
            errors.append(error)

    readers = [threading.Thread(target=read, args=(seed,)) for seed in range(3)]
    for reader in readers:
        reader.start()
    try:
        for version in range(20, 220):
            write_version(store, version, documents=10)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not errors, errors[0]
    assert_consistent(store, documents=10)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_writes_are_refused_and_change_nothing(store: VectorStore) -> None:
    store.replace_document(TENANT, "d1", document("d1", ["kept"], seed=1))
    bad_writes = [
        ("d1", [chunk("d1", 0, "wrong size", np.ones(DIM + 1, np.float32))]),
        ("d1", [chunk("d1", 0, "not finite", np.full(DIM, np.nan, np.float32))]),
        ("d1", [chunk("d1", 0, "zero", np.zeros(DIM, np.float32))]),
        ("d1", [chunk("d2", 0, "other document", unit(2))]),
        ("d1", [chunk("d1", 0, "other tenant", unit(2), tenant="mallory")]),
        ("d1", [chunk("d1", 0, "twice", unit(2)), chunk("d1", 0, "twice", unit(3))]),
        ("d2", [ChunkRecord("d1:0", "d2", TENANT, "a chunk id another document owns", unit(4))]),
        ("", [chunk("", 0, "no document id", unit(2))]),
    ]
    for document_id, chunks in bad_writes:
        with pytest.raises(InvalidArgument):
            store.replace_document(TENANT, document_id, chunks)
    assert store.count() == 1
    assert [hit.text for hit in vector_search(store, unit(100), k=10)] == ["kept"]


def test_bad_queries_are_refused(store: VectorStore) -> None:
    store.replace_document(TENANT, "d1", document("d1", ["kept"], seed=1))
    bad_queries = [
        StoreQuery(tenant=TENANT, vector=unit(1), k=0, mode=SearchMode.VECTOR),
        StoreQuery(tenant=TENANT, text="kept", mode=SearchMode.VECTOR),
        StoreQuery(tenant=TENANT, text="kept", mode=SearchMode.HYBRID),
        StoreQuery(tenant=TENANT, vector=np.ones(DIM + 3, np.float32), mode=SearchMode.VECTOR),
        StoreQuery(tenant=TENANT, text="kept", vector=unit(1), vector_weight=1.5),
    ]
    for query in bad_queries:
        with pytest.raises(InvalidArgument):
            store.search(query)
    assert bm25_search(store, "!!! ???") == []  # nothing to match is no error
