"""The trainer's dataset builder: documents or JSONL lines → cleaned text → the base model's tokens → training blocks.

Two shapes of data:

- **text** (ingested documents, or JSONL ``{"text": ...}`` lines): cleaned like the gateway cleans documents,
  tokenized, one EOS appended per document, and the documents of a split concatenated and cut into blocks of
  ``seq_len`` tokens (the last block of a split may be shorter). Loss on every token.
- **messages** (JSONL ``{"messages": [{"role", "content"}, ...]}`` lines): rendered with the model's chat template;
  one example per block, never packed with another, truncated to ``seq_len`` (the collator pads a micro-batch to its
  longest example). Loss on the assistant turns only (their content and the end-of-turn token) unless
  ``train_on_prompt``.

The train/eval split is by document (a JSONL line is a document); it and the order the documents are packed in are a
function of the seed and the documents' texts alone, so one document is never in both splits, a restarted job sees the
same split and the same blocks, and so does another machine. Everything here is pure and transport-free: it takes a
tokenizer and returns lists of token ids, statistics and a data hash; the worker turns them into tensors.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from baton.runtime.errors import FailedPrecondition, InvalidArgument
from baton.runtime.files import model_config
from services.gateway.ingest.clean import clean_text

IGNORE_INDEX = -100  # the label torch's cross-entropy skips
# Bump when the block layout or the split changes: equal hashes must mean equal training input. 2: split by content;
# 3: documents packed in the order of their content's hash, not the order they came in; no document ids hashed.
DATA_HASH_VERSION = 3
MAX_REPORTED_LINES = 10

LineFormat = Literal["text", "messages"]


@dataclass(frozen=True)
class TextDocument:
    """An ingested document: its catalog id, the file holding its cleaned UTF-8 text, and where it came from."""

    id: str
    path: Path
    source: str = ""


@dataclass(frozen=True)
class JsonlSource:
    path: Path
    format: Literal["auto", "text", "messages"] = "auto"
    train_on_prompt: bool = False


@dataclass(frozen=True)
class TextsSource:
    documents: tuple[TextDocument, ...]


DatasetSource = JsonlSource | TextsSource


@dataclass(frozen=True)
class Block:
    """One training sequence: token ids and labels of the same length (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class DatasetStats:
    documents: int
    train_documents: int
    eval_documents: int
    train_blocks: int
    eval_blocks: int
    train_tokens: int
    eval_tokens: int
    data_hash: str
    format: LineFormat

    def to_event(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "train_documents": self.train_documents,
            "eval_documents": self.eval_documents,
            "train_blocks": self.train_blocks,
            "eval_blocks": self.eval_blocks,
            "train_tokens": self.train_tokens,
            "eval_tokens": self.eval_tokens,
            "data_hash": self.data_hash,
        }


@dataclass(frozen=True)
class BuiltDataset:
    train: list[Block]
    eval: list[Block]
    stats: DatasetStats
    pad_token_id: int
    notes: list[str] = field(default_factory=list)  # things people should know (skipped documents, truncation)
    eval_document_ids: list[str] = field(default_factory=list)  # the held-out documents (baton eval views reads them)
    eval_document_sources: list[str] = field(default_factory=list)  # where they were ingested from ("" if unknown)


@dataclass(frozen=True)
class _Document:
    id: str  # "line 17" for JSONL, the catalog id for ingested documents
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    source: str = ""

    @property
    def key(self) -> str:
        """What the split hashes: the text, or the conversation as JSON."""
        return self.text if self.text is not None else json.dumps(self.messages, ensure_ascii=False, sort_keys=True)


# --------------------------------------------------------------------------------------------------- entry points


def source_from_spec(spec: dict[str, Any]) -> DatasetSource:
    """The dataset part of spec.json (see the parent/child contract) as a source."""
    kind = spec.get("kind")
    if kind == "jsonl":
        fmt = spec.get("format") or "auto"
        if fmt not in ("auto", "text", "messages"):
            raise InvalidArgument(f"dataset format {fmt!r} is unknown; use auto, text or messages")
        return JsonlSource(Path(spec["path"]), fmt, bool(spec.get("train_on_prompt", False)))
    if kind == "texts":
        documents = tuple(
            TextDocument(str(doc["id"]), Path(doc["path"]), str(doc.get("source") or ""))
            for doc in spec.get("documents", [])
        )
        return TextsSource(documents)
    raise InvalidArgument(f"dataset kind {kind!r} is unknown; use jsonl or texts")


def build_dataset(
    source: DatasetSource,
    tokenizer: Any,
    *,
    seq_len: int,
    eval_fraction: float,
    seed: int,
    max_positions: int | None = None,
) -> BuiltDataset:
    """Read, clean, tokenize, split by document and pack ``source`` with the base model's ``tokenizer``.

    ``max_positions`` is the model's context length: a longer ``seq_len`` is refused (SEQ_LEN_TOO_LONG).
    """
    _check_settings(seq_len, eval_fraction, max_positions)
    documents, fmt, notes = read_documents(source)
    if not documents:
        raise InvalidArgument(_empty_message(source), reason="EMPTY_DATASET")
    train_on_prompt = isinstance(source, JsonlSource) and source.train_on_prompt
    encoded = [_encode(doc, tokenizer, train_on_prompt) for doc in documents]
    train_idx, eval_idx = split_documents([doc.key for doc in documents], eval_fraction, seed)
    if fmt == "text":
        prefix = leading_special_ids(tokenizer)
        train = _pack([encoded[i] for i in train_idx], seq_len, prefix)
        evals = _pack([encoded[i] for i in eval_idx], seq_len, prefix)
    else:
        train, cut_train = _one_per_block([encoded[i] for i in train_idx], seq_len)
        evals, cut_eval = _one_per_block([encoded[i] for i in eval_idx], seq_len)
        if cut_train + cut_eval:
            notes.append(f"{cut_train + cut_eval} chat examples were longer than seq_len {seq_len} and truncated")
    if not train:
        raise InvalidArgument(
            "no training block is left (every example lost its answer to truncation); raise seq_len",
            reason="EMPTY_DATASET",
        )
    # No document ids: they differ between checkouts of the same files, and the blocks already say what is trained
    # on and what is held out — so the same texts give the same hash on every machine.
    header = {"version": DATA_HASH_VERSION, "format": fmt, "seq_len": seq_len, "train_on_prompt": train_on_prompt}
    stats = DatasetStats(
        documents=len(documents),
        train_documents=len(train_idx),
        eval_documents=len(eval_idx),
        train_blocks=len(train),
        eval_blocks=len(evals),
        train_tokens=sum(len(block.input_ids) for block in train),
        eval_tokens=sum(len(block.input_ids) for block in evals),
        data_hash=data_hash(header, train, evals),
        format=fmt,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eval_ids = [documents[i].id for i in eval_idx]
    sources = [documents[i].source for i in eval_idx]
    return BuiltDataset(train, evals, stats, int(pad if pad is not None else 0), notes, eval_ids, sources)


def split_documents(keys: Sequence[str], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the train and eval documents, each in the order the trainer packs them; ``keys`` are their texts.

    ``round(len(keys) * eval_fraction)`` documents are held out — at least one when there are two or more and
    eval_fraction > 0, never all of them, so training always has data: those whose seeded hash of their text is
    smallest. Both lists are in the order of that hash too. So the split and the packed training stream are a
    function of the documents themselves, not of the order they come in (a catalog lists them by ids that differ
    between machines: packed in that order, the same corpus trained a different adapter on another checkout), and a
    document added later leaves the others' split as it was but for at most one.
    """
    count = len(keys)
    ranked = sorted(range(count), key=lambda i: (hashlib.sha256(f"baton-split:{seed}\0{keys[i]}".encode()).digest(), i))
    if eval_fraction <= 0 or count < 2:
        return ranked, []
    n_eval = min(count - 1, max(1, round(count * eval_fraction)))
    return ranked[n_eval:], ranked[:n_eval]


def split_by_position(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The split before data hash version 2 (a seeded shuffle of positions), for adapters trained then, whose
    metadata does not list their held-out documents."""
    if eval_fraction <= 0 or count < 2:
        return list(range(count)), []
    n_eval = min(count - 1, max(1, round(count * eval_fraction)))
    order = list(range(count))
    random.Random(f"baton-split:{seed}").shuffle(order)
    held_out = set(order[:n_eval])
    return [i for i in range(count) if i not in held_out], sorted(held_out)


def data_hash(header: dict[str, Any], train: Sequence[Block], evals: Sequence[Block]) -> str:
    """sha256 over the settings, the split and every token id and label: equal hashes, equal training input."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, ensure_ascii=False).encode())
    for name, blocks in (("train", train), ("eval", evals)):
        digest.update(f"\0{name}:{len(blocks)}\0".encode())
        for block in blocks:
            digest.update(np.asarray(block.input_ids, dtype="<i4").tobytes())
            digest.update(np.asarray(block.labels, dtype="<i4").tobytes())
    return digest.hexdigest()


def load_tokenizer(model_path: Path) -> Any:
    """The base model's tokenizer from its local folder (never the hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)


def model_max_positions(model_path: Path) -> int | None:
    """The model's context length from config.json, or None when the config does not say."""
    try:
        config = model_config(Path(model_path))
    except FailedPrecondition:
        return None
    for holder in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(holder.get(key), int):
                return int(holder[key])
    return None


# -------------------------------------------------------------------------------------------------------- reading


def _check_settings(seq_len: int, eval_fraction: float, max_positions: int | None) -> None:
    if seq_len < 2:
        raise InvalidArgument(f"seq_len {seq_len} is too short; use at least 2 tokens (e.g. 512 or 1024)")
    if max_positions is not None and seq_len > max_positions:
        raise InvalidArgument(
            f"seq_len {seq_len} is above the base model's maximum of {max_positions} positions; "
            f"set hyperparameters.seq_len to {max_positions} or less",
            reason="SEQ_LEN_TOO_LONG",
            metadata={"seq_len": str(seq_len), "max_position_embeddings": str(max_positions)},
        )
    if not 0 <= eval_fraction <= 0.5:
        raise InvalidArgument(f"eval_fraction {eval_fraction} is out of range; use 0..0.5 (0 = no evaluation)")


def _empty_message(source: DatasetSource) -> str:
    if isinstance(source, JsonlSource):
        return f'{source.path} holds no training text (no non-empty lines); add {{"text"}} or {{"messages"}} lines'
    if not source.documents:
        return "the dataset names no documents; ingest documents into the collection first or pick another one"
    return "every document of the dataset is empty after cleaning; ingest documents that hold text"


def read_documents(source: DatasetSource) -> tuple[list[_Document], LineFormat, list[str]]:
    if isinstance(source, TextsSource):
        return _read_texts(source)
    return _read_jsonl(source)


def _read_texts(source: TextsSource) -> tuple[list[_Document], LineFormat, list[str]]:
    documents: list[_Document] = []
    empty = 0
    for doc in source.documents:
        try:
            raw = doc.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidArgument(
                f"cannot read the text of document {doc.id} at {doc.path} ({error}); re-ingest the document",
                reason="DATASET_PATH_INVALID",
                metadata={"document_id": doc.id, "path": str(doc.path)},
            ) from error
        text = clean_text(raw)  # the gateway stores cleaned text; cleaning is idempotent, so this is cheap safety
        if text:
            documents.append(_Document(doc.id, text=text, source=doc.source))
        else:
            empty += 1
    notes = [f"{empty} empty documents skipped"] if empty else []
    return documents, "text", notes


def _read_jsonl(source: JsonlSource) -> tuple[list[_Document], LineFormat, list[str]]:
    fmt: LineFormat | None = None if source.format == "auto" else source.format
    documents: list[_Document] = []
    bad: list[tuple[int, str]] = []
    empty = 0
    for number, line in _jsonl_lines(source.path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            bad.append((number, f"not valid JSON ({error.msg})"))
            continue
        if fmt is None:
            fmt = _detect_format(record)
            if fmt is None:
                bad.append((number, 'neither {"text": ...} nor {"messages": [...]}'))
                continue
        document, problem = _parse_line(record, fmt, number, source.train_on_prompt)
        if problem:
            bad.append((number, problem))
        elif document is not None:
            documents.append(document)
        else:
            empty += 1
    if bad:
        raise _bad_lines(source.path, bad, fmt)
    notes = [f"{empty} lines with empty text skipped"] if empty else []
    return documents, fmt or "text", notes


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) pairs; a line that is not UTF-8 comes back as a marker the JSON parser rejects."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise InvalidArgument(
            f"cannot open the JSONL dataset {path} ({error.strerror}); check the path",
            reason="DATASET_PATH_INVALID",
            metadata={"path": str(path)},
        ) from error
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, "\0not utf-8"


def _detect_format(record: Any) -> LineFormat | None:
    if isinstance(record, dict) and "messages" in record:
        return "messages"
    if isinstance(record, dict) and "text" in record:
        return "text"
    return None


def _parse_line(record: Any, fmt: LineFormat, number: int, train_on_prompt: bool) -> tuple[_Document | None, str]:
    """The line as a document, or a problem description; an empty text line is skipped (no document, no problem)."""
    doc_id = f"line {number}"
    if fmt == "text":
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            return None, 'expected {"text": "..."} like the first line'
        text = clean_text(record["text"])
        return (_Document(doc_id, text=text) if text else None), ""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return None, 'expected {"messages": [{"role": ..., "content": ...}, ...]} like the first line'
    messages: list[dict[str, str]] = []
    for message in record["messages"]:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None, 'every message needs a "role" string and a "content" string'
        if not isinstance(message.get("content"), str):
            return None, 'every message needs a "role" string and a "content" string'
        # Only Unicode NFC here, not clean_text: whitespace inside answers (code indentation, lists) is content.
        messages.append({"role": message["role"], "content": unicodedata.normalize("NFC", message["content"])})
    if not train_on_prompt and not any(m["role"] == "assistant" for m in messages):
        return None, "no assistant message: nothing to learn (add one, or set train_on_prompt)"
    return _Document(doc_id, messages=tuple(messages)), ""


def _bad_lines(path: Path, bad: list[tuple[int, str]], fmt: LineFormat | None) -> InvalidArgument:
    shown = "; ".join(f"line {number}: {problem}" for number, problem in bad[:MAX_REPORTED_LINES])
    more = f" (and {len(bad) - MAX_REPORTED_LINES} more)" if len(bad) > MAX_REPORTED_LINES else ""
    shape = f' (format "{fmt}")' if fmt else ""
    return InvalidArgument(
        f"{path} has {len(bad)} broken lines{shape}: {shown}{more}. Fix or remove them and submit again",
        reason="BAD_JSONL",
        metadata={"lines": ",".join(str(number) for number, _ in bad), "path": str(path)},
    )


# ------------------------------------------------------------------------------------------------------- encoding


def _encode(doc: _Document, tokenizer: Any, train_on_prompt: bool) -> Block:
    if doc.text is not None:
        ids = leading_special_ids(tokenizer) + tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))  # the model learns where a document ends
        return Block(ids, list(ids))
    assert doc.messages is not None
    return _encode_chat(doc, tokenizer, train_on_prompt)


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before every text (Gemma's ``<bos>``; none for Qwen or SmolLM2), so that
    a document trains as the model reads text when it serves: a Gemma trained without its ``<bos>`` learns in a
    setting it never meets again (its output without ``<bos>`` is garbage)."""
    plain = list(tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"])
    marked = list(tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"])
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return [int(token) for token in marked[:start]]
    return []


def _encode_chat(doc: _Document, tokenizer: Any, train_on_prompt: bool) -> Block:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument(
            "the base model's tokenizer has no chat template, so chat lines cannot be rendered; "
            'use {"text"} lines or a model with a chat template',
            reason="CHAT_TEMPLATE_MISSING",
        )
    messages = list(doc.messages or ())
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoding["input_ids"])
    if train_on_prompt:
        return Block(ids, list(ids))
    spans = _assistant_spans(rendered, messages, doc.id)
    offsets = encoding["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        inside = [i for i, (token_start, _) in enumerate(offsets) if start <= token_start < end]
        for i in inside:
            labels[i] = ids[i]
        # The end-of-turn token right after the answer (<|im_end|>, </s>, ...) is learnt too: it makes the model stop.
        after = inside[-1] + 1 if inside else next((i for i, (a, _) in enumerate(offsets) if a >= end), len(ids))
        if after < len(ids) and ids[after] in special:
            labels[after] = ids[after]
    return Block(ids, labels)


def _assistant_spans(rendered: str, messages: list[dict[str, str]], doc_id: str) -> list[tuple[int, int]]:
    """Character spans of the assistant contents in the rendered conversation, found in message order.

    Searching the content (not diffing renders of prefixes) works with templates that render earlier turns
    differently from the last one (Qwen3 drops old reasoning, some add a default system prompt).
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for message in messages:
        content = message["content"].strip()
        found = rendered.find(content, cursor) if content else -1
        if found < 0:
            if message["role"] == "assistant" and content:
                raise InvalidArgument(
                    f"{doc_id}: the chat template changes the assistant's text, so its tokens cannot be found; "
                    "set train_on_prompt to train on the whole conversation",
                    reason="CHAT_TEMPLATE_UNSUPPORTED",
                )
            continue
        cursor = found + len(content)
        if message["role"] == "assistant":
            spans.append((found, cursor))
    return spans


# -------------------------------------------------------------------------------------------------------- packing


def _pack(documents: Sequence[Block], seq_len: int, prefix: Sequence[int] = ()) -> list[Block]:
    """Concatenate the documents (each already ends with EOS) and cut the stream into seq_len blocks.

    With a ``prefix`` (the tokenizer's leading special tokens, Gemma's ``<bos>``) every block starts with it, also
    one cut in the middle of a document: such a model has only ever read text that begins with it, and a block
    without it would train (and evaluate) the model in a state it is never served in.
    """
    stream = [token for doc in documents for token in doc.input_ids]
    prefix = list(prefix)
    blocks: list[Block] = []
    start = 0
    while start < len(stream):
        has_prefix = stream[start : start + len(prefix)] == prefix  # a document starts here (or no prefix at all)
        taken = seq_len if has_prefix else max(1, seq_len - len(prefix))
        ids = stream[start : start + taken] if has_prefix else prefix + stream[start : start + taken]
        blocks.append(Block(ids, list(ids)))
        start += taken
    return blocks


def _one_per_block(examples: Sequence[Block], seq_len: int) -> tuple[list[Block], int]:
    """One chat example per block, truncated to seq_len; examples left without a labelled token are dropped."""
    blocks: list[Block] = []
    truncated = 0
    for example in examples:
        if len(example.input_ids) > seq_len:
            truncated += 1
        block = Block(example.input_ids[:seq_len], example.labels[:seq_len])
        # A label at position 0 is never predicted (the loss shifts by one), so it does not count.
        if any(label != IGNORE_INDEX for label in block.labels[1:]):
            blocks.append(block)
    return blocks, truncated
