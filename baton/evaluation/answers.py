"""Do answers use the facts? Ask a BEIR-layout question set through the gateway's chat, with memory (RAG) on and off.

The folder holds ``corpus.jsonl`` ({"_id", "title", "text"}), ``queries.jsonl`` ({"_id", "text"}) and
``answers.jsonl`` ({"_id", "doc_id", "answers": [...]}: the gold answers of a query and the document that holds
them). Per question and mode it records whether the answer contains a gold answer, which documents the answer cites,
the latency seen by the client and the prompt tokens the model read; ``summarise`` folds that into one row per mode.

"Contains a gold answer" uses SQuAD's answer normalisation (casefold, punctuation and the articles a/an/the removed,
whitespace collapsed) on both sides, then looks for the gold answer as a whole-word run inside the answer, so that
"24" is not found in "1924".

Nothing here speaks HTTP itself: the caller hands in a ``GatewayClient`` acting for a tenant that holds the corpus.
"""

from __future__ import annotations

import json
import re
import statistics
import string
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from baton.clients.gateway import GatewayClient
from baton.runtime.errors import BatonError, InvalidArgument

REQUIRED_FILES = ("corpus.jsonl", "queries.jsonl", "answers.jsonl")
MODES = ("rag", "no-rag")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    doc_id: str  # the document that holds the answer
    answers: tuple[str, ...]


@dataclass(frozen=True)
class AnswerSet:
    name: str
    corpus: dict[str, tuple[str, str]]  # id -> (title, text)
    questions: list[Question]  # in answers.jsonl order

    @classmethod
    def load(cls, folder: Path, *, max_questions: int | None = None, offset: int = 0) -> AnswerSet:
        """The questions ``offset``..``offset + max_questions`` of answers.jsonl (tune on one slice, report another)."""
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise InvalidArgument(
                f"{folder} is not an answer set: it lacks {', '.join(missing)}. The folder must hold corpus.jsonl "
                '({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}) and answers.jsonl ({"_id", "doc_id", '
                '"answers": [...]}, one line per question)',
                reason="BAD_DATASET",
            )
        corpus = {row["_id"]: (row.get("title", ""), row["text"]) for row in _jsonl(folder / "corpus.jsonl")}
        texts = {row["_id"]: row["text"] for row in _jsonl(folder / "queries.jsonl")}
        questions = []
        for number, row in enumerate(_jsonl(folder / "answers.jsonl")):
            if number < offset:
                continue
            if max_questions is not None and len(questions) >= max_questions:
                break
            questions.append(_question(row, texts, corpus, folder))
        return cls(folder.name, corpus, questions)


def _question(row: dict[str, Any], texts: dict[str, str], corpus: dict[str, Any], folder: Path) -> Question:
    query_id, doc_id, answers = row.get("_id"), row.get("doc_id"), row.get("answers")
    if query_id not in texts or doc_id not in corpus or not answers:
        raise InvalidArgument(
            f"{folder / 'answers.jsonl'}: line {row!r} needs an _id found in queries.jsonl, a doc_id found in "
            "corpus.jsonl and a non-empty list of answers",
            reason="BAD_DATASET",
        )
    return Question(str(query_id), texts[query_id], str(doc_id), tuple(str(a) for a in answers))


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as error:
                raise InvalidArgument(f"{path}:{number}: not JSON ({error})", reason="BAD_DATASET") from None


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: casefold, drop punctuation and articles, collapse whitespace."""
    text = text.casefold().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_answer(answer: str, golds: Sequence[str]) -> bool:
    """A normalised gold answer occurs in the normalised answer as whole words."""
    padded = f" {normalize(answer)} "
    return any(gold and f" {gold} " in padded for gold in map(normalize, golds))


def doc_id_of(citation: dict[str, Any]) -> str:
    """The BEIR id of a cited document: the corpus is uploaded as ``<id>.txt`` (baton.beir.upload_corpus)."""
    return Path(str(citation.get("source", ""))).name.removesuffix(".txt")


@dataclass(frozen=True)
class Outcome:
    question_id: str
    mode: str  # "rag" | "no-rag"
    answer: str
    correct: bool  # the answer contains a gold answer
    cited_docs: tuple[str, ...]  # documents the answer cites
    source_docs: tuple[str, ...]  # documents packed into the prompt as sources
    gold_doc: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    error: str = ""

    @property
    def cites_gold(self) -> bool:
        return self.gold_doc in self.cited_docs


def ask(
    client: GatewayClient,
    question: Question,
    mode: str,
    *,
    max_tokens: int,
    k: int | None,
    grounding: float | None = None,
) -> Outcome:
    """One greedy chat with memory on (``rag``) or off (``no-rag``), timed as the client sees it; ``grounding``:
    the context-aware decoding weight with memory (None: the gateway's default)."""
    options: dict[str, Any] = {"rag": mode == "rag"}
    if k is not None and mode == "rag":
        options["k"] = k
    if grounding is not None and mode == "rag":
        options["grounding"] = grounding
    started = time.perf_counter()
    try:
        reply = client.chat([{"role": "user", "content": question.text}], baton=options, temperature=0,
                            max_tokens=max_tokens)  # fmt: skip
    except BatonError as error:
        return Outcome(question.id, mode, "", False, (), (), question.doc_id, 0.0, 0, 0, error=str(error))
    latency = time.perf_counter() - started
    answer = str(reply["choices"][0]["message"]["content"] or "")
    citations = (reply.get("baton") or {}).get("citations") or []
    usage = reply.get("usage") or {}
    return Outcome(
        question_id=question.id,
        mode=mode,
        answer=answer,
        correct=contains_answer(answer, question.answers),
        cited_docs=tuple(dict.fromkeys(doc_id_of(c) for c in citations if c.get("cited"))),
        source_docs=tuple(dict.fromkeys(doc_id_of(c) for c in citations)),
        gold_doc=question.doc_id,
        latency_s=latency,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
    )


def run(
    client: GatewayClient,
    questions: Sequence[Question],
    *,
    modes: Sequence[str] = MODES,
    max_tokens: int = 64,
    k: int | None = None,
    grounding: float | None = None,
    concurrency: int = 1,
    on_done: Callable[[Outcome], None] = lambda _: None,
) -> list[Outcome]:
    """Every question in every mode; the modes of one question are asked together, so that both see the same load
    on the machine (latencies are compared between modes)."""
    jobs = [(question, mode) for question in questions for mode in modes]

    def one(job: tuple[Question, str]) -> Outcome:
        outcome = ask(client, job[0], job[1], max_tokens=max_tokens, k=k, grounding=grounding)
        on_done(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, jobs))


