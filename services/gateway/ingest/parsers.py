"""A user's file (bytes and a name) → ``ParsedDocument``: a title, and sections that keep heading paths and page
numbers for citations. Formats: txt, md, html, pdf, docx.

The format comes from the file extension, corrected by cheap content sniffing (a PDF or a Word file renamed .txt is
still parsed as what it is). Bad input raises the runtime's domain errors with a stable ``reason`` — NOT_TEXT,
EMPTY_DOCUMENT, UNPARSEABLE, UNSUPPORTED_FORMAT, DOCUMENT_TOO_LARGE — never a library traceback. Malformed PDFs and
Word files are parsed under explicit resource limits (pypdf's decompression and parsing limits; the unpacked size
of a .docx), so a hostile file costs bounded memory and time.

Sections are returned as found; ``clean.clean_text`` normalises them afterwards (the pipeline calls it). Page
furniture of PDFs (running headers, footers, page numbers) is removed here, because only the parser sees all pages.
"""

from __future__ import annotations

import codecs
import io
import logging
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath

import docx
import pypdf
from docx.table import Table
from lxml import etree
from lxml import html as lxml_html

from baton.runtime.errors import BatonError, EmptyInput, InvalidArgument, PayloadTooLarge
from services.gateway.ingest.clean import clean_text, strip_page_furniture
from services.gateway.ingest.types import ParsedDocument, Section

log = logging.getLogger(__name__)

# Extension → format name (ParsedDocument.format).
SUPPORTED_FORMATS: dict[str, str] = {
    ".txt": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
}
TITLE_MAX_CHARS = 120
# A .docx is a zip: python-docx unpacks every part into memory, so the unpacked size is what costs memory.
MAX_DOCX_UNPACKED_BYTES = 256 * 1024 * 1024
# pypdf's defaults allow 75 MB per decompressed stream; text extraction never needs that much, and a hostile
# file with many such streams would hold them all. Page text streams are kilobytes, embedded fonts a few MB.
PDF_LIMITS: dict[str, int] = {
    "maximum_declared_stream_length": 32_000_000,
    "zlib_maximum_output_length": 32_000_000,
    "lzw_maximum_output_length": 32_000_000,
    "run_length_maximum_output_length": 32_000_000,
    "brotli_maximum_output_length": 32_000_000,
    "array_based_stream_maximum_output_length": 32_000_000,
    "stream_decoding_work_maximum_length": 100_000_000,
}

# Share of control characters above which decoded bytes are binary, not text.
_MAX_CONTROL_SHARE = 0.02
# A byte string without a BOM that is not UTF-8 is taken for a single-byte Cyrillic encoding when at least this
# share of its non-ASCII bytes are Cyrillic letters or Russian typography in that encoding (and Cyrillic letters
# outnumber Latin ones).
_MIN_CYRILLIC_SHARE = 0.9
# ...and for Windows-1252 (Western European) when it is mostly ASCII with a few accented letters.
_MAX_WESTERN_HIGH_SHARE = 0.1

_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
# Windows-1251 typography: ё Ё « » – — … № no-break space, quotes.
_CP1251_TYPOGRAPHY = (0xB8, 0xA8, 0xAB, 0xBB, 0x96, 0x97, 0x85, 0xB9, 0xA0, 0x93, 0x94, 0x92)
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")

_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),  # before UTF-16 LE: its BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def parse_document(data: bytes, filename: str, *, max_bytes: int | None = None) -> ParsedDocument:
    """Parse one file. Raises InvalidArgument (reasons UNSUPPORTED_FORMAT, NOT_TEXT, UNPARSEABLE), EmptyInput
    (EMPTY_DOCUMENT) or PayloadTooLarge (DOCUMENT_TOO_LARGE) with a message that names the file."""
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{filename} is {len(data) / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit per document; "
            "split it or raise the limit",
            reason="DOCUMENT_TOO_LARGE",
            metadata={"size_bytes": str(len(data)), "limit_bytes": str(max_bytes)},
        )
    file = _File(data, filename, PurePath(filename).stem or filename)
    return _PARSERS[detect_format(data, filename)](file)


