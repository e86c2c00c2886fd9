"""Context packing with a real tokenizer: the tiny Qwen3's, through the inference service's own PromptTokenizer
(the code behind CountTokens), so the budget checked here is the one the served model sees."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from baton.store.base import Hit
from baton.v1 import inference_pb2 as pb
from services.gateway.chat.citations import citations, cited_numbers
from services.gateway.chat.local_tokens import LocalTokenCounter, TokenCounters
from services.gateway.chat.packing import (
    WHOLE,
    Passage,
    SourcePolicy,
    TokenCounts,
    compress,
    dedupe,
    focus,
    pack_context,
    sentence_spans,
    stems,
)
from services.gateway.chat.prompt import CHAT, CITE_INSTRUCTION, COMPLETION, SOURCE_SEPARATOR, Prompt, Turn
from services.gateway.chat.service import ChatService, RagOptions
from services.inference.prompts import PromptTokenizer

TOPICS = [
    ("Otters", "Sea otters hold hands while they sleep so that they do not drift apart"),
    ("Bees", "Honey bees dance to tell the hive where the flowers are"),
    ("Rivers", "The Volga is the longest river in Europe and flows into the Caspian Sea"),
    ("Bread", "A sourdough starter is fed with flour and water every day"),
    ("Stars", "Betelgeuse is a red supergiant in the constellation Orion"),
    ("Кант", "Иммануил Кант считал, что свобода воли есть способность разума давать себе закон"),
    ("Glass", "Glass is made by melting sand with soda ash and lime"),
    ("Tea", "Green tea is steamed or pan-fired soon after picking to stop oxidation"),
]


class LocalCounter(LocalTokenCounter):
    """The gateway's local counter (the PromptTokenizer behind CountTokens, in this process), counting its calls."""

    def __init__(self, tokenizer: PromptTokenizer, max_model_len: int) -> None:
        super().__init__(tokenizer, max_model_len, None)
        self.calls = 0

    async def count(self, texts: Sequence[str], prompt: Prompt) -> TokenCounts:
        self.calls += 1
        return await super().count(texts, prompt)

    def prompt_tokens(self, prompt: Prompt) -> int:
        """A chat rendered with the template, or a completion text with special tokens: what Generate feeds."""
        return self.count_here([], prompt).prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_llm: Path) -> PromptTokenizer:
    return PromptTokenizer(tiny_llm)


def section_text(topic: str, fact: str, sentences: int) -> str:
    filler = [f"{topic} note {i}: the archive keeps {i * 7} pages of plain remarks." for i in range(sentences)]
    return " ".join([f"{fact}.", *filler])


def chunk_section(
    document_id: str, text: str, *, section: int = 0, per_chunk: int = 3, overlap: int = 1, first_index: int = 0
) -> list[Hit]:
    """Chunks over sentence spans with ``overlap`` sentences shared, as the ingest chunker lays them out."""
    spans = sentence_spans(text)
    hits = []
    step = per_chunk - overlap
    for index, first in enumerate(range(0, max(1, len(spans) - overlap), step), first_index):
        last = min(first + per_chunk, len(spans)) - 1
        start, end = spans[first][0], spans[last][1]
        meta = {"title": "Doc", "heading": f"Part {section}", "section_index": section, "start": start, "end": end}
        meta |= {"chunk_index": index, "page": section + 1, "source": f"{document_id}.md", "collection": "default"}
        hits.append(Hit(f"{document_id}:{index}", document_id, text[start:end], meta, score=0.0))
    return hits


def scored(hits: list[Hit], scores: Sequence[float]) -> list[Hit]:
    return [Hit(h.chunk_id, h.document_id, h.text, h.metadata, score=s) for h, s in zip(hits, scores, strict=True)]


