"""Text analysis for BM25: tokens, Russian and English stemming per script, language detection."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from baton.store.analysis import (
    analyze,
    detect_language,
    fts5_match_expression,
    index_text,
    query_terms,
    term_frequencies,
    tokenize,
)


def test_tokens_are_lowercased_unicode_words_with_yo_folded() -> None:
    assert tokenize("Ёлка, ЁЖИК и Éclair!") == ["елка", "ежик", "и", "éclair"]


def test_tokens_split_underscores_and_punctuation_and_keep_numbers() -> None:
    assert tokenize("parse_legacy() v3.12 COVID-19 2024") == ["parse", "legacy", "v3", "12", "covid", "19", "2024"]


def test_emoji_and_symbols_are_not_tokens() -> None:
    assert tokenize("🙂 привет 👋🏽 мир — ok") == ["привет", "мир", "ok"]


@pytest.mark.parametrize(
    ("forms", "expected_equal"),
    [
        (["философия", "философии", "философией"], True),
        (["свобода", "свободе", "свободы"], True),
        (["книга", "книги", "книгами"], True),
        (["running", "runs", "run"], True),
        (["philosophy", "philosophies"], True),
        (["свобода", "свет"], False),
    ],
)
def test_word_forms_share_a_stem(forms: list[str], expected_equal: bool) -> None:
    stems = {analyze(form)[0] for form in forms}
    assert (len(stems) == 1) is expected_equal, stems


def test_mixed_text_is_stemmed_by_each_token_script() -> None:
    terms = analyze("Библиотеки Python для machine learning в 2024 году")
    assert terms == ["библиотек", "python", "для", "machin", "learn", "в", "2024", "год"]


def test_query_in_another_word_form_shares_terms_with_the_text() -> None:
    assert set(query_terms("философия свобода")) <= set(analyze("Эссе о философии и свободе"))


def test_numbers_and_other_scripts_pass_through_unstemmed() -> None:
    assert analyze("1812 東京 αθήνα") == ["1812", "東京", "αθήνα"]


def test_index_text_and_query_terms() -> None:
    assert index_text("Свобода, свобода!") == "свобод свобод"
    assert query_terms("Свобода, свобода и философия") == ["свобод", "и", "философ"]
    assert term_frequencies("свобода свободе мир")["свобод"] == 2


def test_match_expression_quotes_every_term() -> None:
    assert fts5_match_expression(["a", 'b"c', "OR"]) == '"a" OR "b""c" OR "OR"'


def test_analysis_is_thread_safe() -> None:
    texts = [f"философии свободе running книгами {i}" for i in range(400)]
    expected = [analyze(text) for text in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(analyze, texts)) == expected


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("философия свобода", "ru"),
        ("Где растут лисички после дождя?", "ru"),
        ("Это текст про Python и machine learning, но по-русски", "ru"),
        ("What is the capital of France?", "en"),
        ("BRCA1 mutation risk", "en"),
        ("Der Hund ist nicht im Haus und die Katze auch nicht", "de"),
        ("Le chat est dans la maison avec les enfants", "fr"),
        ("El perro está en la casa con los niños", "es"),
        ("Україна має багату історію і культуру", "uk"),
        ("東京は日本の首都です", "ja"),
        ("北京是中国的首都", "zh"),
        ("Η Αθήνα είναι η πρωτεύουσα", "el"),
        ("12345 67", "und"),
        ("", "und"),
        ("🙂🙂", "und"),
    ],
)
def test_detect_language(text: str, language: str) -> None:
    assert detect_language(text) == language
