"""Parsing txt, md, html, pdf and docx into titled sections with heading paths and pages, and refusing bad input
with clear domain errors. Every fixture file is generated here and written to tmp_path."""

from __future__ import annotations

import functools
import io
import random
import time
import zipfile
from pathlib import Path

import docx
import pytest
from fpdf import FPDF
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.runtime.errors import BatonError, EmptyInput, InvalidArgument, PayloadTooLarge
from services.gateway.ingest.clean import clean_text
from services.gateway.ingest.parsers import MAX_DOCX_UNPACKED_BYTES, SUPPORTED_FORMATS, decode_text, parse_document
from services.gateway.ingest.types import ParsedDocument

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")

RU_PARAGRAPHS = [
    "Иммануил Кант считал, что свобода воли — это способность разума давать себе закон.",
    "Жан-Поль Сартр писал, что человек обречён быть свободным. Он отвечает за каждый свой выбор.",
    "Спиноза понимал свободу как познанную необходимость: свободен тот, кто знает причины.",
    "Ницше видел в свободе волю к власти над собой, а не отсутствие принуждения.",
]
EN_PARAGRAPH = "Tomatoes need at least six hours of direct sunlight a day. Water them deeply twice a week."


def parse_file(path: Path, max_bytes: int | None = None) -> ParsedDocument:
    return parse_document(path.read_bytes(), path.name, max_bytes=max_bytes)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def cleaned_text(doc: ParsedDocument) -> str:
    return "\n\n".join(clean_text(section.text) for section in doc.sections)


# ---------------------------------------------------------------------------------------------------- generators


class _JournalPdf(FPDF):
    """A PDF with a running header and a page-number footer on every page, Cyrillic via DejaVu Sans."""

    running_header: str | None = None

    def header(self) -> None:
        if self.running_header:
            self.set_font("dejavu", size=9)
            self.cell(0, 8, self.running_header, new_x="LMARGIN", new_y="NEXT")

    def footer(self) -> None:
        if self.running_header:
            self.set_y(-15)
            self.set_font("dejavu", size=9)
            self.cell(0, 8, f"Страница {self.page_no()}", align="C")


def make_pdf(pages: list[str], *, title: str | None = None, running_header: str | None = None) -> bytes:
    pdf = _JournalPdf()
    pdf.running_header = running_header
    pdf.add_font("dejavu", fname=str(DEJAVU))
    if title:
        pdf.set_title(title)
    for text in pages:
        pdf.add_page()
        pdf.set_font("dejavu", size=12)
        if text:
            pdf.multi_cell(0, 6, text)
        else:
            pdf.rect(20, 20, 50, 50)  # a drawing and no text: what a scanned page looks like to a parser
    return bytes(pdf.output())


def make_docx(blocks: list[tuple[str, str | int]], *, title: str | None = None) -> bytes:
    """blocks: ("heading", level) pairs use the text as a heading; ("p", text) adds a paragraph."""
    document = docx.Document()
    if title is not None:
        document.core_properties.title = title
    for kind, value in blocks:
        if kind == "p":
            document.add_paragraph(str(value))
        elif kind == "table":
            table = document.add_table(rows=2, cols=2)
            for r, row in enumerate(table.rows):
                for c, cell in enumerate(row.cells):
                    cell.text = f"{value} {r}{c}"
        else:
            text, level = kind, int(value)
            document.add_heading(text, level=level)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- txt