def topic_hits(rng: random.Random, sentences: int = 6) -> list[Hit]:
    """One whole-section chunk per topic document, with distinct random scores."""
    hits = []
    for n, (topic, fact) in enumerate(TOPICS):
        text = section_text(topic, fact, sentences + rng.randrange(6))
        meta = {"title": topic, "heading": "", "section_index": 0, "start": 0, "end": len(text), "chunk_index": 0}
        hits.append(Hit(f"d{n}:0", f"d{n}", text, meta, score=rng.random()))
    return hits


def conversation(question: str = "Where do otters sleep and why?") -> list[Turn]:
    return [("system", "You are a careful assistant."), ("user", "Hello"), ("assistant", "Hi!"), ("user", question)]


def pack(
    hits: list[Hit],
    counter: LocalCounter,
    reserved: int,
    chat: list[Turn] | None = None,
    query: str = "",
    policy: SourcePolicy = WHOLE,
):
    chat = chat or conversation()
    question = query or chat[-1][1]
    return asyncio.run(pack_context(hits, chat, counter, reserved_tokens=reserved, query=question, policy=policy))


def test_the_budget_is_never_exceeded(tokenizer: PromptTokenizer) -> None:
    rng = random.Random(7)
    for max_model_len in (256, 512, 1024, 4096):
        counter = LocalCounter(tokenizer, max_model_len)
        for reserved in sorted({16, 64, max_model_len // 4, max_model_len // 2, max_model_len - 150}):
            hits = topic_hits(rng)
            long = chunk_section("long", section_text("Otters", TOPICS[0][1], 30))
            hits += scored(long, [rng.random() for _ in long])
            packed = pack(hits, counter, reserved)
            exact = counter.prompt_tokens(packed.prompt)
            assert exact + reserved <= max_model_len, (max_model_len, reserved, exact)
            if packed.passages:
                assert packed.prompt_tokens == exact
            frame = counter.prompt_tokens(CHAT.render(conversation(), []))
            assert packed.budget_tokens == max_model_len - reserved - frame


def test_keeps_the_highest_scoring_chunks_first(tokenizer: PromptTokenizer) -> None:
    rng = random.Random(11)
    for max_model_len in (600, 800, 1100, 1500):
        counter = LocalCounter(tokenizer, max_model_len)
        hits = topic_hits(rng)
        packed = pack(hits, counter, reserved=100)
        ranking = [h.chunk_id for h in sorted(hits, key=lambda h: -h.score)]
        kept = [p.best.chunk_id for p in packed.passages]
        assert kept == ranking[: len(kept)], "a best-first prefix of the ranking"
        assert all(not p.compressed for p in packed.passages[:-1]), "only the last (lowest-scoring) is shortened"
        assert 0 < len(kept) < len(hits), "the budget should hold some, not all"
        assert packed.left_out + len(kept) == len(hits)
        assert counter.prompt_tokens(packed.prompt) + 100 <= max_model_len


def test_identical_and_contained_chunks_are_dropped() -> None:
    text = section_text("Otters", TOPICS[0][1], 8)
    chunks = scored(chunk_section("a", text), [0.9, 0.8, 0.7, 0.6])
    copy = Hit("b:0", "b", "  " + chunks[0].text.upper() + " ", {"title": "B"}, score=0.5)  # same text elsewhere
    inner_start = chunks[1].metadata["start"] + 5
    inner_meta = dict(chunks[1].metadata) | {"start": inner_start, "end": inner_start + 20, "chunk_index": 40}
    inner = Hit("a:40", "a", text[inner_start : inner_start + 20], inner_meta, score=0.65)  # inside a:1
    kept, dropped = dedupe([*chunks, copy, inner])
    assert [h.chunk_id for h in kept] == ["a:0", "a:1", "a:2", "a:3"]
    assert dropped == 2


def test_overlapping_neighbours_merge_into_one_exact_passage(tokenizer: PromptTokenizer) -> None:
    text = section_text("Otters", TOPICS[0][1], 10)
    chunks = scored(chunk_section("a", text), [0.9, 0.5, 0.8, 0.1, 0.05])
    other_text = section_text("Seals", "Seals sleep in the water too", 10)
    other_section = scored(chunk_section("a", other_text, section=1, first_index=10), [0.7] + [0.0] * 4)[:1]
    packed = pack([*chunks[:3], *other_section], LocalCounter(tokenizer, 4096), reserved=64)
    first = packed.passages[0]
    assert sorted(h.chunk_id for h in first.hits) == ["a:0", "a:1", "a:2"] and first.best.chunk_id == "a:0"
    assert first.text == text[chunks[0].metadata["start"] : chunks[2].metadata["end"]], "overlaps not repeated"
    assert packed.merged == 2 and len(packed.passages) == 2, "another section stays a source of its own"
    cites = citations(packed.passages, "As said in [1] and [2, 3].")
    assert cites[0]["chunk_ids"] == ["a:0", "a:1", "a:2"] and cites[0]["chunk_id"] == "a:0"
    assert [c["cited"] for c in cites] == [True, True]
    assert cites[0]["page"] == 1 and cites[1]["heading"] == "Part 1"


def test_a_chunk_over_budget_is_compressed_keeping_the_relevant_sentences(tokenizer: PromptTokenizer) -> None:
    text = section_text("Archive", "Preface of the archive", 40)
    key = "Sea otters hold hands while they sleep so that they do not drift apart."
    spans = sentence_spans(text)
    middle = spans[20][1]
    text = f"{text[:middle]} {key} {text[middle + 1 :]}"
    hit = Hit("x:0", "x", text, {"title": "Archive", "start": 0, "end": len(text), "section_index": 0}, score=1.0)
    counter = LocalCounter(tokenizer, 400)
    packed = pack([hit], counter, reserved=64, query="Why do otters hold hands while they sleep?")
    assert len(packed.passages) == 1 and packed.compressed == 1
    kept = packed.passages[0].text
    assert key in kept and "…" in kept and len(kept) < len(text)
    assert counter.prompt_tokens(packed.prompt) + 64 <= 400
    assert citations(packed.passages)[0]["compressed"] is True


def test_no_room_means_no_sources(tokenizer: PromptTokenizer) -> None:
    counter = LocalCounter(tokenizer, 256)
    chat = conversation("Tell me everything. " * 40)
    packed = pack(topic_hits(random.Random(1)), counter, reserved=64, chat=chat)
    assert packed.passages == [] and packed.prompt == chat and packed.prompt_tokens is None
    assert packed.left_out == len(TOPICS) and counter.calls == 1


def test_sources_are_numbered_in_the_last_user_turn_and_the_system_prompt_asks_for_citations(
    tokenizer: PromptTokenizer,
) -> None:
    packed = pack(topic_hits(random.Random(3)), LocalCounter(tokenizer, 4096), reserved=64)
    system, *_, (role, last) = packed.prompt
    assert system == ("system", f"You are a careful assistant.\n\n{CITE_INSTRUCTION}")
    assert (
        role == "user"
        and last.startswith("[1] ")  # no "Sources:" header for a chat (measured: prompt.py)
        and last.endswith("Question: Where do otters sleep and why?")
    )
    numbers = [int(n) for n in re.findall(r"^\[(\d+)\] ", last, flags=re.MULTILINE)]
    assert numbers == list(range(1, len(packed.passages) + 1))
    titles = [line.split(" ", 1)[1] for line in last.splitlines() if re.match(r"\[\d+\] ", line)]
    assert titles == [passage.best.metadata["title"] for passage in packed.passages]
    assert packed.prompt[1:3] == conversation()[1:3], "earlier turns are untouched (prefix cache)"
    plain = pack(topic_hits(random.Random(3)), LocalCounter(tokenizer, 4096), reserved=64, chat=[("user", "Hi")])
    assert plain.prompt[0] == ("system", CITE_INSTRUCTION)


def test_unlabelled_sources_are_the_passages_alone(tokenizer: PromptTokenizer) -> None:
    bare = dataclasses.replace(WHOLE, labels=False)
    packed = pack(topic_hits(random.Random(3)), LocalCounter(tokenizer, 4096), reserved=64, policy=bare)
    passages = SOURCE_SEPARATOR.join(passage.text for passage in packed.passages)
    assert len(packed.passages) > 1
    assert packed.prompt[-1] == ("user", f"{passages}\n\nQuestion: Where do otters sleep and why?")
    assert citations(packed.passages)[1]["marker"] == "[2]", "the client still gets numbered citations"


def test_a_chat_model_gets_bare_sources_a_base_model_numbered_ones_unless_the_request_says() -> None:
    service = ChatService(None, None, answer_tokens=64)  # type: ignore[arg-type]  # policy() uses neither
    chat, completion = service.policy(RagOptions(True), CHAT), service.policy(RagOptions(True), COMPLETION)
    assert (chat.labels, chat.sentences) == (False, 2) and (completion.labels, completion.sentences) == (True, 2)
    asked = service.policy(RagOptions(True, labels=True, sentences=0), CHAT)
    assert (asked.labels, asked.sentences, asked.max_sources) == (True, 0, chat.max_sources)


def test_compress_drops_the_weakest_sentences_and_marks_the_gaps() -> None:
    text = "Alpha beta gamma. Otters sleep holding hands. Nothing here at all. Otters drift apart otherwise. End."
    short = compress(text, {"otter", "sleep", "hands", "drift"}, keep_chars=70)
    assert short == "Otters sleep holding hands. … Otters drift apart otherwise."
    assert compress(text, set(), keep_chars=len(text)) == text
    assert compress(text, {"otter"}, keep_chars=80).startswith("Alpha beta gamma. Otters sleep"), "fits: kept"
    assert compress("one very long sentence without any break at all", set(), keep_chars=20) == "one very long…"
    assert cited_numbers("see [1], [2][3] and [4, 5] but not [x]") == {1, 2, 3, 4, 5}


# ------------------------------------------------------------------------------------------------ source policy


def test_the_policy_keeps_chunks_close_to_the_best_at_most_max_sources(tokenizer: PromptTokenizer) -> None:
    hits = scored(topic_hits(random.Random(4)), [1.0, 0.95, 0.9, 0.86, 0.5, 0.4, 0.3, 0.2])
    counter = LocalCounter(tokenizer, 4096)
    near = SourcePolicy(min_relative_score=0.85)
    packed = asyncio.run(pack_context(hits, conversation(), counter, reserved_tokens=64, query="otters", policy=near))
    assert [p.best.chunk_id for p in packed.passages] == ["d0:0", "d1:0", "d2:0", "d3:0"]
    assert packed.left_out == 4
    capped = SourcePolicy(max_sources=2, min_relative_score=0.85)
    packed = asyncio.run(pack_context(hits, conversation(), counter, reserved_tokens=64, query="otters", policy=capped))
    assert [p.best.chunk_id for p in packed.passages] == ["d0:0", "d1:0"] and packed.left_out == 6
    assert packed.prompt_tokens == counter.prompt_tokens(packed.prompt)


def test_focus_keeps_the_sentences_nearest_the_question_and_never_the_title(tokenizer: PromptTokenizer) -> None:
    text = "Otters\n\nAlpha beta gamma. Otters sleep holding hands. Nothing here at all. Otters drift apart otherwise."
    terms = stems("Why do otters hold hands while they sleep?")
    assert focus(text, terms, 1, skip={"Otters"}) == "Otters sleep holding hands."
    assert focus(text, terms, 2, skip={"Otters"}) == "Otters sleep holding hands. … Otters drift apart otherwise."
    assert focus("One. Two.", terms, 3) == "One. Two."
    meta = {"title": "Otters", "heading": "", "section_index": 0, "start": 0, "end": len(text), "chunk_index": 0}
    hits = [Hit("o:0", "o", text, meta, score=1.0), *scored(topic_hits(random.Random(1))[1:3], [0.9, 0.8])]
    policy = SourcePolicy(sentences=1)
    counter = LocalCounter(tokenizer, 4096)
    packed = asyncio.run(
        pack_context(
            hits,
            [("user", "Why do otters hold hands while they sleep?")],
            counter,
            reserved_tokens=64,
            query="Why do otters hold hands while they sleep?",
            policy=policy,
        )
    )
    first = packed.passages[0]
    assert first.text == "Otters sleep holding hands." and first.compressed and packed.focused == 3
    assert citations(packed.passages)[0]["snippet"] == first.text
    assert packed.prompt_tokens == counter.prompt_tokens(packed.prompt)


# ------------------------------------------------------------------------------------------------ citations


def passages_of(*texts: str) -> list:
    hits = [Hit(f"d{n}:0", f"d{n}", text, {"title": f"T{n}"}, score=1.0 - n / 10) for n, text in enumerate(texts)]
    return [Passage([hit], hit.text, None, 10) for hit in hits]


def test_an_answer_without_markers_cites_the_source_holding_its_new_words() -> None:
    passages = passages_of(
        "The guild of Varnholm inspected the lighthouses every spring.",
        "Halley's comet returns every 76 years; its next visit is due in 2061.",
    )
    question = "When is Halley's comet due back?"
    cites = citations(passages, "Halley's comet is due back in 2061.", question)
    assert [(c["cited"], c["cited_by"]) for c in cites] == [(False, None), (True, "content")]
    assert [c["cited"] for c in citations(passages, "I do not know, sorry.", question)] == [False, False]
    assert [c["cited"] for c in citations(passages, "Halley's comet is due back.", question)] == [False, False], (
        "an answer that only repeats the question cites nothing"
    )


def test_valid_markers_win_and_invalid_ones_are_ignored() -> None:
    passages = passages_of("Sea otters hold hands while they sleep.", "Bees dance to show where the flowers are.")
    cites = citations(passages, "Bees dance [1].", "Why do bees dance?")
    assert [(c["cited"], c["cited_by"]) for c in cites] == [(True, "marker"), (False, None)]
    cites = citations(passages, "[7] Bees dance to show where flowers are.", "Why do bees dance?")
    assert [(c["cited"], c["cited_by"]) for c in cites] == [(False, None), (True, "content")], "[7] names no source"
    assert all(c["cited"] is None and c["cited_by"] is None for c in citations(passages))


async def test_the_gateway_counts_locally_only_with_the_services_own_tokenizer(
    tiny_llm: Path, tokenizer: PromptTokenizer
) -> None:
    async def settled(counters: TokenCounters, info: pb.InferenceInfoResponse) -> str:
        """The counter's source once the background load (started by the first call) is over."""
        counters.counter(info, None)
        for _ in range(200):
            if all(task.done() for task in counters._tokenizers.values()):
                break
            await asyncio.sleep(0.05)
        return counters.counter(info, None).source

    served = pb.InferenceInfoResponse(
        model_path=str(tiny_llm), tokenizer_sha256=tokenizer.fingerprint, max_model_len=512
    )
    assert TokenCounters(None, local=True).counter(served, None).source == "service"  # type: ignore[arg-type]
    assert await settled(TokenCounters(None, local=True), served) == "local"  # type: ignore[arg-type]
    other = pb.InferenceInfoResponse(model_path=str(tiny_llm), tokenizer_sha256="0" * 64, max_model_len=512)
    assert await settled(TokenCounters(None, local=True), other) == "service"  # type: ignore[arg-type]
    assert await settled(TokenCounters(None, local=False), served) == "service"  # type: ignore[arg-type]
    elsewhere = pb.InferenceInfoResponse(model_path="/nowhere", tokenizer_sha256=tokenizer.fingerprint)
    assert await settled(TokenCounters(None, local=True), elsewhere) == "service"  # type: ignore[arg-type]
