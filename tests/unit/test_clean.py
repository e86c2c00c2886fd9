"""Text cleaning: Unicode, invisible characters, whitespace, hyphenation, page furniture, content hashes."""

from __future__ import annotations

import hashlib
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.ingest.clean import clean_text, content_hash, is_page_number_line, strip_page_furniture


def test_nfc_joins_decomposed_letters() -> None:
    decomposed = "и\u0306од и е\u0308ж"  # й and ё typed as a letter plus a combining mark
    assert clean_text(decomposed) == "йод и ёж"


def test_invisible_and_control_characters_go_tabs_and_newlines_stay() -> None:
    text = "\ufeffсво\u200bбо\u2060да\x07 и\u202e кот\x00\tцена\nстрока"
    assert clean_text(text) == "свобода и кот\tцена\nстрока"


def test_zero_width_joiners_stay() -> None:
    family = "👨\u200d👩\u200d👧"
    assert clean_text(family) == family


def test_whitespace_runs_collapse_and_paragraphs_keep_one_blank_line() -> None:
    text = "  Первый   абзац\u00a0с  пробелами.  \r\n\r\n\r\n\n   Второй\u2003абзац. \n  строка \t\t таблица \n\n\n"
    assert clean_text(text) == "Первый абзац с пробелами.\n\nВторой абзац.\nстрока\tтаблица"


def test_form_feed_and_unicode_separators_break_paragraphs() -> None:
    assert clean_text("страница 1\x0cстраница 2\u2029конец\u2028строка") == (
        "страница 1\n\nстраница 2\n\nконец\nстрока"
    )


def test_line_break_hyphenation_is_joined_only_before_a_lower_case_letter() -> None:
    assert clean_text("сво-\nбода и ответ-\nственность") == "свобода и ответственность"
    assert clean_text("con-\nsciousness") == "consciousness"
    assert clean_text("сво\u00ad\nбода") == "свобода"  # soft hyphen at a line end
    assert clean_text("Жан-\nПоль") == "Жан-\nПоль"  # a capital after the break: a real hyphen
    assert clean_text("2-\nго числа") == "2-\nго числа"  # a digit before the hyphen: not hyphenation
    assert clean_text("well-known, т. е. сине-зелёный") == "well-known, т. е. сине-зелёный"
    assert clean_text("сво-\n\nбода") == "сво-\n\nбода"  # a paragraph break is not a line-break hyphenation
    assert clean_text("сво- \n  бода") == "свобода"  # spaces around the break do not matter


def test_content_hash_is_sha256_of_the_text() -> None:
    text = clean_text("Свобода  воли")
    assert content_hash(text) == hashlib.sha256("Свобода воли".encode()).hexdigest()
    assert content_hash(text) != content_hash(clean_text("Свобода воли."))


def test_page_number_lines() -> None:
    for line in ("12", " - 12 - ", "Page 3 of 10", "стр. 5", "Страница 5 из 20", "5/20", "— 7 —", "с. 14"):
        assert is_page_number_line(line), line
    for line in ("1984 год", "Глава 3", "12 апостолов", "", "Page", "3.14"):
        assert not is_page_number_line(line), line


BODY = [
    "Глава 1\nЧеловек обречён быть свободным.",
    "Свобода — это ответственность\nза каждый выбор.",
    "Кант считал иначе:\nразум даёт себе закон.",
    "Конец главы.",
]


def test_running_headers_footers_and_page_numbers_are_removed_from_pages() -> None:
    pages = [f"Журнал философии — выпуск 3\n{BODY[n]}\nСтраница {n} из 4\n- {n} -" for n in range(4)]
    cleaned = strip_page_furniture(pages)
    assert cleaned == BODY


def test_repeated_lines_in_the_body_are_kept() -> None:
    body = "\n".join(f"строка тела {i}" for i in range(10))
    pages = [f"Колонтитул\n{body}\nПовтор в середине\n{body}\nКонец" for _ in range(5)]
    cleaned = strip_page_furniture(pages)
    assert all("Колонтитул" not in page and "Повтор в середине" in page for page in cleaned)


def test_edge_lines_are_removed_only_from_the_edge_inwards() -> None:
    # "Примечание" repeats on every page but below a body line: it is body text, not a header.
    pages = [f"Колонтитул\nтекст {word}\nПримечание\nещё {word}" for word in ("один", "два", "три")]
    assert strip_page_furniture(pages) == [f"текст {w}\nПримечание\nещё {w}" for w in ("один", "два", "три")]


def test_two_pages_prove_no_header_but_page_numbers_still_go() -> None:
    pages = ["Заголовок\nтекст один\n1", "Заголовок\nтекст два\n2"]
    assert strip_page_furniture(pages) == ["Заголовок\nтекст один", "Заголовок\nтекст два"]


_LETTERS_AND_PUNCTUATION = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВЖЯabcxyzXYZ0123456789.,;:!?-–—«»\"'()[] \t\n\r"
_TROUBLE = ("\u00a0", "\u200b", "\ufeff", "\u00ad", "\x00", "\x07", "\x0c", "\u2028", "\u0301", "\u0306", "\u2003")
_messy_text = st.text(alphabet=st.sampled_from([*_LETTERS_AND_PUNCTUATION, *_TROUBLE]), max_size=300)


@settings(max_examples=300, deadline=None)
@given(_messy_text)
def test_clean_text_is_idempotent_and_leaves_no_mess(text: str) -> None:
    cleaned = clean_text(text)
    assert clean_text(cleaned) == cleaned
    assert unicodedata.is_normalized("NFC", cleaned)
    assert cleaned == cleaned.strip()
    assert "  " not in cleaned and "\n\n\n" not in cleaned and " \n" not in cleaned and "\n " not in cleaned
    assert not any(ch in cleaned for ch in "\x00\x07\x0c\r\u200b\ufeff\u00ad\u00a0\u2028\u2003")