def detect_format(data: bytes, filename: str) -> str:
    """The format to parse ``data`` as: by extension, overridden by an unmistakable signature."""
    suffix = PurePath(filename).suffix.lower()
    by_name = SUPPORTED_FORMATS.get(suffix)
    if by_name is None:
        supported = ", ".join(sorted(SUPPORTED_FORMATS))
        raise InvalidArgument(
            f"{filename}: unsupported file type {suffix or '(no extension)'}; supported: {supported}",
            reason="UNSUPPORTED_FORMAT",
            metadata={"supported": supported},
        )
    # A .pdf may have up to 1 KB of junk before its header; another file only counts as a PDF if it starts with one
    # (a text that merely mentions "%PDF-" near its top stays text).
    if data.startswith(b"%PDF-") or (by_name == "pdf" and b"%PDF-" in data[:1024]):
        return "pdf"
    if data.startswith(b"PK\x03\x04") and _is_word_package(data):
        return "docx"
    if by_name == "txt" and _looks_like_html(data):
        return "html"
    return by_name


# ---------------------------------------------------------------------------------------------------- text bytes


def decode_text(data: bytes, filename: str, *, declared: str | None = None) -> tuple[str, str]:
    """Decode a text file and name its encoding: a BOM (UTF-8/16/32) decides; else strict UTF-8; else the
    ``declared`` charset (an HTML meta tag); else a single-byte encoding recognised by its byte statistics
    (Windows-1251 or KOI8-R for Russian, Windows-1252 for mostly-ASCII Western text). Binary data → NOT_TEXT."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _checked_text(data[len(bom) :].decode(encoding), filename), encoding
            except UnicodeDecodeError as error:
                raise _not_text(
                    filename, f"it starts with a {encoding} byte-order mark but is not {encoding}"
                ) from error
    if b"\x00" in data:
        raise _not_text(filename, "it contains NUL bytes (a binary file?)")
    for encoding in _candidate_encodings(data, declared):
        try:
            return _checked_text(data.decode(encoding), filename), encoding
        except (UnicodeDecodeError, LookupError):
            continue
    raise _not_text(filename, "it is neither UTF-8 nor a recognisable Cyrillic or Western single-byte encoding")


def _candidate_encodings(data: bytes, declared: str | None) -> Iterator[str]:
    yield "utf-8"
    if declared:
        yield declared
    if guessed := _single_byte_encoding(data):  # only computed when UTF-8 and the declared charset failed
        yield guessed


def _single_byte_encoding(data: bytes) -> str | None:
    sample = data[: 1 << 20]  # a megabyte tells the encoding as well as the whole file
    high = _count(sample, range(0x80, 0x100))
    if not high:
        return None
    # Russian text is mostly lower case: Windows-1251 puts а–я at 0xE0–0xFF, KOI8-R puts them at 0xC0–0xDF.
    upper_half, lower_half = _count(sample, range(0xE0, 0x100)), _count(sample, range(0xC0, 0xE0))
    typography = _count(sample, _CP1251_TYPOGRAPHY)
    latin = _count(sample, _ASCII_LETTERS)
    cyrillic = upper_half + lower_half
    # In Russian text most letters are non-ASCII; in French or German text a few are (é, ü): that tells them apart.
    if (cyrillic + typography) / high >= _MIN_CYRILLIC_SHARE and cyrillic >= latin:
        return "cp1251" if upper_half >= lower_half else "koi8_r"
    if high / len(sample) <= _MAX_WESTERN_HIGH_SHARE:
        return "cp1252"
    return None


def _count(data: bytes, byte_values: Iterable[int]) -> int:
    """How many bytes of ``data`` are among ``byte_values`` (translate runs in C; no Python loop over the data)."""
    keep = set(byte_values)
    return len(data.translate(None, delete=bytes(b for b in range(256) if b not in keep)))


def _checked_text(text: str, filename: str) -> str:
    if text and len(_CONTROL_CHARS.findall(text)) / len(text) > _MAX_CONTROL_SHARE:
        raise _not_text(filename, "it is mostly control characters (a binary file?)")
    return text


def has_visible_text(text: str) -> bool:
    return _VISIBLE.search(text) is not None


# ---------------------------------------------------------------------------------------------------- sections


@dataclass
class _SectionBuilder:
    """Collects text under the current heading path. A heading closes the section before it and opens its own,
    whose text starts with the heading line (so a chunk says what it is about). A heading with no text of its
    own before the next heading makes no section; it stays in the heading paths of the sections below it."""

    sections: list[Section] = field(default_factory=list)
    first_heading: str | None = None
    _stack: list[tuple[int, str]] = field(default_factory=list)
    _parts: list[str] = field(default_factory=list)
    _has_body: bool = False

    def heading(self, level: int, text: str) -> None:
        text = _one_line(text)
        if not has_visible_text(text):
            return
        self._flush()
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, text))
        if self.first_heading is None:
            self.first_heading = text
        self._parts = [text, "\n\n"]

    def text(self, text: str) -> None:
        if not text:
            return
        self._parts.append(text)
        if not self._has_body and has_visible_text(text):
            self._has_body = True

    def finish(self) -> list[Section]:
        self._flush()
        return self.sections

    def _flush(self) -> None:
        if self._has_body:
            self.sections.append(Section("".join(self._parts), tuple(text for _, text in self._stack)))
        self._parts = []
        self._has_body = False


@dataclass(frozen=True)
class _File:
    data: bytes
    name: str
    stem: str


def _document(file: _File, fmt: str, title: str | None, sections: list[Section], **metadata: str) -> ParsedDocument:
    if not sections:
        raise EmptyInput(f"{file.name} has no text", reason="EMPTY_DOCUMENT")
    title = _shorten(clean_text(title)) if title else ""
    return ParsedDocument(title or file.stem, sections, fmt, metadata)


# ---------------------------------------------------------------------------------------------------- txt


def _parse_txt(file: _File) -> ParsedDocument:
    text, encoding = decode_text(file.data, file.name)
    sections = [Section(text)] if has_visible_text(text) else []
    first_line = next((line for line in text.split("\n") if has_visible_text(line)), None)
    return _document(file, "txt", first_line, sections, encoding=encoding)


# ---------------------------------------------------------------------------------------------------- markdown

_ATX_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
_SETEXT_UNDERLINE = re.compile(r" {0,3}(=+|-+)[ \t]*")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_BLOCKQUOTE = re.compile(r"^ {0,3}>[ \t]?")
_LINK_DEFINITION = re.compile(r" {0,3}\[[^\]]+\]:\s*\S+.*")
_FRONT_MATTER_TITLE = re.compile(r"^title:[ \t]*(.+?)[ \t]*$", re.MULTILINE | re.IGNORECASE)
_MD_INLINE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # image → its alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # [text](url) → text
    (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),  # [text][ref] → text
    (re.compile(r"<((?:https?|mailto):[^>\s]+)>"), r"\1"),  # <https://…> → the address
    (re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>"), ""),  # inline HTML tags
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # **bold** → bold
    (re.compile(r"(`+)([^`]+?)\1"), r"\2"),  # `code` → code
)


def _parse_markdown(file: _File) -> ParsedDocument:
    text, encoding = decode_text(file.data, file.name)
    front_title, text = _split_front_matter(text)
    builder = _SectionBuilder()
    paragraph: list[str] = []
    fence: str | None = None

    def flush_paragraph() -> None:
        if paragraph:
            builder.text(_markdown_inline("\n".join(paragraph)) + "\n")
            paragraph.clear()

    for line in text.split("\n"):
        if fence is not None:  # inside a code block: text as is, no headings
            if line.strip().startswith(fence):
                fence = None
            else:
                builder.text(line + "\n")
        elif opening := _FENCE.match(line):
            flush_paragraph()
            fence = opening.group(1)
        elif atx := _ATX_HEADING.fullmatch(line):
            flush_paragraph()
            builder.heading(len(atx.group(1)), _markdown_inline(atx.group(2) or ""))
        elif (setext := _SETEXT_UNDERLINE.fullmatch(line)) and paragraph:
            level = 1 if setext.group(1).startswith("=") else 2
            builder.heading(level, _markdown_inline(" ".join(paragraph)))
            paragraph.clear()
        elif not line.strip():
            flush_paragraph()
            builder.text("\n")
        elif not _LINK_DEFINITION.fullmatch(line):
            paragraph.append(_BLOCKQUOTE.sub("", line))
    flush_paragraph()
    sections = builder.finish()
    return _document(file, "md", front_title or builder.first_heading, sections, encoding=encoding)


def _split_front_matter(text: str) -> tuple[str | None, str]:
    """YAML front matter (between "---" lines at the very top) is metadata, not text; its title is the title."""
    body = text.lstrip("\ufeff")
    if not body.startswith("---\n"):
        return None, text
    end = body.find("\n---", 3)
    if end == -1:
        return None, text
    after = body.find("\n", end + 4)
    found = _FRONT_MATTER_TITLE.search(body[4:end])
    title = found.group(1).strip("'\"") if found else None
    return title or None, body[after + 1 :] if after != -1 else ""


def _markdown_inline(text: str) -> str:
    for pattern, replacement in _MD_INLINE:
        text = pattern.sub(replacement, text)
    return text


# ---------------------------------------------------------------------------------------------------- html

_HEADING_TAGS = {f"h{level}": level for level in range(1, 7)}
_PARAGRAPH_TAGS = frozenset(
    {
        "address", "article", "blockquote", "body", "caption", "center", "details", "dialog", "dir", "div", "dl",
        "fieldset", "figcaption", "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hgroup", "hr", "html", "legend",
        "main", "menu", "ol", "p", "pre", "section", "summary", "table", "tbody", "tfoot", "thead", "ul",
    }
)  # fmt: skip
_LINE_TAGS = frozenset({"li", "tr", "dt", "dd"})
_CELL_TAGS = frozenset({"td", "th"})
# Page furniture and non-text: never content. <header> is dropped only outside <article>/<main>, where it usually
# holds the article's own title.
_DROPPED_TAGS = (
    "script", "style", "noscript", "template", "nav", "aside", "form", "footer", "iframe", "object", "embed",
    "svg", "canvas", "button", "select", "textarea", "dialog",
)  # fmt: skip
_DROPPED_BY_ATTRIBUTE = etree.XPath(
    "//*[@hidden or @aria-hidden='true' or @role='navigation' or @role='banner' or @role='contentinfo' "
    "or @role='complementary' or @role='search']"
)
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")
_HTML_FORBIDDEN_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_:.-]+)""", re.IGNORECASE)


