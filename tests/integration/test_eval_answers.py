"""``baton eval answers`` end to end: the command line against a real stack (shared MiniLM embedder, SmolLM2-135M-
Instruct on the hf engine, a gateway), on a small XQuAD-en slice written to a temporary BEIR folder: 10 questions
(every 20th of questions 200–400) and a corpus of their paragraphs plus the other paragraphs of the same articles
(near-miss distractors). Reads ../shared/data (never copied into the project).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.fixtures.embedder import EmbedderHandle
from tests.integration.real_model_stack import real_model_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DATA = Path(os.environ.get("BATON_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
QUESTIONS = range(200, 400, 20)


def slice_of_xquad(folder: Path) -> Path:
    """A BEIR folder with the chosen questions and the paragraphs of their articles."""
    source = DATA / "xquad-en"
    assert (source / "answers.jsonl").exists(), f"benchmark data missing at {source} (see ../shared/data/README.md)"
    answers = [json.loads(line) for line in (source / "answers.jsonl").read_text().splitlines() if line.strip()]
    chosen = [answers[i] for i in QUESTIONS]
    articles = {row["doc_id"].rsplit("p", 1)[0] for row in chosen}  # xq07p2 -> article xq07
    corpus = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines() if line.strip()]
    ids = {row["_id"] for row in chosen}
    queries = [json.loads(line) for line in (source / "queries.jsonl").read_text().splitlines() if line.strip()]
    folder.mkdir()
    write_jsonl(folder / "answers.jsonl", chosen)
    write_jsonl(folder / "corpus.jsonl", [row for row in corpus if row["_id"].rsplit("p", 1)[0] in articles])
    write_jsonl(folder / "queries.jsonl", [row for row in queries if row["_id"] in ids])
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def baton(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "baton.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=500)


def test_answers_use_the_facts_with_rag_and_cite_the_gold_document(
    embedder_service: EmbedderHandle, smollm2: Path, tmp_path: Path
) -> None:
    dataset = slice_of_xquad(tmp_path / "xquad-slice")
    with real_model_stack(embedder_service, smollm2, tmp_path / "stack") as stack:
        env = {"BATON_GATEWAY_ADMIN_KEY": stack.gateway.admin_key}
        # Four chats at a time, batched by the engine: this test was one of the suite's longest serially.
        ran = baton("eval", "answers", "--beir", str(dataset), "--max-questions", "10", "--concurrency", "4",
                    "--json", "--gateway", stack.gateway.url, env=env)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout)
    rag, off = result["modes"]["rag"], result["modes"]["no-rag"]
    print(json.dumps({"rag": rag, "no-rag": off}, indent=1))
    assert result["questions"] == 10 and len(result["answers"]) == 20
    assert rag["questions"] == off["questions"] == 10 and rag["errors"] == off["errors"] == 0
    assert rag["gold_in_sources"] >= 0.9, "retrieval puts the gold paragraph into the prompt"
    assert rag["contains_gold"] >= 0.2 and rag["contains_gold"] > off["contains_gold"], "RAG answers use the facts"
    assert rag["cites_gold"] >= 0.7 and off["cites_gold"] == 0 and off["gold_in_sources"] == 0
    # A right answer took its words from the gold source, so it cites it (80 of 81 on the first 200, evaluation.md).
    assert rag["right_citing_gold"] + rag["wrong_citing_gold"] == round(rag["cites_gold"] * rag["questions"])
    assert rag["right_citing_gold"] >= rag["right_answers"] - 1 and off["citing_nothing"] == off["questions"]
    assert rag["mean_prompt_tokens"] > off["mean_prompt_tokens"] > 0
    assert 0 < rag["latency_p50_s"] <= rag["latency_p95_s"] and 0 < off["latency_p50_s"] <= off["latency_p95_s"]
    correct = [a for a in result["answers"] if a["correct"]]
    assert all(a["answer"] for a in correct) and result["settings"]["max_tokens"] == 64


def test_a_folder_without_answers_is_refused_with_what_it_must_hold(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    ran = baton("eval", "answers", "--beir", str(tmp_path), "--gateway", "http://127.0.0.1:9")
    assert ran.returncode != 0
    assert "lacks queries.jsonl, answers.jsonl" in ran.stderr and '"answers": [...]' in ran.stderr, ran.stderr