@pytest.mark.parametrize(
    ("encoding", "prefix"),
    [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff")],
)
def test_txt_in_unicode_encodings(tmp_path: Path, encoding: str, prefix: bytes) -> None:
    text = "Свобода воли\n\n" + "\n\n".join(RU_PARAGRAPHS) + "\n\n" + EN_PARAGRAPH
    doc = parse_file(write(tmp_path, "notes.txt", prefix + text.encode(encoding)))
    assert doc.format == "txt" and doc.title == "Свобода воли"
    assert doc.sections[0].text.lstrip("\ufeff") == text and doc.sections[0].page is None


@pytest.mark.parametrize("encoding", ["cp1251", "koi8_r"])
def test_old_russian_single_byte_encodings_are_detected(tmp_path: Path, encoding: str) -> None:
    typography = " Ёлка — «№5»…" if encoding == "cp1251" else ' Ёлка "5"'  # KOI8-R has no « » — № …
    paragraphs = "\n\n".join(RU_PARAGRAPHS) if encoding == "cp1251" else "\n\n".join(RU_PARAGRAPHS).replace("—", "-")
    text = "Старый файл\n\n" + paragraphs + typography
    doc = parse_file(write(tmp_path, "old.txt", text.encode(encoding)))
    assert doc.sections[0].text == text and doc.metadata["encoding"] == encoding


def test_mostly_ascii_legacy_western_text_is_windows_1252(tmp_path: Path) -> None:
    text = "Le café de la gare est fermé le lundi. " * 5
    doc = parse_file(write(tmp_path, "cafe.txt", text.encode("cp1252")))
    assert doc.sections[0].text == text and doc.metadata["encoding"] == "cp1252"


def test_txt_title_is_the_first_line_shortened(tmp_path: Path) -> None:
    first = "Очень длинная первая строка " * 20
    doc = parse_file(write(tmp_path, "long.txt", "\n\n  \n" + first + "\nвторая"))
    assert doc.title.endswith("…") and len(doc.title) <= 121 and doc.title.startswith("Очень длинная первая")


def test_a_pdf_renamed_txt_is_parsed_as_pdf(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "renamed.txt", make_pdf([RU_PARAGRAPHS[0]])))
    assert doc.format == "pdf" and doc.sections[0].page == 1


def test_a_text_that_mentions_a_pdf_header_stays_text(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "notes.md", "# PDF\n\nEvery PDF starts with %PDF-1.7 and ends with %%EOF."))
    assert doc.format == "md"


def test_html_saved_as_txt_is_parsed_as_html(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "page.txt", "<!DOCTYPE html><html><title>Т</title><p>текст</p></html>"))
    assert doc.format == "html" and doc.title == "Т"


# ---------------------------------------------------------------------------------------------------- markdown

MARKDOWN = """---
layout: post
---
Вступление без заголовка.

# Философия свободы

Текст о **свободе** и [Канте](https://example.org/kant).

## Кант

Иммануил Кант считал, что свобода воли — это способность разума давать себе закон.

```python
# это комментарий в коде, а не заголовок
print("hi")
```

## Сартр
### Экзистенциализм

> Человек обречён быть свободным.

Setext heading
--------------

Text under a setext heading. ![diagram](d.png)

[ref]: https://example.org
"""


def test_markdown_sections_follow_heading_levels(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "philosophy.md", MARKDOWN))
    assert doc.format == "md" and doc.title == "Философия свободы"
    paths = [section.heading_path for section in doc.sections]
    assert paths == [
        (),
        ("Философия свободы",),
        ("Философия свободы", "Кант"),
        ("Философия свободы", "Сартр", "Экзистенциализм"),
        ("Философия свободы", "Setext heading"),
    ]
    texts = [clean_text(section.text) for section in doc.sections]
    assert texts[0] == "Вступление без заголовка."  # front matter dropped
    assert texts[1] == "Философия свободы\n\nТекст о свободе и Канте."  # heading line first, markup stripped
    assert "# это комментарий в коде" in texts[2]  # a # inside a code block is not a heading
    assert texts[3] == "Экзистенциализм\n\nЧеловек обречён быть свободным."
    assert texts[4] == "Setext heading\n\nText under a setext heading. diagram"  # link definition dropped


def test_markdown_title_falls_back_to_front_matter_then_stem(tmp_path: Path) -> None:
    with_front = parse_file(write(tmp_path, "a.md", '---\ntitle: "Мой дневник"\n---\nтекст\n\n# Заголовок\n\nещё'))
    assert with_front.title == "Мой дневник"
    assert parse_file(write(tmp_path, "plain-notes.md", "просто текст без заголовков")).title == "plain-notes"


# ---------------------------------------------------------------------------------------------------- html

