"""Language-aware text analysis shared by every store backend, so that BM25 means the same thing everywhere.

``analyze`` turns text into index terms: Unicode word tokens, lowercased, ``ё`` folded to ``е``, stemmed per
token by script — Cyrillic with the Russian Snowball stemmer, Latin with the English one — so a mixed Russian and
English text is handled word by word. Numbers are kept. Stop words are kept: BM25's IDF discounts them, and dropping
them from queries did not measurably help (SciFact BM25 nDCG@10 0.689 → 0.686, XQuAD-en 0.970 → 0.972); stemming
did (SciFact 0.669 → 0.689). A backend whose own tokenizer cannot stem Russian (SQLite FTS5, Weaviate) indexes
``index_text(text)`` — the terms joined by spaces — and queries with ``query_terms(text)``.

``detect_language`` is deliberately cheap (script counts plus a few function words): hybrid fusion only needs to
know whether the query is in a language the embedder covers.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import Stemmer

UNDETERMINED = "und"

# Letters and digits, no underscore: "covid-19" → "covid", "19"; "e-mail" → "e", "mail".
_WORD = re.compile(r"[^\W_]+")
_CYRILLIC = re.compile(r"[\u0400-\u04ff\u0500-\u052f]")
_LATIN = re.compile(r"[a-zA-Z\u00c0-\u024f]")

# Stemmer objects are not thread-safe (PyStemmer's documentation): one per thread.
_local = threading.local()


def _stemmers() -> tuple[Stemmer.Stemmer, Stemmer.Stemmer]:
    pair = getattr(_local, "stemmers", None)
    if pair is None:
        pair = (Stemmer.Stemmer("russian", 100_000), Stemmer.Stemmer("english", 100_000))
        _local.stemmers = pair
    return pair


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens with ``ё`` folded to ``е``, NFC-normalised; no stemming."""
    text = unicodedata.normalize("NFC", text).lower().replace("ё", "е")
    return _WORD.findall(text)


def analyze(text: str) -> list[str]:
    """Index terms of ``text``, in order, duplicates kept (BM25 needs term frequencies)."""
    return stem_tokens(tokenize(text))


def stem_tokens(tokens: Sequence[str]) -> list[str]:
    """Stem each token with the stemmer of its script; other scripts and numbers pass through unchanged."""
    russian, english = _stemmers()
    terms = list(tokens)
    cyrillic = [i for i, token in enumerate(terms) if _CYRILLIC.search(token)]
    latin = [i for i, token in enumerate(terms) if not token.isdigit() and _LATIN.search(token)]
    for stemmer, positions in ((russian, cyrillic), (english, latin)):
        if positions:
            stems = stemmer.stemWords([terms[i] for i in positions])
            for i, stem in zip(positions, stems, strict=True):
                terms[i] = stem
    return terms


def index_text(text: str) -> str:
    """The analysed text as one space-separated string, for backends with a plain whitespace/Unicode tokenizer."""
    return " ".join(analyze(text))


def query_terms(text: str) -> list[str]:
    """Distinct analysed terms of a query, in first-seen order (a BM25 query is a bag of distinct terms)."""
    return list(dict.fromkeys(analyze(text)))


def term_frequencies(text: str) -> Counter[str]:
    return Counter(analyze(text))


# --- BM25, as SQLite FTS5's bm25() computes it ---------------------------------------------------------------------

BM25_K1 = 1.2
BM25_B = 0.75


def bm25_idf(document_frequency: int, document_count: int) -> float:
    """FTS5's IDF: ``log((N - n + 0.5) / (n + 0.5))``, floored at 1e-6 (a term in half the rows or more)."""
    idf = math.log((document_count - document_frequency + 0.5) / (document_frequency + 0.5))
    return idf if idf > 0 else 1e-6


def bm25_term_score(term_frequency: int, document_length: int, average_length: float, idf: float) -> float:
    """One term's share of a document's BM25 score."""
    if term_frequency <= 0:
        return 0.0
    norm = BM25_K1 * (1 - BM25_B + BM25_B * document_length / average_length)
    return idf * term_frequency * (BM25_K1 + 1) / (term_frequency + norm)