@dataclass(frozen=True)
class ModeSummary:
    mode: str
    questions: int
    errors: int
    contains_gold: float  # share of answers containing a gold answer
    cites_gold: float  # share of answers citing the gold document
    gold_in_sources: float  # share of prompts whose sources hold the gold document (retrieval + packing)
    citations_per_answer: float  # documents cited per answer (precision check: citing everything is not a win)
    # Citations by answer: a right answer takes its words from its source, so it cites the gold document; a wrong
    # one cites the distractor it copied or, made up, nothing — the citation rate is bound to the answer rate.
    right_answers: int
    right_citing_gold: int
    wrong_citing_gold: int
    citing_nothing: int  # answers attributed to no source
    latency_p50_s: float
    latency_p95_s: float
    mean_prompt_tokens: float
    mean_completion_tokens: float


def summarise(outcomes: Sequence[Outcome]) -> list[ModeSummary]:
    rows = []
    for mode in dict.fromkeys(o.mode for o in outcomes):
        done = [o for o in outcomes if o.mode == mode and not o.error]
        count = max(1, len(done))
        latencies = sorted(o.latency_s for o in done)
        rows.append(
            ModeSummary(
                mode=mode,
                questions=len(done),
                errors=sum(1 for o in outcomes if o.mode == mode and o.error),
                contains_gold=sum(o.correct for o in done) / count,
                cites_gold=sum(o.cites_gold for o in done) / count,
                gold_in_sources=sum(o.gold_doc in o.source_docs for o in done) / count,
                citations_per_answer=sum(len(o.cited_docs) for o in done) / count,
                right_answers=sum(o.correct for o in done),
                right_citing_gold=sum(o.correct and o.cites_gold for o in done),
                wrong_citing_gold=sum(not o.correct and o.cites_gold for o in done),
                citing_nothing=sum(not o.cited_docs for o in done),
                latency_p50_s=_percentile(latencies, 50),
                latency_p95_s=_percentile(latencies, 95),
                mean_prompt_tokens=sum(o.prompt_tokens for o in done) / count,
                mean_completion_tokens=sum(o.completion_tokens for o in done) / count,
            )
        )
    return rows


def _percentile(ordered: Sequence[float], percent: int) -> float:
    if not ordered:
        return 0.0
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[percent - 1]


def report(dataset: AnswerSet, rows: Sequence[ModeSummary], outcomes: Sequence[Outcome], **settings: Any) -> dict:
    """Everything as one JSON-ready dict (``baton eval answers --json``)."""
    by_mode = {row.mode: row for row in rows}
    on, off = by_mode.get("rag"), by_mode.get("no-rag")
    ratio = on.contains_gold / off.contains_gold if on and off and off.contains_gold else None
    return {
        "dataset": dataset.name,
        "documents": len(dataset.corpus),
        "questions": len(dataset.questions),
        "settings": settings,
        "normalisation": "SQuAD: casefold, punctuation and articles (a, an, the) removed, whitespace collapsed; "
        "a gold answer must occur as whole words",
        "modes": {row.mode: asdict(row) for row in rows},
        "rag_over_no_rag": ratio,
        "answers": [asdict(o) | {"cites_gold": o.cites_gold} for o in outcomes],
    }
