"""baton.evaluation.answers without a stack: SQuAD normalisation, whole-word containment, the dataset checks, the
summary per mode and the CLI's table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baton.cli.eval_answers import _print_table
from baton.evaluation.answers import AnswerSet, Outcome, contains_answer, doc_id_of, normalize, report, summarise
from baton.runtime.errors import InvalidArgument


def test_squad_normalisation_and_whole_word_containment() -> None:
    assert normalize("  The  Panthers' DEFENSE, an  example! ") == "panthers defense example"
    assert contains_answer("The Panthers gave up 308 points.", ["308"])
    assert contains_answer("It was the Denver Broncos.", ["Denver Broncos", "Broncos"])
    assert contains_answer("They beat the Panthers", ["the panthers"]), "articles never decide"
    assert not contains_answer("It happened in 1924.", ["24"]), "a number inside another is not the answer"
    assert not contains_answer("", ["four"]) and not contains_answer("four", [""])
    assert doc_id_of({"source": "upload://xquad-en/xq07p2.txt"}) == "xq07p2"


def write(folder: Path, name: str, rows: list[dict]) -> None:
    (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def dataset(folder: Path) -> Path:
    write(folder, "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "x"}, {"_id": "d2", "text": "y"}])
    write(folder, "queries.jsonl", [{"_id": f"q{n}", "text": f"question {n}?"} for n in range(5)])
    write(folder, "answers.jsonl", [{"_id": f"q{n}", "doc_id": "d1", "answers": [f"a{n}"]} for n in range(5)])
    return folder


def test_load_takes_a_slice_in_file_order(tmp_path: Path) -> None:
    loaded = AnswerSet.load(dataset(tmp_path), max_questions=2, offset=1)
    assert [q.id for q in loaded.questions] == ["q1", "q2"] and loaded.questions[0].answers == ("a1",)
    assert loaded.corpus["d1"] == ("T", "x") and loaded.name == tmp_path.name


def test_a_bad_dataset_says_what_the_folder_must_hold(tmp_path: Path) -> None:
    write(tmp_path, "corpus.jsonl", [{"_id": "d1", "text": "x"}])
    with pytest.raises(InvalidArgument, match=r"lacks queries\.jsonl, answers\.jsonl.*answers\.jsonl \(\{"):
        AnswerSet.load(tmp_path)
    dataset(tmp_path)
    write(tmp_path, "answers.jsonl", [{"_id": "q1", "doc_id": "nowhere", "answers": ["a"]}])
    with pytest.raises(InvalidArgument, match=r"doc_id found in corpus\.jsonl"):
        AnswerSet.load(tmp_path)


def outcome(mode: str, correct: bool, cited: tuple[str, ...], latency: float, error: str = "") -> Outcome:
    sources = ("d1", "d2") if mode == "rag" else ()
    return Outcome("q", mode, "answer", correct, cited, sources, "d1", latency, 100 if mode == "rag" else 10, 5, error)


def test_summary_per_mode_and_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outcomes = [
        outcome("rag", True, ("d1",), 1.0),
        outcome("no-rag", False, (), 0.5),
        outcome("rag", False, ("d2",), 3.0),
        outcome("no-rag", True, (), 0.7),
        outcome("rag", False, (), 0.0, error="the gateway did not answer"),
    ]
    rows = {row.mode: row for row in summarise(outcomes)}
    rag = rows["rag"]
    assert (rag.questions, rag.errors, rag.contains_gold, rag.cites_gold) == (2, 1, 0.5, 0.5)
    assert rag.gold_in_sources == 1.0 and rag.citations_per_answer == 1.0 and rag.mean_prompt_tokens == 100
    assert rag.latency_p50_s == pytest.approx(2.0) and rag.latency_p95_s == pytest.approx(2.9)
    assert (rag.right_answers, rag.right_citing_gold, rag.wrong_citing_gold, rag.citing_nothing) == (1, 1, 0, 0)
    assert rows["no-rag"].cites_gold == 0 and rows["no-rag"].contains_gold == 0.5 and rows["no-rag"].citing_nothing == 2
    result = report(AnswerSet.load(dataset(tmp_path)), list(rows.values()), outcomes, max_tokens=64, k=None)
    assert result["rag_over_no_rag"] == 1.0 and len(result["answers"]) == 5
    json.dumps(result)  # --json prints it
    _print_table(result)
    table = capsys.readouterr().out
    assert "SQuAD" in table and "(1 failed)" in table and "RAG on / off: 1.0×" in table
    assert "rag: cites gold in 1 of 1 right answers and 0 of 1 wrong ones; 0 cite no source" in table
    assert "no-rag: cites" not in table  # no sources, nothing to break down