def fts5_match_expression(terms: Iterable[str]) -> str:
    """An FTS5 MATCH expression that ORs the terms; each is quoted so no term is read as FTS5 syntax."""
    quoted = ['"' + term.replace('"', '""') + '"' for term in terms]
    return " OR ".join(quoted)


# --- language detection -----------------------------------------------------------------------------------------

# Letters only one Cyrillic language uses.
_UKRAINIAN = set("іїєґ")
_BELARUSIAN = set("ў")
_BULGARIAN_WORDS = {"са", "във", "това", "които", "който", "няма", "ще", "със"}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# A few frequent function words per Latin-script language: enough to tell them apart on a sentence.
_LATIN_CUES: dict[str, frozenset[str]] = {
    "en": _words(
        "the a an and of to is in that it for with as was are on be this by not or from which what how why when "
        "where who do does did can my your i you we he she they his her has have about at"
    ),
    "de": _words("der die das und ist nicht ein eine zu den mit von sich auch ich wir für auf dem"),
    "fr": _words("le la les et est une des du pas que qui dans pour sur au avec ce il elle nous"),
    "es": _words("el la los las y es una del que en por con para no se lo como pero más"),
    "it": _words("il la che di è una per non sono gli della con del nel anche come"),
    "pt": _words("o a os as e é um uma do da que em não para com por se mais"),
    "nl": _words("de het een en is van niet dat op te zijn met voor ook"),
}

_SCRIPT_RANGES: tuple[tuple[str, str], ...] = (
    ("el", r"[\u0370-\u03ff]"),
    ("ar", r"[\u0600-\u06ff]"),
    ("he", r"[\u0590-\u05ff]"),
    ("hy", r"[\u0530-\u058f]"),
    ("ka", r"[\u10a0-\u10ff]"),
    ("hi", r"[\u0900-\u097f]"),
    ("th", r"[\u0e00-\u0e7f]"),
    ("ko", r"[\uac00-\ud7af\u1100-\u11ff]"),
    ("ja", r"[\u3040-\u30ff]"),
    ("zh", r"[\u4e00-\u9fff]"),
)
_SCRIPTS = [(code, re.compile(pattern)) for code, pattern in _SCRIPT_RANGES]


def detect_language(text: str) -> str:
    """ISO 639-1 code of the dominant language of ``text``, or ``"und"`` when it has no letters.

    The script decides first (Cyrillic → ru/uk/be/bg, Latin → en/de/fr/…, and so on); within a script, letters
    unique to a language and a few function words decide. Latin text without clear cues counts as English: short
    English queries ("BRCA1 mutation risk") often carry no function word, and English is what most embedders cover,
    so a wrong guess there gates nothing off.
    """
    sample = text[:20_000]
    counts = {
        "cyrillic": len(_CYRILLIC.findall(sample)),
        "latin": len(_LATIN.findall(sample)),
    }
    for code, pattern in _SCRIPTS:
        counts[code] = len(pattern.findall(sample))
    script, letters = max(counts.items(), key=lambda item: item[1])
    if letters == 0:
        return UNDETERMINED
    if script == "cyrillic":
        return _cyrillic_language(sample)
    if script == "latin":
        return _latin_language(sample)
    if script == "zh" and counts["ja"] > 0:
        return "ja"  # Japanese mixes kanji with kana; Chinese has no kana.
    return script


def _cyrillic_language(text: str) -> str:
    lowered = text.lower()
    letters = set(lowered)
    if letters & _UKRAINIAN and "ы" not in letters and "э" not in letters:
        return "uk"
    if letters & _BELARUSIAN:
        return "be"
    words = set(tokenize(lowered))
    if len(words & _BULGARIAN_WORDS) >= 2 and "ы" not in letters:
        return "bg"
    return "ru"


def _latin_language(text: str) -> str:
    words = tokenize(text)
    scores = {code: sum(1 for word in words if word in cues) for code, cues in _LATIN_CUES.items()}
    best = max(scores, key=lambda code: scores[code])
    # Another language needs two cues and more than English has: one shared short word ("a", "do") is no proof.
    if scores[best] < 2 or scores[best] <= scores["en"]:
        return "en"
    return best