def _parse_html(file: _File) -> ParsedDocument:
    declared = _META_CHARSET.search(file.data[:4096])
    text, encoding = decode_text(file.data, file.name, declared=declared.group(1).decode() if declared else None)
    if not has_visible_text(text):
        raise EmptyInput(f"{file.name} has no text", reason="EMPTY_DOCUMENT")
    # lxml refuses control characters in the text it builds; they are not text anyway.
    markup = _XML_DECLARATION.sub("", _HTML_FORBIDDEN_CHARS.sub("", text))
    try:
        root = lxml_html.document_fromstring(markup)
        title_element = root.find(".//title")
        title = _one_line(title_element.text_content()) if title_element is not None else ""
        _drop_furniture(root)
        builder = _SectionBuilder()
        _walk_html(_content_root(root), builder)
        first_h1 = _first_h1(root)
    except (etree.LxmlError, ValueError) as error:
        raise _unparseable(file.name, "HTML", error) from error
    sections = builder.finish()
    return _document(file, "html", title or first_h1 or builder.first_heading, sections, encoding=encoding)


def _drop_furniture(root: lxml_html.HtmlElement) -> None:
    etree.strip_elements(root, etree.Comment, etree.ProcessingInstruction, with_tail=False)
    doomed = list(root.iter(*_DROPPED_TAGS)) + list(_DROPPED_BY_ATTRIBUTE(root))
    doomed += [h for h in root.iter("header") if not any(a.tag in ("article", "main") for a in h.iterancestors())]
    for element in doomed:
        if element.getparent() is not None:
            element.drop_tree()  # keeps the element's tail text


