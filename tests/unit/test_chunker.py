"""Token-aware chunking with the real MiniLM tokenizer: limits, boundaries, offsets, overlap, headings and pages."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.runtime.errors import InvalidArgument, UpstreamFailed
from services.gateway.ingest.chunker import _SENTENCE_END as SENTENCE_END_RE
from services.gateway.ingest.chunker import (
    ChunkingConfig,
    ResolvedChunking,
    chunk_document,
    chunk_sections,
    tokenize_sections,
)
from services.gateway.ingest.clean import clean_text
from services.gateway.ingest.parsers import parse_document
from services.gateway.ingest.types import Chunk, ParsedDocument, Section
from tests.unit.tokenizer_helpers import LocalTokenizer, minilm_tokenizer

RU_SENTENCES = [
    "Иммануил Кант считал, что свобода воли — это способность разума давать себе закон.",
    "Жан-Поль Сартр писал, что человек обречён быть свободным!",
    "Отвечает ли он за каждый свой выбор?",
    "Спиноза понимал свободу как познанную необходимость: свободен тот, кто знает причины.",
    "Ницше видел в свободе волю к власти над собой, а не отсутствие принуждения…",
    "«Познай самого себя», — говорил Сократ.",
    "Аристотель (в «Никомаховой этике») связывал добродетель с выбором середины.",
    "Гегель называл историю прогрессом в сознании свободы, т. е. её развитием во времени.",
]
SENTENCE_END = re.compile(r"[.!?…][»)\"]*$")


def chunk(sections: list[Section], size: int, overlap: int) -> list[Chunk]:
    spans = minilm_tokenizer().spans([section.text for section in sections])
    return chunk_sections(sections, spans, ResolvedChunking(size, overlap))


def token_count(text: str) -> int:
    return minilm_tokenizer().count(text)


# ---------------------------------------------------------------------------------------------------- configuration


def test_default_chunk_size_is_512_or_what_the_embedder_takes() -> None:
    tokenizer = minilm_tokenizer()
    resolved = ChunkingConfig().resolve(tokenizer.max_input_length, tokenizer.special_tokens_count)
    assert resolved == ResolvedChunking(chunk_tokens=254, overlap_tokens=64)  # MiniLM: 256 minus [CLS] and [SEP]
    assert ChunkingConfig().resolve(8192, 2).chunk_tokens == 512
    assert ChunkingConfig(254, 0).resolve(256, 2) == ResolvedChunking(254, 0)


def test_a_chunk_larger_than_the_embedder_takes_is_a_configuration_error() -> None:
    with pytest.raises(InvalidArgument) as refused:
        ChunkingConfig(chunk_tokens=512).resolve(256, 2)
    error = refused.value
    assert error.reason == "CHUNK_EXCEEDS_EMBEDDER" and error.http_status == 422
    assert "256" in error.message and "at most 254" in error.message and "BATON_GATEWAY_CHUNK_TOKENS" in error.message
    with pytest.raises(InvalidArgument) as no_room:
        ChunkingConfig().resolve(2, 2)
    assert no_room.value.reason == "CHUNK_EXCEEDS_EMBEDDER"


@pytest.mark.parametrize(("size", "overlap"), [(100, 100), (100, 150), (100, -1), (0, 0), (-5, 0)])
def test_bad_sizes_and_overlaps_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ChunkingConfig(size, overlap).resolve(256, 2)
    assert refused.value.reason == "INVALID_CHUNKING"


def test_the_default_overlap_must_fit_a_tiny_embedder() -> None:
    with pytest.raises(InvalidArgument) as refused:
        ChunkingConfig().resolve(34, 2)  # 32-token chunks cannot overlap by 64
    assert "BATON_GATEWAY_CHUNK_OVERLAP_TOKENS" in refused.value.message


# ---------------------------------------------------------------------------------------------------- boundaries


def test_russian_text_is_chunked_on_sentence_boundaries() -> None:
    text = " ".join(RU_SENTENCES * 3)
    chunks = chunk([Section(text)], size=160, overlap=40)  # MiniLM spends 30–73 tokens on each of these sentences
    assert len(chunks) > 3
    for piece in chunks:
        assert piece.token_count <= 160 and token_count(piece.text) <= 160
        assert SENTENCE_END.search(piece.text), piece.text  # every chunk ends where a sentence ends
        assert piece.start == 0 or text[piece.start - 1] == " "  # and starts where a word starts
    # The overlap starts at a sentence when one starts 20–40 tokens before the end of the previous chunk.
    assert sum(piece.text.startswith(tuple(RU_SENTENCES)) for piece in chunks[1:]) >= 3


def test_abbreviations_and_lower_case_continuations_are_not_sentence_ends() -> None:
    sentence = "Гегель называл историю прогрессом в сознании свободы, т. е. её развитием во времени."
    chunks = chunk([Section(" ".join([sentence] * 6))], size=160, overlap=0)
    assert all(piece.text.endswith("во времени.") and piece.text.startswith("Гегель") for piece in chunks)


def test_an_abbreviation_before_a_quoted_lowercase_word_is_not_a_sentence_end() -> None:
    """Hypothesis found it: "т.е. «цитата»" was cut after "т.е." although the sentence fitted a chunk."""
    quoted = "Свобода свобода свобода свобода т.е. «цитата»."
    text = " ".join(["Свобода.", "Свобода" + " свобода" * 17 + ".", quoted, "Свобода."])
    chunks = chunk([Section(text)], size=57, overlap=0)
    assert any(quoted in piece.text for piece in chunks), [piece.text for piece in chunks]


@pytest.mark.parametrize(
    ("text", "ends"),
    [("т.е. X-ray", False), ("Т.е. Кант", False), ("e.g. Paris", False), ("Kant vs. Hegel", False),
     ("и т.д. Потом", True), ("Он ушёл. Она", True), ("Конец. «Цитата»", True), ("Конец.» Начало", True)],
)  # fmt: skip
def test_sentence_ends_after_abbreviations(text: str, ends: bool) -> None:
    assert bool(SENTENCE_END_RE.search(text)) is ends


def test_paragraph_breaks_win_over_fuller_chunks() -> None:
    first = " ".join(RU_SENTENCES[:2])  # 116 tokens: past half of a 200-token chunk
    text = first + "\n\n" + " ".join(RU_SENTENCES[2:])  # its first sentence would fit too, ending at 147
    chunks = chunk([Section(text)], size=200, overlap=0)
    assert chunks[0].text == first


def test_one_overlong_sentence_is_cut_between_words() -> None:
    words = " ".join(["свобода", "воля", "разум", "закон", "выбор", "человек"] * 40)  # no punctuation at all
    chunks = chunk([Section(words)], size=50, overlap=10)
    for piece in chunks:
        assert piece.token_count <= 50 and token_count(piece.text) <= 50
        assert piece.start == 0 or words[piece.start - 1] == " "
        assert piece.end == len(words) or words[piece.end] == " "


def test_a_word_longer_than_a_chunk_is_cut_between_tokens() -> None:
    word = "-".join(["очень", "длинный", "адрес"] * 60)  # hyphens keep it one "word" with no spaces
    text = f"Начало. {word} конец."
    chunks = chunk([Section(text)], size=32, overlap=8)
    assert all(piece.token_count <= 32 for piece in chunks)
    covered = "".join(text[piece.start : piece.end] for piece in chunks)
    assert word.replace("-", "")[:200] in covered.replace("-", "")


def test_sections_are_never_merged_and_keep_headings_and_pages() -> None:
    sections = [
        Section("Кант\n\n" + RU_SENTENCES[0], ("Философия", "Кант"), page=3),
        Section("Коротко.", ("Философия", "Кант", "Заметка"), page=3),
        Section(" ".join(RU_SENTENCES), ("Философия", "Сартр"), page=4),
        Section("", ("Пусто",), page=5),
    ]
    chunks = chunk(sections, size=100, overlap=20)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].text == sections[0].text and chunks[1].text == "Коротко."  # the tiny section stays apart
    assert {c.section_index for c in chunks} == {0, 1, 2}
    for piece in chunks:
        section = sections[piece.section_index]
        assert (piece.heading_path, piece.page) == (section.heading_path, section.page)
        assert piece.text == section.text[piece.start : piece.end]


def test_tokens_that_share_a_character_are_never_cut_apart() -> None:
    # One character that became three tokens (span 6..7 three times), as some tokenizers do with ligatures.
    text = "ab cd \ufb01 ef gh"
    spans = [(0, 2), (3, 5), (6, 7), (6, 7), (6, 7), (8, 10), (11, 13)]
    chunks = chunk_sections([Section(text)], [spans], ResolvedChunking(4, 1))
    ranges = _token_ranges(chunks, spans)
    assert [c.token_count for c in chunks] == [stop - first for first, stop in ranges]
    assert all(c.token_count <= 4 for c in chunks)
    assert all(first not in (3, 4) and stop not in (3, 4) for first, stop in ranges), ranges


def test_spans_out_of_order_are_refused_not_chunked() -> None:
    with_specials = [(0, 0), (0, 2), (3, 5), (0, 0)]  # [CLS] … [SEP] left in by mistake
    with pytest.raises(UpstreamFailed) as refused:
        chunk_sections([Section("ab cd")], [with_specials], ResolvedChunking(8, 0))
    assert refused.value.reason == "TOKENIZER_MISMATCH"


# ---------------------------------------------------------------------------------------------------- chunk_document


async def test_chunk_document_batches_requests_and_splits_long_sections() -> None:
    tokenizer = LocalTokenizer()
    long_text = "\n\n".join(" ".join(RU_SENTENCES[i % 8 :] + RU_SENTENCES[: i % 8]) for i in range(12))
    sections = [Section(long_text, ("Длинный",)), Section("Короткий раздел.", ("Короткий",))]
    doc = ParsedDocument("Док", sections, "md")
    config = ResolvedChunking(100, 20)
    chunks = await chunk_document(doc, tokenizer, config, max_request_chars=1000)
    assert all(sum(len(text) for text in call) <= 1000 for call in tokenizer.calls)
    assert len(tokenizer.calls) > 5  # the long section went in pieces
    whole = chunk_sections(sections, tokenizer.spans([s.text for s in sections]), config)
    assert chunks == whole  # pieces cut at whitespace tokenize exactly like the whole text


async def test_a_tokenizer_that_answers_the_wrong_number_of_texts_is_an_upstream_failure() -> None:
    class Broken(LocalTokenizer):
        async def token_spans(self, texts):  # type: ignore[no-untyped-def]
            return []

    with pytest.raises(UpstreamFailed):
        await tokenize_sections(["текст"], Broken())


async def test_parse_clean_chunk_end_to_end() -> None:
    markdown = "# Философия\n\n## Кант\n\n" + " ".join(RU_SENTENCES * 4) + "\n\n## Сартр\n\nКоротко о Сартре."
    parsed = parse_document(markdown.encode(), "philosophy.md")
    cleaned = [Section(clean_text(s.text), s.heading_path, s.page) for s in parsed.sections]
    doc = ParsedDocument(parsed.title, cleaned, parsed.format)
    chunks = await chunk_document(doc, minilm_tokenizer(), ChunkingConfig(64, 16).resolve(256, 2))
    assert chunks[0].text.startswith("Кант\n\nИммануил Кант считал")
    assert chunks[-1].heading_path == ("Философия", "Сартр") and chunks[-1].text == "Сартр\n\nКоротко о Сартре."
    assert {c.heading_path for c in chunks[:-1]} == {("Философия", "Кант")}


# ---------------------------------------------------------------------------------------------------- properties

RU_WORDS = "свобода воля разум закон выбор человек мысль время история природа душа ответственность необходимость"
EN_WORDS = "freedom will reason law choice person thought time history nature soul responsibility necessity"
# No abbreviations with periods here: "т. е. «цитата»" is a sentence end by the chunker's rules (a period, a space,
# no lower-case letter), which would make one generated "sentence" two. Abbreviations have their own test.
WORDS = [*RU_WORDS.split(), *EN_WORDS.split(), "«цитата»", "(скобки)", "X-ray", "42", "3.14", "т.е."]
ENDINGS = [".", "!", "?", "…", ".»", "?)", '."']


@dataclass
class GeneratedSection:
    section: Section
    sentences: list[tuple[int, int]]  # character ranges of each sentence


@st.composite
def sentences(draw: st.DrawFn) -> str:
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=30))
    commas = draw(st.lists(st.booleans(), min_size=len(words), max_size=len(words)))
    body = " ".join(w + ("," if comma else "") for w, comma in zip(words, commas, strict=True)).rstrip(",")
    # A sentence starts with a capital letter, also behind an opening quote or bracket ("«Цитата» ...").
    first = next(index for index, char in enumerate(body) if char.isalnum())
    return body[:first] + body[first].upper() + body[first + 1 :] + draw(st.sampled_from(ENDINGS))


@st.composite
def generated_sections(draw: st.DrawFn, index: int) -> GeneratedSection:
    paragraphs = draw(st.lists(st.lists(sentences(), min_size=1, max_size=8), min_size=1, max_size=4))
    text, ranges = "", []
    for p, paragraph in enumerate(paragraphs):
        if p:
            text += draw(st.sampled_from(["\n\n", "\n", "\n\n\n"]))
        for s, sentence in enumerate(paragraph):
            if s:
                text += " "
            ranges.append((len(text), len(text) + len(sentence)))
            text += sentence
    heading = tuple(draw(st.lists(st.sampled_from(["Кант", "Сартр", "Intro", "Глава 2"]), max_size=3)))
    page = draw(st.one_of(st.none(), st.integers(1, 500)))
    return GeneratedSection(Section(text, heading, page), ranges)


@st.composite
def documents(draw: st.DrawFn) -> tuple[list[GeneratedSection], ResolvedChunking]:
    count = draw(st.integers(1, 4))
    generated = [draw(generated_sections(i)) for i in range(count)]
    size = draw(st.integers(8, 160))
    overlap = draw(st.integers(0, size - 1))
    return generated, ResolvedChunking(size, overlap)


@settings(max_examples=200, deadline=None)
@given(documents())
def test_chunking_properties(case: tuple[list[GeneratedSection], ResolvedChunking]) -> None:
    generated, config = case
    sections = [g.section for g in generated]
    spans = minilm_tokenizer().spans([s.text for s in sections])
    chunks = chunk_sections(sections, spans, config)
    size, overlap = config.chunk_tokens, config.overlap_tokens
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for section_index, (gen, section_spans) in enumerate(zip(generated, spans, strict=True)):
        mine = [c for c in chunks if c.section_index == section_index]
        ranges = _token_ranges(mine, section_spans)
        for piece, (first, stop) in zip(mine, ranges, strict=True):
            # Never over the limit, by the spans and, for a chunk cut between words, by tokenizing its text alone.
            assert piece.token_count == stop - first <= size
            if _between_words(gen.section.text, piece):
                assert token_count(piece.text) == piece.token_count
            # Offsets are exact and the text is stripped; heading path and page are the section's.
            assert piece.text == gen.section.text[piece.start : piece.end] == piece.text.strip()
            assert (piece.heading_path, piece.page) == (gen.section.heading_path, gen.section.page)
        # Every token is in some chunk; chunks move forward and overlap by at most `overlap` tokens.
        assert ranges[0][0] == 0 and ranges[-1][1] == len(section_spans)
        for (first, stop), (next_first, next_stop) in itertools.pairwise(ranges):
            assert first < next_first <= stop < next_stop
            assert stop - next_first <= overlap
        # Every sentence short enough to fit is inside one chunk.
        starts = [start for start, _ in section_spans]
        for sentence_start, sentence_end in gen.sentences:
            length = bisect.bisect_left(starts, sentence_end) - bisect.bisect_left(starts, sentence_start)
            if length <= min(3 * size // 4, size - overlap):
                sentence = gen.section.text[sentence_start:sentence_end]
                assert any(c.start <= sentence_start and sentence_end <= c.end for c in mine), sentence
    # What the embedder sees: every chunk's text tokenized alone fits (chunk_document refits words cut apart).
    fitted = asyncio.run(chunk_document(ParsedDocument("t", sections, "md"), minilm_tokenizer(), config))
    assert all(token_count(c.text) <= size for c in fitted)


def _between_words(text: str, piece: Chunk) -> bool:
    return (piece.start == 0 or text[piece.start - 1].isspace()) and text[piece.end : piece.end + 1] in ("", " ", "\n")


def _token_ranges(chunks: list[Chunk], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    starts = [start for start, _ in spans]
    ends = [end for _, end in spans]
    return [(bisect.bisect_left(starts, c.start), bisect.bisect_right(ends, c.end)) for c in chunks]


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(" \n.!?,")),
    size=st.integers(4, 64),
    data=st.data(),
)
def test_any_cleaned_text_chunks_within_the_limit(text: str, size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, size - 1))
    section = Section(clean_text(text))
    spans = minilm_tokenizer().spans([section.text])[0]
    config = ResolvedChunking(size, overlap)
    chunks = chunk_sections([section], [spans], config)
    ranges = _token_ranges(chunks, spans)
    assert (ranges[0][0], ranges[-1][1]) == (0, len(spans)) if spans else chunks == []
    for piece, (first, stop) in zip(chunks, ranges, strict=True):
        assert piece.token_count == stop - first <= size
        assert piece.text == section.text[piece.start : piece.end]
    for (first, stop), (next_first, next_stop) in itertools.pairwise(ranges):
        assert first < next_first <= stop < next_stop and stop - next_first <= overlap
    # What the embedder sees: each chunk's text tokenized alone fits too (chunk_document refits words cut apart).
    fitted = asyncio.run(chunk_document(ParsedDocument("t", [section], "txt"), minilm_tokenizer(), config))
    assert [c.index for c in fitted] == list(range(len(fitted)))
    for piece in fitted:
        assert token_count(piece.text) <= size and piece.text == section.text[piece.start : piece.end]


async def test_a_chunk_cut_inside_a_word_is_refitted_to_what_the_embedder_sees() -> None:
    text = "010:0UE02:"  # "0UE02" is one word of 5 tokens; a 4-token chunk must cut it
    section = Section(text)
    config = ResolvedChunking(4, 0)
    raw = chunk_sections([section], minilm_tokenizer().spans([text]), config)
    assert max(token_count(c.text) for c in raw) > 4  # "##ue ##0 ##2 :" in context, "u ##e ##0 ##2 :" alone
    fitted = await chunk_document(ParsedDocument("t", [section], "txt"), minilm_tokenizer(), config)
    assert all(token_count(c.text) <= 4 and c.token_count <= 4 for c in fitted)
    assert "".join(c.text for c in fitted) == text
