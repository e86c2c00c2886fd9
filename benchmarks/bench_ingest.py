"""End-to-end ingest throughput: pages/s through the real stack, and where the time goes.

A generated corpus of >= 2,000 pages (a mix of md, html and multi-page pdf, English text from SciFact abstracts and
Russian text) is ingested by a real gateway + embedder (a fresh `baton up`-style stack). Reported:
- pages/s and chunks/s end to end (the folder-ingest job, wall clock);
- the embedder's busy time (sum of its forward passes, from its own /metrics) as a fraction of the wall time —
  the issue's goal is >= 80 %, i.e. parsing, cleaning, chunking and storing are cheap next to embedding. The
  baseline is the embedder's own forward-pass time for the same chunks, measured in the same run.

    .venv/bin/python benchmarks/bench_ingest.py [--pages 2000]

The stack runs the embedder's default model (multilingual-e5-small); BATON_EMBEDDER_MODEL=all-minilm-l6-v2 in the
environment runs MiniLM instead. The table names the model.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baton.clients.gateway import GatewayClient
from baton.runtime.process import free_port
from baton.stack import Stack, StackPorts
from benchmarks.common import print_table

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
RUSSIAN = (
    "Закваска — это культура диких дрожжей и молочнокислых бактерий. Её кормят мукой и водой каждый день. "
    "Исайя Берлин различал негативную и позитивную свободу. Кант считал, что свобода воли есть способность "
    "разума давать себе закон. Помидорам нужно не меньше шести часов прямого солнца в день. "
)
WORDS_PER_PAGE = 350


def paragraphs(rng: random.Random) -> list[str]:
    texts = [json.loads(line)["text"] for line in SCIFACT.open(encoding="utf-8") if line.strip()]
    rng.shuffle(texts)
    return texts


def page_text(source: list[str], rng: random.Random) -> str:
    words: list[str] = []
    while len(words) < WORDS_PER_PAGE:
        words += (source.pop() if rng.random() < 0.8 else RUSSIAN).split()
    return " ".join(words[:WORDS_PER_PAGE])


def write_corpus(folder: Path, pages: int, seed: int = 0) -> int:
    from fpdf import FPDF

    rng = random.Random(seed)
    source = paragraphs(rng)
    written = 0
    index = 0
    while written < pages:
        kind = ("md", "html", "pdf")[index % 3]
        count = 4 if kind == "pdf" else 2
        texts = [page_text(source, rng) for _ in range(count)]
        name = folder / f"doc-{index:05d}.{kind}"
        if kind == "md":
            name.write_text(f"# Document {index}\n\n" + "\n\n## Part\n\n".join(texts), encoding="utf-8")
        elif kind == "html":
            body = "".join(f"<h2>Part {i}</h2><p>{t}</p>" for i, t in enumerate(texts))
            name.write_text(f"<html><head><title>Doc {index}</title></head><body><nav>Home</nav>{body}"
                            "<footer>(c) 2026</footer></body></html>", encoding="utf-8")  # fmt: skip
        else:
            pdf = FPDF()
            pdf.add_font("DejaVu", fname=str(FONT))
            pdf.set_font("DejaVu", size=10)
            for text in texts:
                pdf.add_page()
                pdf.multi_cell(0, 5, text)
            pdf.output(str(name))
        written += count
        index += 1
    return written


def embedder_busy_s(metrics_url: str) -> float:
    for line in httpx.get(metrics_url).text.splitlines():
        if line.startswith("baton_embedder_inference_seconds_sum"):
            return float(line.split()[-1])
    raise RuntimeError("the embedder's /metrics has no baton_embedder_inference_seconds_sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        pages = write_corpus(corpus, args.pages)
        files = len(list(corpus.iterdir()))
        ports = StackPorts(scheduler=free_port(), embedder=free_port(), embedder_http=free_port(), gateway=free_port())
        stack = Stack(Path(tmp) / "home", ports, allowed_roots=[corpus])
        stack.up()
        metrics_url = f"http://127.0.0.1:{ports.embedder_http}/metrics"
        model = httpx.get(f"http://127.0.0.1:{ports.embedder_http}/info").json()["model_id"]
        try:
            with GatewayClient(ports.gateway_url, api_key=stack.api_key) as client:
                busy_before = embedder_busy_s(metrics_url)
                started = time.monotonic()
                job = client.follow_job(str(client.start_folder_ingest(corpus)["id"]), lambda _: None)
                wall = time.monotonic() - started
                busy = embedder_busy_s(metrics_url) - busy_before
                report = job["report"]
                assert job["state"] == "succeeded" and report["failed"] == 0, job
        finally:
            stack.down()
    chunks = int(report["chunks"])
    print_table(
        f"Ingest, end to end: {pages} pages in {files} files (md/html/pdf, English + Russian), embedder {model}",
        ["measure", "value"],
        [
            ["wall time, s", wall],
            ["pages/s", pages / wall],
            ["chunks", chunks],
            ["chunks/s", chunks / wall],
            ["embedder busy (forward passes), s", busy],
            ["embedding share of wall time", busy / wall],
            ["goal: embedding share >= 0.80", "met" if busy / wall >= 0.8 else "NOT met"],
        ],
    )


if __name__ == "__main__":
    main()