def _content_root(root: lxml_html.HtmlElement) -> lxml_html.HtmlElement:
    """<main> (or role=main) when the page marks its content; else <body>."""
    for main in root.xpath("//main | //*[@role='main']"):
        if has_visible_text(main.text_content()):
            return main
    body = root.find("body")
    return body if body is not None else root


def _first_h1(root: lxml_html.HtmlElement) -> str | None:
    h1 = root.find(".//h1")
    if h1 is None:
        return None
    return _one_line(h1.text_content()) or None


def _walk_html(container: lxml_html.HtmlElement, builder: _SectionBuilder) -> None:
    """Depth-first over start/end events (no recursion, so deep nesting is safe): block elements become paragraph
    breaks, list items and rows line breaks, cells tabs, headings open sections."""
    heading: tuple[lxml_html.HtmlElement, int] | None = None
    heading_parts: list[str] = []
    preformatted = 0

    def add(text: str | None) -> None:
        if not text:
            return
        if heading is not None:
            heading_parts.append(text)
        else:
            builder.text(text if preformatted else _SPACES.sub(" ", text))

    def separate(tag: str, event: str) -> None:
        if heading is not None:
            return
        if tag in _PARAGRAPH_TAGS:
            builder.text("\n\n")
        elif (tag in _LINE_TAGS and event == "end") or (tag == "br" and event == "start"):
            builder.text("\n")
        elif tag in _CELL_TAGS and event == "start":
            builder.text("\t")

    for event, element in etree.iterwalk(container, events=("start", "end")):
        tag = element.tag.lower() if isinstance(element.tag, str) else ""
        if event == "start":
            if tag in _HEADING_TAGS and heading is None:
                heading, heading_parts = (element, _HEADING_TAGS[tag]), []
            separate(tag, event)
            if tag == "pre":
                preformatted += 1
            add(element.text)
            continue
        if tag == "pre":
            preformatted -= 1
        if heading is not None and heading[0] is element:
            level, heading = heading[1], None
            builder.heading(level, "".join(heading_parts))
        separate(tag, event)
        if element is not container:
            add(element.tail)