HTML = """<!DOCTYPE html>
<html><head><meta charset="windows-1251"><title>Философия свободы | Блог</title>
<style>p { color: red }</style><script>var nav = "script text";</script></head>
<body>
<header><a href="/">Главная</a> | <a href="/about">О блоге</a></header>
<nav><ul><li>Меню</li><li>Архив</li></ul></nav>
<article>
  <h1>Свобода воли</h1>
  <p>Иммануил Кант считал, что <b>свобода</b> воли —
     это способность разума давать себе закон.</p>
  <h2>Сартр</h2>
  <p>Человек обречён быть свободным.<br>Он отвечает за выбор.</p>
  <h3>Цитаты</h3>
  <ul><li>первая цитата</li><li>вторая цитата</li></ul>
  <table><tr><td>Кант</td><td>1724</td></tr><tr><td>Сартр</td><td>1905</td></tr></table>
  <!-- a comment that is not text -->
  <h2>Пустой раздел</h2>
  <h2>Итог</h2><div>Свобода требует ответственности.</div>
</article>
<aside>Популярные записи</aside>
<form><input name="q"><button>Искать</button></form>
<footer>© 2026 Блог о философии</footer>
</body></html>"""


def test_html_drops_boilerplate_and_keeps_heading_paths(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "blog.html", HTML.encode("cp1251")))
    assert doc.format == "html" and doc.title == "Философия свободы | Блог"
    assert doc.metadata["encoding"].lower().replace("-", "") == "windows1251"
    everything = cleaned_text(doc)
    for boilerplate in ("Главная", "Меню", "Популярные", "Искать", "©", "color", "script text", "comment"):
        assert boilerplate not in everything, boilerplate
    paths = [section.heading_path for section in doc.sections]
    assert paths == [("Свобода воли",), ("Свобода воли", "Сартр"), ("Свобода воли", "Сартр", "Цитаты"),
                     ("Свобода воли", "Итог")]  # fmt: skip
    texts = [clean_text(section.text) for section in doc.sections]
    assert texts[0] == (
        "Свобода воли\n\nИммануил Кант считал, что свобода воли — это способность разума давать себе закон."
    )
    assert texts[1] == "Сартр\n\nЧеловек обречён быть свободным.\nОн отвечает за выбор."
    assert texts[2] == "Цитаты\n\nпервая цитата\nвторая цитата\n\nКант\t1724\nСартр\t1905"


def test_html_title_falls_back_to_h1_and_main_is_preferred(tmp_path: Path) -> None:
    page = "<html><body><div>Сайдбар без разметки</div><main><h1>Главное</h1><p>Суть.</p></main></body></html>"
    doc = parse_file(write(tmp_path, "m.htm", page))
    assert doc.title == "Главное" and cleaned_text(doc) == "Главное\n\nСуть."


def test_html_with_only_navigation_is_empty(tmp_path: Path) -> None:
    with pytest.raises(EmptyInput) as refused:
        parse_file(write(tmp_path, "nav.html", "<html><body><nav>Главная | Архив</nav></body></html>"))
    assert refused.value.reason == "EMPTY_DOCUMENT"


def test_deeply_nested_html_is_walked_without_recursion(tmp_path: Path) -> None:
    page = "<div><span>" * 120 + "глубоко" + "</span></div>" * 120
    assert cleaned_text(parse_file(write(tmp_path, "deep.html", page))) == "глубоко"
    # Beyond libxml2's nesting limit (256) the parser stops: the text there is lost, but nothing crashes or hangs.
    hostile = "<div>" * 100_000 + "глубоко" + "</div>" * 100_000
    with pytest.raises(EmptyInput):
        parse_file(write(tmp_path, "hostile.html", hostile))


# ---------------------------------------------------------------------------------------------------- pdf


def test_pdf_pages_cyrillic_and_running_header_removed(tmp_path: Path) -> None:
    pages = [" ".join([p] * 3) for p in RU_PARAGRAPHS]
    data = make_pdf(pages, title="Свобода воли", running_header="Журнал философии — выпуск 3")
    doc = parse_file(write(tmp_path, "journal.pdf", data))
    assert doc.format == "pdf" and doc.title == "Свобода воли" and doc.metadata["pages"] == "4"
    assert [section.page for section in doc.sections] == [1, 2, 3, 4]
    for section, paragraph in zip(doc.sections, RU_PARAGRAPHS, strict=True):
        text = " ".join(clean_text(section.text).split())
        assert paragraph in text
        assert "Журнал философии" not in text and "Страница" not in text
        assert section.heading_path == ()


