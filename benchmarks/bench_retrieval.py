"""The embedded vector store at scale: clustered synthetic vectors plus synthetic text, one tenant.

Data: ``--chunks`` × ``--dim`` vectors, ``--centres`` cluster centres plus Gaussian noise (``--noise``, relative to
the unit centre), L2-normalised — on i.i.d. random vectors HNSW recall collapses, so random data would say nothing
(../shared/FACTS.md). Each chunk's text is ~60 Zipf-distributed pseudo-words (half Latin, half Cyrillic, so both
stemmers run) plus five topic words of its cluster. Queries are fresh samples of the same distribution.

Measured (all in one run, so the ratios are fair):
- build: writing the chunks through ``replace_document`` (SQLite + FTS5, ``--chunks-per-document`` per
  transaction), building the vector index (HNSW above the exact-search threshold), writing its snapshot, and
  reopening the store from the snapshot; disk size of the SQLite database and of the vector snapshot;
- queries (``--queries`` single queries, k=10): exact search with numpy over all vectors (the baseline, also the
  ground truth for recall@10), the store's vector search for each ``--ef-search``, hybrid (vector + BM25, relative-
  score fusion) and BM25 alone; p50/p99 latency and the ratio to the exact baseline's p50. Each series starts with
  20 untimed queries.
Goal (issue 3): vector p99 <= 20 ms with recall@10 >= 0.95 at 1 M chunks on this 2-core machine.
``--store weaviate`` loads the same chunks into a Weaviate server started here (``make weaviate``) and adds its
build table and its rows (vector with recall, hybrid, BM25) to the same query table: one run, the same baseline.

    .venv/bin/python benchmarks/bench_retrieval.py --chunks 100000          # minutes
    nice .venv/bin/python benchmarks/bench_retrieval.py --workdir /tmp/b1m  # 1 M chunks: long (index build)
    nice .venv/bin/python benchmarks/bench_retrieval.py --workdir /tmp/b1m --reuse  # queries again, no build
    .venv/bin/python benchmarks/bench_retrieval.py --chunks 100000 --store weaviate  # side by side with Weaviate
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baton.store.base import ChunkRecord, SearchMode, StoreQuery, VectorStore
from baton.store.embedded import EmbeddedStore
from baton.store.vector_index import IndexParams, inner_products
from benchmarks.common import percentile, print_table

TENANT = "bench"
WARM_UP_QUERIES = 20
WORDS_PER_CHUNK = 60
TOPIC_WORDS_PER_CHUNK = 5
TOPIC_WORDS_PER_CENTRE = 8
LATIN = ["ka", "ro", "mi", "ten", "sa", "lo", "vi", "der", "an", "po", "lu", "ster", "ne", "gra", "tis", "ob"]
CYRILLIC = ["ка", "ро", "ми", "тен", "са", "ло", "ви", "дер", "ан", "по", "лу", "стер", "не", "гра", "тис", "об"]


@dataclass(frozen=True)
class Corpus:
    centres: np.ndarray
    vocabulary: list[str]
    word_probabilities: np.ndarray
    topic_words: np.ndarray  # (centres, TOPIC_WORDS_PER_CENTRE) word indices
    noise: float
    seed: int

    def vectors(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        dim = self.centres.shape[1]
        points = self.centres[labels] + self.noise * rng.standard_normal(
            (labels.size, dim), dtype=np.float32
        ) / np.sqrt(dim)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    def texts(self, labels: np.ndarray, rng: np.random.Generator) -> list[str]:
        words = rng.choice(len(self.vocabulary), size=(labels.size, WORDS_PER_CHUNK), p=self.word_probabilities)
        topics = self.topic_words[labels][:, :TOPIC_WORDS_PER_CHUNK]
        vocabulary = self.vocabulary
        return [" ".join(vocabulary[i] for i in (*row, *topic)) for row, topic in zip(words, topics, strict=True)]

    def query_text(self, label: int, rng: np.random.Generator) -> str:
        topic = [self.vocabulary[i] for i in rng.choice(self.topic_words[label], 2, replace=False)]
        common = [self.vocabulary[i] for i in rng.choice(len(self.vocabulary), 2, p=self.word_probabilities)]
        return " ".join([*topic, *common])


def make_corpus(dim: int, centres: int, noise: float, vocabulary_size: int, seed: int) -> Corpus:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim), dtype=np.float32)
    middle /= np.linalg.norm(middle, axis=1, keepdims=True)
    vocabulary = sorted({_pseudo_word(rng) for _ in range(vocabulary_size * 2)})[:vocabulary_size]
    rng.shuffle(vocabulary)
    ranks = np.arange(1, len(vocabulary) + 1)
    probabilities = 1.0 / ranks**1.07
    probabilities /= probabilities.sum()
    # Topic words from the middle of the frequency range: specific, but not unique.
    topics = rng.integers(len(vocabulary) // 20, len(vocabulary), size=(centres, TOPIC_WORDS_PER_CENTRE))
    return Corpus(middle, vocabulary, probabilities, topics, noise, seed)


def _pseudo_word(rng: np.random.Generator) -> str:
    syllables = CYRILLIC if rng.random() < 0.5 else LATIN
    return "".join(syllables[i] for i in rng.integers(0, len(syllables), int(rng.integers(2, 5))))


def chunk_batches(corpus: Corpus, count: int, per_document: int) -> Iterator[tuple[str, list[ChunkRecord], np.ndarray]]:
    """Documents of ``per_document`` chunks: (document id, records, their vectors)."""
    rng = np.random.default_rng(corpus.seed + 1)
    for start in range(0, count, per_document):
        size = min(per_document, count - start)
        labels = rng.integers(0, len(corpus.centres), size)
        vectors = corpus.vectors(labels, rng)
        document_id = f"doc{start // per_document}"
        records = [
            ChunkRecord(f"{document_id}:{i}", document_id, TENANT, text, vector, {"cluster": int(label)})
            for i, (text, vector, label) in enumerate(zip(corpus.texts(labels, rng), vectors, labels, strict=True))
        ]
        yield document_id, records, vectors


def write_corpus(store: EmbeddedStore, corpus: Corpus, count: int, per_document: int) -> tuple[np.ndarray, list[str]]:
    """Write every chunk; returns all vectors and chunk ids in order (for the exact baseline)."""
    vectors = np.empty((count, corpus.centres.shape[1]), dtype=np.float32)
    chunk_ids: list[str] = []
    for document_id, records, batch in chunk_batches(corpus, count, per_document):
        store.replace_document(TENANT, document_id, records)
        vectors[len(chunk_ids) : len(chunk_ids) + len(records)] = batch
        chunk_ids.extend(record.chunk_id for record in records)
        if len(chunk_ids) % 100_000 < per_document:
            print(f"  wrote {len(chunk_ids):,} chunks", flush=True)
    return vectors, chunk_ids


def regenerate(corpus: Corpus, count: int, per_document: int) -> tuple[np.ndarray, list[str]]:
    """The vectors and chunk ids ``write_corpus`` wrote (same seed), without writing them again."""
    parts = [
        (batch, [record.chunk_id for record in records])
        for _, records, batch in chunk_batches(corpus, count, per_document)
    ]
    return np.concatenate([batch for batch, _ in parts]), [chunk_id for _, ids in parts for chunk_id in ids]


@dataclass(frozen=True)
class Query:
    text: str
    vector: np.ndarray


def make_queries(corpus: Corpus, count: int) -> list[Query]:
    rng = np.random.default_rng(corpus.seed + 2)
    labels = rng.integers(0, len(corpus.centres), count)
    vectors = corpus.vectors(labels, rng)
    return [Query(corpus.query_text(int(label), rng), vector) for label, vector in zip(labels, vectors, strict=True)]


def timed(run: Callable[[Query], list[str]], queries: list[Query]) -> tuple[list[float], list[list[str]]]:
    for query in queries[:WARM_UP_QUERIES]:
        run(query)  # page the index in: the first searches after a load measure the disk, not the search
    latencies, results = [], []
    for query in queries:
        start = time.perf_counter()
        results.append(run(query))
        latencies.append(time.perf_counter() - start)
    return latencies, results


def recall_at_10(results: list[list[str]], truth: list[list[str]]) -> float:
    return float(
        np.mean([len(set(found[:10]) & set(wanted)) / 10 for found, wanted in zip(results, truth, strict=True)])
    )


def folder_size(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def open_store(path: Path, args: argparse.Namespace, ef_search: int | None = None) -> EmbeddedStore:
    params = IndexParams(
        hnsw_m=args.m, hnsw_ef_construction=args.ef_construction, hnsw_ef_search=ef_search or args.ef_search[0]
    )
    return EmbeddedStore(path, index_params=params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--centres", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=0.35)
    parser.add_argument("--vocabulary", type=int, default=50_000)
    parser.add_argument("--chunks-per-document", type=int, default=100)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--m", type=int, default=IndexParams.hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=IndexParams.hnsw_ef_construction)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, IndexParams.hnsw_ef_search, 256, 512])
    parser.add_argument("--workdir", type=Path, default=None, help="where the store goes [a temporary folder]")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reuse", action="store_true", help="query the store already in --workdir; skip the build")
    parser.add_argument(
        "--store",
        choices=["embedded", "weaviate"],
        default="embedded",
        help="weaviate: also load the same chunks into a Weaviate server started here, and report it side by side",
    )
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    path = workdir / "store"
    corpus = make_corpus(args.dim, args.centres, args.noise, args.vocabulary, args.seed)
    queries = make_queries(corpus, args.queries)
    print(f"{args.chunks:,} chunks × {args.dim}-d, {args.centres} centres, noise {args.noise}; store at {path}")

    build: list[tuple[str, float, str]] = []
    if args.reuse and path.exists():
        vectors, chunk_ids = regenerate(corpus, args.chunks, args.chunks_per_document)
    else:
        shutil.rmtree(path, ignore_errors=True)
        store = open_store(path, args)
        start = time.perf_counter()
        vectors, chunk_ids = write_corpus(store, corpus, args.chunks, args.chunks_per_document)
        elapsed = time.perf_counter() - start
        build.append(("write chunks (SQLite + FTS5)", elapsed, f"{args.chunks / elapsed:,.0f} chunks/s"))
        start = time.perf_counter()
        store.warm(TENANT)  # the first use builds the index from SQLite in one batch, and snapshots it
        kind = f"{store.index_info(TENANT)['kind']}, M {args.m}, efConstruction {args.ef_construction}"
        build.append(("build vector index + snapshot", time.perf_counter() - start, kind))
        store.close()
    store = open_store(path, args)
    start = time.perf_counter()
    store.warm(TENANT)
    build.append(("reopen: load the snapshot", time.perf_counter() - start, ""))
    sqlite_bytes = sum(p.stat().st_size for p in path.glob("store.sqlite*"))
    vector_bytes = folder_size(path / "vectors")
    build.append(("disk: SQLite (text, vectors, FTS5)", sqlite_bytes / 2**30, "GiB"))
    build.append(("disk: vector index snapshot", vector_bytes / 2**30, "GiB"))
    print_table("Build", ["step", "seconds or GiB", "note"], build)

    def exact(query: Query) -> list[str]:
        scores = inner_products(vectors, query.vector)
        top = np.argpartition(-scores, 10)[:10]
        return [chunk_ids[i] for i in top[np.argsort(-scores[top])]]

    exact_latency, truth = timed(exact, queries)
    baseline = percentile(exact_latency, 50)
    rows: list[list[object]] = [_row("exact (numpy, all vectors)", exact_latency, baseline, 1.0)]
    for ef in args.ef_search:
        store.close()
        store = open_store(path, args, ef_search=ef)
        store.warm(TENANT)
        latency, results = timed(searcher(store, SearchMode.VECTOR), queries)
        rows.append(_row(f"store vector (HNSW efSearch {ef})", latency, baseline, recall_at_10(results, truth)))
    hybrid, bm25 = searcher(store, SearchMode.HYBRID), searcher(store, SearchMode.BM25)
    rows.append(_row(f"store hybrid (efSearch {args.ef_search[-1]})", timed(hybrid, queries)[0], baseline, None))
    rows.append(_row("store BM25 (FTS5)", timed(bm25, queries)[0], baseline, None))
    store.close()
    if args.store == "weaviate":
        rows += weaviate_rows(args, corpus, queries, truth, baseline, workdir)
    print_table(
        f"Queries: {args.queries} single queries, k=10, {args.chunks:,} chunks (ratio = p50 / exact p50)",
        ["search", "p50 ms", "p99 ms", "ratio", "recall@10"],
        rows,
    )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"the store stays in {path} (--reuse queries it again)")


def weaviate_rows(
    args: argparse.Namespace,
    corpus: Corpus,
    queries: list[Query],
    truth: list[list[str]],
    baseline: float,
    workdir: Path,
) -> list[list[object]]:
    """The same chunks in a Weaviate server on loopback (baton.store.weaviate, HNSW M 32 as max connections,
    efConstruction 200, ef 128): its build table, and its query rows for the shared table."""
    from baton.store.weaviate import WeaviateConfig, WeaviateStore
    from baton.store.weaviate_server import MAX_RESULTS, WeaviateServer, weaviate_binary

    binary = weaviate_binary()
    if binary is None:
        raise SystemExit("--store weaviate needs the Weaviate server: make weaviate")
    server = WeaviateServer(workdir / "weaviate", binary).start()
    config = WeaviateConfig(url=server.url, grpc_port=server.grpc_port, collection="Bench", max_results=MAX_RESULTS)
    store = WeaviateStore(config)
    try:
        build: list[tuple[str, float, str]] = []
        start = time.perf_counter()
        for index, (document_id, records, _) in enumerate(chunk_batches(corpus, args.chunks, args.chunks_per_document)):
            store.replace_document(TENANT, document_id, records)
            if (index + 1) * args.chunks_per_document % 100_000 < args.chunks_per_document:
                print(f"  weaviate: wrote {(index + 1) * args.chunks_per_document:,} chunks", flush=True)
        elapsed = time.perf_counter() - start
        build.append(
            ("write chunks (Weaviate, HNSW built on insert)", elapsed, f"{args.chunks / elapsed:,.0f} chunks/s")
        )
        build.append(("disk: Weaviate data folder", folder_size(workdir / "weaviate") / 2**30, "GiB"))
        print_table("Build (Weaviate)", ["step", "seconds or GiB", "note"], build)

        latency, results = timed(searcher(store, SearchMode.VECTOR), queries)
        hybrid, bm25 = searcher(store, SearchMode.HYBRID), searcher(store, SearchMode.BM25)
        return [
            _row("weaviate vector (HNSW ef 128)", latency, baseline, recall_at_10(results, truth)),
            _row("weaviate hybrid (two searches, baton fusion)", timed(hybrid, queries)[0], baseline, None),
            _row("weaviate BM25", timed(bm25, queries)[0], baseline, None),
        ]
    finally:
        store.close()
        server.stop()


def searcher(store: VectorStore, mode: SearchMode) -> Callable[[Query], list[str]]:
    """One benchmark query through ``store`` in ``mode``: the ids of its top 10. Every store answers the same
    request, so the rows of both backends measure the same thing."""

    def search(query: Query) -> list[str]:
        request = StoreQuery(
            tenant=TENANT,
            text="" if mode is SearchMode.VECTOR else query.text,
            vector=None if mode is SearchMode.BM25 else query.vector,
            k=10,
            mode=mode,
            embedder_languages=["*"],
        )
        return [hit.chunk_id for hit in store.search(request)]

    return search


def _row(name: str, latencies: list[float], baseline: float, recall: float | None) -> list[object]:
    p50 = percentile(latencies, 50)
    return [name, p50 * 1000, percentile(latencies, 99) * 1000, p50 / baseline, "" if recall is None else recall]


if __name__ == "__main__":
    main()