# ---------------------------------------------------------------------------------------------------- pdf

_JUNK_PDF_TITLES = re.compile(r"(?i)^(untitled.*|title|document\d*|.*\.(docx?|pdf|indd|tex|odt|rtf))$")


def _parse_pdf(file: _File) -> ParsedDocument:
    if b"%PDF-" not in file.data[:1024]:
        raise _unparseable(file.name, "PDF", "it does not start with a %PDF- header")
    try:
        with pypdf.apply_configuration(**PDF_LIMITS):
            reader = pypdf.PdfReader(io.BytesIO(file.data), strict=False)
            if reader.is_encrypted and not _decrypt_without_password(reader):
                raise _unparseable(file.name, "PDF", "it is password-protected; remove the password and retry")
            pages, failed = _pdf_page_texts(reader)
            metadata_title = _pdf_metadata_title(reader)
    except BatonError:
        raise
    except Exception as error:  # pypdf raises many types on broken files; all mean "cannot read this PDF"
        raise _unparseable(file.name, "PDF", error) from error
    if pages and failed == len(pages):
        raise _unparseable(file.name, "PDF", "no page could be read")
    pages = strip_page_furniture(pages)
    sections = [Section(text, (), number) for number, text in enumerate(pages, start=1) if has_visible_text(text)]
    if not sections:
        raise EmptyInput(
            f"{file.name} has no text layer (a scan?); run OCR on it (e.g. ocrmypdf) and ingest the result",
            reason="EMPTY_DOCUMENT",
        )
    first_line = next(line for line in sections[0].text.split("\n") if has_visible_text(line))
    metadata = {"pages": str(len(pages)), "pages_failed": str(failed)}
    return _document(file, "pdf", metadata_title or first_line, sections, **metadata)


def _decrypt_without_password(reader: object) -> bool:
    """Many PDFs are "encrypted" with an empty user password only to restrict printing; those open."""
    try:
        return bool(reader.decrypt(""))  # type: ignore[attr-defined]
    except Exception:  # missing AES support (the cryptography package) or a broken encryption dictionary
        return False


def _pdf_page_texts(reader: object) -> tuple[list[str], int]:
    """Each page's text; a page that cannot be read counts as failed and empty rather than failing the file."""
    texts: list[str] = []
    failed = 0
    for number, page in enumerate(reader.pages, start=1):  # type: ignore[attr-defined]
        try:
            texts.append(page.extract_text() or "")
        except Exception as error:
            log.debug("pdf page %d unreadable: %s", number, error)
            texts.append("")
            failed += 1
    return texts, failed


def _pdf_metadata_title(reader: object) -> str | None:
    try:
        title = reader.metadata.title if reader.metadata else None  # type: ignore[attr-defined]
    except Exception:
        return None
    title = _one_line(str(title or "")).removeprefix("Microsoft Word - ")
    return title if title and not _JUNK_PDF_TITLES.match(title) else None