def test_pdf_title_falls_back_to_the_first_line(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "untitled.pdf", make_pdf(["Заметки о свободе\n" + RU_PARAGRAPHS[0]])))
    assert doc.title == "Заметки о свободе"


def test_pdf_without_text_layer_is_empty(tmp_path: Path) -> None:
    with pytest.raises(EmptyInput) as refused:
        parse_file(write(tmp_path, "scan.pdf", make_pdf(["", ""])))
    assert refused.value.reason == "EMPTY_DOCUMENT" and "OCR" in refused.value.message


def test_blank_pages_are_skipped_but_numbering_is_kept(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "gap.pdf", make_pdf([RU_PARAGRAPHS[0], "", RU_PARAGRAPHS[1]])))
    assert [section.page for section in doc.sections] == [1, 3]


# ---------------------------------------------------------------------------------------------------- docx


def test_docx_heading_styles_give_heading_paths(tmp_path: Path) -> None:
    blocks: list[tuple[str, str | int]] = [
        ("Философия свободы", 0),  # the "Title" style
        ("p", "Вступление."),
        ("Кант", 1),
        ("p", RU_PARAGRAPHS[0]),
        ("Автономия", 2),
        ("p", "Разум даёт себе закон."),
        ("table", "ячейка"),
        ("Сартр", 1),
        ("p", RU_PARAGRAPHS[1]),
    ]
    doc = parse_file(write(tmp_path, "essay.docx", make_docx(blocks, title="Эссе о свободе")))
    assert doc.format == "docx" and doc.title == "Эссе о свободе"
    paths = [section.heading_path for section in doc.sections]
    assert paths == [
        ("Философия свободы",),
        ("Философия свободы", "Кант"),
        ("Философия свободы", "Кант", "Автономия"),
        ("Философия свободы", "Сартр"),
    ]
    assert clean_text(doc.sections[2].text) == (
        "Автономия\n\nРазум даёт себе закон.\n\nячейка 00\tячейка 01\nячейка 10\tячейка 11"
    )


def test_docx_title_falls_back_to_the_first_heading(tmp_path: Path) -> None:
    doc = parse_file(write(tmp_path, "d.docx", make_docx([("Дневник", 1), ("p", "Сегодня тепло.")], title="")))
    assert doc.title == "Дневник"


# ---------------------------------------------------------------------------------------------------- bad input


def refused(path: Path, max_bytes: int | None = None) -> BatonError:
    with pytest.raises(BatonError) as caught:
        parse_file(path, max_bytes)
    error = caught.value
    assert path.name in error.message
    return error


def test_binary_junk_renamed_txt_is_not_text(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "junk.txt", bytes(range(256)) * 64))
    assert isinstance(error, InvalidArgument) and error.reason == "NOT_TEXT" and error.http_status == 422


def test_binary_without_nul_bytes_is_not_text(tmp_path: Path) -> None:
    rng = random.Random(7)
    noise = bytes(rng.randrange(1, 256) for _ in range(4096))
    assert refused(write(tmp_path, "noise.md", noise)).reason == "NOT_TEXT"
    controls = ("ok" + "\x01\x02\x03\x04" * 50).encode()
    assert refused(write(tmp_path, "controls.txt", controls)).reason == "NOT_TEXT"
    assert refused(write(tmp_path, "bad-bom.txt", b"\xef\xbb\xbf\xff\xfe\xfd")).reason == "NOT_TEXT"


@pytest.mark.parametrize("name", ["empty.txt", "empty.md", "empty.html", "blank.txt"])
def test_empty_or_whitespace_only_files_are_empty_documents(tmp_path: Path, name: str) -> None:
    data = b"" if name.startswith("empty") else b" \n\t\r\n \xc2\xa0 \xe2\x80\x8b"
    error = refused(write(tmp_path, name, data))
    assert isinstance(error, EmptyInput) and error.reason == "EMPTY_DOCUMENT" and error.http_status == 400


def test_malformed_pdfs_are_unparseable(tmp_path: Path) -> None:
    real = make_pdf(RU_PARAGRAPHS, title="Полный файл")
    cases = {
        "garbage.pdf": b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage",
        "truncated.pdf": real[: len(real) // 3],
        "header-only.pdf": b"%PDF-1.4\n",
        "not-a-pdf.pdf": b"<html>this is not a pdf</html>",
    }
    for name, data in cases.items():
        error = refused(write(tmp_path, name, data))
        assert error.reason == "UNPARSEABLE" and isinstance(error, InvalidArgument), (name, error)
        assert "Traceback" not in error.message


def test_malformed_docx_is_unparseable(tmp_path: Path) -> None:
    other_zip = io.BytesIO()
    with zipfile.ZipFile(other_zip, "w") as package:
        package.writestr("notes.txt", "not a word document")
    broken_xml = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(make_docx([("p", "текст")]))) as source, zipfile.ZipFile(broken_xml, "w") as out:
        for item in source.infolist():
            out.writestr(item, b"<w:document><unclosed" if item.filename == "word/document.xml" else source.read(item))
    cases = {
        "garbage.docx": b"PK\x03\x04" + bytes(range(256)) * 4,
        "random.docx": b"this is not a zip",
        "other.docx": other_zip.getvalue(),
        "broken.docx": broken_xml.getvalue(),
        "truncated.docx": make_docx([("p", "текст")])[:2000],
    }
    for name, data in cases.items():
        error = refused(write(tmp_path, name, data))
        assert error.reason == "UNPARSEABLE" and isinstance(error, InvalidArgument), (name, error)


def test_docx_that_unpacks_past_the_limit_is_refused(tmp_path: Path) -> None:
    bomb = io.BytesIO()
    source = zipfile.ZipFile(io.BytesIO(make_docx([("p", "текст")])))
    with source, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for item in source.infolist():
            out.writestr(item.filename, source.read(item))
        with out.open("word/media/zeros.bin", "w", force_zip64=True) as blob:
            chunk = bytes(1 << 20)
            for _ in range(MAX_DOCX_UNPACKED_BYTES // len(chunk) + 1):
                blob.write(chunk)
    assert len(bomb.getvalue()) < 2_000_000  # small on disk, huge when unpacked
    error = refused(write(tmp_path, "bomb.docx", bomb.getvalue()))
    assert isinstance(error, PayloadTooLarge) and error.reason == "DOCUMENT_TOO_LARGE"


def test_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "tool.exe", b"MZ\x90\x00"))
    assert error.reason == "UNSUPPORTED_FORMAT" and isinstance(error, InvalidArgument)
    for suffix in SUPPORTED_FORMATS:
        assert suffix in error.message
    assert refused(write(tmp_path, "README", b"text")).reason == "UNSUPPORTED_FORMAT"


def test_over_max_bytes_is_too_large(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "big.txt", b"a " * 3000), max_bytes=5000)
    assert isinstance(error, PayloadTooLarge) and error.reason == "DOCUMENT_TOO_LARGE" and error.http_status == 413
    assert parse_file(tmp_path / "big.txt", max_bytes=6000).format == "txt"


def test_decode_text_prefers_bom_then_utf8_then_declared() -> None:
    assert decode_text("привет".encode("utf-16"), "a.txt") == ("привет", "utf-16-le")
    assert decode_text("привет".encode(), "a.txt", declared="cp1251") == ("привет", "utf-8")
    assert decode_text("привет".encode("cp866"), "a.txt", declared="cp866") == ("привет", "cp866")


# ---------------------------------------------------------------------------------------------------- robustness


@functools.cache
def sample_files() -> dict[str, bytes]:
    return {
        "sample.pdf": make_pdf(RU_PARAGRAPHS[:2], title="Образец", running_header="Шапка"),
        "sample.docx": make_docx([("Раздел", 1), ("p", RU_PARAGRAPHS[0])]),
        "sample.html": HTML.encode("cp1251"),
    }


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_corrupted_files_parse_or_fail_cleanly_and_fast(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(sample_files())))
    original = bytearray(sample_files()[name])
    for _ in range(data.draw(st.integers(1, 20))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(original) // 2, len(original)))
    started = time.monotonic()
    try:
        doc = parse_document(bytes(original[:cut]), name)
    except BatonError as error:
        assert error.reason in {"UNPARSEABLE", "EMPTY_DOCUMENT", "NOT_TEXT", "DOCUMENT_TOO_LARGE"}, error
    else:
        assert doc.sections
    assert time.monotonic() - started < 10