# ---------------------------------------------------------------------------------------------------- docx

_HEADING_STYLE = re.compile(r"(?:heading|заголовок)\s*([1-9])", re.IGNORECASE)


def _parse_docx(file: _File) -> ParsedDocument:
    _check_zip(file)
    try:
        document = docx.Document(io.BytesIO(file.data))
        builder = _SectionBuilder()
        for level, text in _docx_blocks(document):
            if level is None:
                builder.text(text + "\n\n")
            else:
                builder.heading(level, text)
        core_title = document.core_properties.title
    except Exception as error:  # python-docx raises KeyError, ValueError, lxml errors… on broken packages
        raise _unparseable(file.name, "Word (.docx)", error) from error
    sections = builder.finish()
    return _document(file, "docx", _one_line(core_title or "") or builder.first_heading, sections)


def _check_zip(file: _File) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(file.data)) as package:
            unpacked = sum(info.file_size for info in package.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise _unparseable(file.name, "Word (.docx)", "it is not a valid zip package") from error
    if unpacked > MAX_DOCX_UNPACKED_BYTES:
        raise PayloadTooLarge(
            f"{file.name} unpacks to {unpacked / 1e6:.0f} MB, over the {MAX_DOCX_UNPACKED_BYTES / 1e6:.0f} MB "
            "limit for Word files; split it or save it as PDF",
            reason="DOCUMENT_TOO_LARGE",
            metadata={"unpacked_bytes": str(unpacked), "limit_bytes": str(MAX_DOCX_UNPACKED_BYTES)},
        )


def _docx_blocks(document: object) -> Iterator[tuple[int | None, str]]:
    """(heading level or None, text) for each paragraph and table, in document order. The "Title" style is level
    0, "Heading N" (or a style based on it, or a Russian "Заголовок N") is level N."""
    levels: dict[str, int | None] = {}
    for block in document.iter_inner_content():  # type: ignore[attr-defined]
        if isinstance(block, Table):
            yield None, _docx_table_text(block)
            continue
        style = block.style
        key = style.style_id if style is not None else ""
        if key not in levels:
            levels[key] = _docx_heading_level(style)
        yield levels[key], block.text


def _docx_heading_level(style: object) -> int | None:
    for _ in range(4):  # custom heading styles are usually based on a built-in "Heading N"
        if style is None:
            return None
        name = (style.name or "").strip()  # type: ignore[attr-defined]
        if name.lower() == "title":
            return 0
        if found := _HEADING_STYLE.fullmatch(name):
            return int(found.group(1))
        style = style.base_style  # type: ignore[attr-defined]
    return None


def _docx_table_text(table: object) -> str:
    rows: list[str] = []
    for row in table.rows:  # type: ignore[attr-defined]
        cells: list[str] = []
        for cell in row.cells:
            text = cell.text.strip()
            if not cells or cells[-1] != text:  # a merged cell is reported once per grid column it spans
                cells.append(text)
        rows.append("\t".join(cells))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- helpers


def _is_word_package(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as package:
            return "word/document.xml" in package.namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return False


def _looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _one_line(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _shorten(title: str) -> str:
    title = _one_line(title)
    if len(title) <= TITLE_MAX_CHARS:
        return title
    cut = title.rfind(" ", 0, TITLE_MAX_CHARS)
    return title[: cut if cut > TITLE_MAX_CHARS // 2 else TITLE_MAX_CHARS].rstrip(" ,.;:—–-") + "…"


def _not_text(filename: str, why: str) -> InvalidArgument:
    return InvalidArgument(
        f"{filename} is not a text file: {why}; convert it to UTF-8 text or upload it in its real format",
        reason="NOT_TEXT",
    )


def _unparseable(filename: str, kind: str, cause: object) -> InvalidArgument:
    detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {str(cause)[:200]}"
    return InvalidArgument(
        f"{filename} could not be read as {kind} ({detail}); check that the file is complete and opens in a viewer",
        reason="UNPARSEABLE",
    )


_PARSERS: dict[str, Callable[[_File], ParsedDocument]] = {
    "txt": _parse_txt,
    "md": _parse_markdown,
    "html": _parse_html,
    "pdf": _parse_pdf,
    "docx": _parse_docx,
}
