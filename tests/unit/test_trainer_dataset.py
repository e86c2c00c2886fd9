"""The trainer's dataset builder: packing, the split by document, chat loss masks, and the errors that say what to
fix (broken JSONL lines with their numbers, an empty dataset, a sequence length above the model's)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from baton.models.tiny import IM_END, build_tiny_model
from baton.runtime.errors import InvalidArgument
from services.trainer.dataset import (
    IGNORE_INDEX,
    JsonlSource,
    TextDocument,
    TextsSource,
    build_dataset,
    load_tokenizer,
    model_max_positions,
    split_by_position,
    split_documents,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUSSIAN = "Иммануил Кант считал, что свобода воли есть способность разума давать себе закон."


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("trainer-dataset") / "model")


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> Any:
    return load_tokenizer(model)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    lines = [record if isinstance(record, str) else json.dumps(record, ensure_ascii=False) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def text_lines(count: int) -> list[dict[str, str]]:
    return [{"text": f"Document number {i}: the fox {'jumps ' * (i % 4 + 1)}over dog {i}."} for i in range(count)]


def build(path: Path, tokenizer: Any, **overrides: Any) -> Any:
    settings = {"seq_len": 16, "eval_fraction": 0.1, "seed": 0, "max_positions": 1024, **overrides}
    return build_dataset(JsonlSource(path), tokenizer, **settings)


# ------------------------------------------------------------------------------------------------------- packing


def test_text_documents_are_packed_into_seq_len_blocks_with_one_eos_each(tmp_path: Path, tokenizer: Any) -> None:
    records = text_lines(7)
    built = build(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, eval_fraction=0.0, seq_len=16)
    assert all(len(block.input_ids) == 16 for block in built.train[:-1])
    assert 0 < len(built.train[-1].input_ids) <= 16
    stream = [token for block in built.train for token in block.input_ids]
    expected = []
    packed_order = split_documents([record["text"] for record in records], 0.0, seed=0)[0]  # by the texts' hash
    assert sorted(packed_order) == list(range(7)) and packed_order != list(range(7))
    for index in packed_order:
        expected += tokenizer(records[index]["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream == expected
    assert stream.count(tokenizer.eos_token_id) == len(records)
    assert all(block.labels == block.input_ids for block in built.train)  # loss on every token of raw text
    stats = built.stats
    assert (stats.documents, stats.train_documents, stats.eval_documents) == (7, 7, 0)
    assert stats.train_tokens == len(expected) and stats.train_blocks == len(built.train) and stats.eval_blocks == 0


def test_the_blocks_follow_the_texts_not_the_order_they_come_in(tmp_path: Path, tokenizer: Any) -> None:
    """A catalog lists documents by ids that differ between checkouts: the same texts must train the same blocks."""
    records = text_lines(12)
    forward = build(write_jsonl(tmp_path / "forward.jsonl", records), tokenizer, eval_fraction=0.25)
    backward = build(write_jsonl(tmp_path / "backward.jsonl", records[::-1]), tokenizer, eval_fraction=0.25)
    assert forward.train == backward.train and forward.eval == backward.eval
    assert forward.stats.eval_documents == 3
    assert forward.stats.data_hash == backward.stats.data_hash  # the lines' numbers (their ids) differ; the hash not


def test_russian_text_round_trips_through_the_tokenizer(tmp_path: Path, tokenizer: Any) -> None:
    built = build(write_jsonl(tmp_path / "ru.jsonl", [{"text": f"  {RUSSIAN}\u200b  "}]), tokenizer, seq_len=512)
    ids = built.train[0].input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == RUSSIAN  # cleaned (invisible character and edge spaces gone), not mangled


# --------------------------------------------------------------------------------------------------------- split


def test_split_is_by_document_deterministic_and_never_overlaps(tmp_path: Path, tokenizer: Any) -> None:
    records = [{"text": f"unique marker {i:03d}"} for i in range(40)]
    path = write_jsonl(tmp_path / "split.jsonl", records)
    first = build(path, tokenizer, seq_len=8, seed=7)
    again = build(path, tokenizer, seq_len=8, seed=7)
    other_seed = build(path, tokenizer, seq_len=8, seed=8)
    assert first.stats == again.stats and first.train == again.train and first.eval == again.eval
    assert (first.stats.train_documents, first.stats.eval_documents) == (36, 4)
    assert first.stats.data_hash != other_seed.stats.data_hash

    def markers(blocks: list[Any]) -> set[str]:
        text = tokenizer.decode([token for block in blocks for token in block.input_ids])
        return {line.split()[-1] for line in text.split(tokenizer.eos_token) if line.strip()}

    train, held_out = markers(first.train), markers(first.eval)
    assert len(held_out) == 4 and len(train) == 36 and not train & held_out


@pytest.mark.parametrize(
    ("count", "fraction", "expected_eval"),
    [(1, 0.1, 0), (2, 0.1, 1), (10, 0.1, 1), (100, 0.1, 10), (3, 0.5, 2), (50, 0.0, 0)],
)
def test_eval_split_size(count: int, fraction: float, expected_eval: int) -> None:
    for split in (
        split_documents([f"text {i}" for i in range(count)], fraction, seed=0),
        split_by_position(count, fraction, seed=0),
    ):
        train, held_out = split
        assert len(held_out) == expected_eval
        assert sorted(train + held_out) == list(range(count)) and not set(train) & set(held_out)
        assert train, "training always keeps at least one document"


def test_the_split_follows_the_texts_not_their_order() -> None:
    texts = [f"an essay about subject {i}" for i in range(30)]

    def held_out(keys: list[str], seed: int = 3) -> set[str]:
        return {keys[i] for i in split_documents(keys, 0.2, seed)[1]}

    chosen = held_out(texts)
    assert len(chosen) == 6 and held_out(texts[::-1]) == chosen  # another machine's catalog order: the same split
    assert held_out(texts, seed=4) != chosen
    grown = held_out([*texts[:10], "a new essay", *texts[10:]])  # one more document: the others mostly stay put
    assert len(grown & chosen) >= len(chosen) - 1
    duplicates = split_documents(["same", "same", "other"], 0.34, seed=0)[1]
    assert len(duplicates) == 1  # equal texts still count once each


def test_same_input_same_hash_and_settings_change_it(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", text_lines(5))
    assert build(path, tokenizer).stats.data_hash == build(path, tokenizer).stats.data_hash
    assert build(path, tokenizer).stats.data_hash != build(path, tokenizer, seq_len=32).stats.data_hash


# ---------------------------------------------------------------------------------------------------------- chat


def chat_record(answer: str = "Конечно, вот ответ.") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "Отвечай кратко."},
            {"role": "user", "content": "Привет! Как дела?"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And in English?"},
            {"role": "assistant", "content": "Fine, thanks."},
        ]
    }


def supervised_text(tokenizer: Any, block: Any) -> str:
    return tokenizer.decode(
        [token for token, label in zip(block.input_ids, block.labels, strict=True) if label != IGNORE_INDEX]
    )


def test_chat_loss_is_only_on_assistant_tokens(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_record() for _ in range(3)])
    built = build(path, tokenizer, seq_len=256)
    assert built.stats.format == "messages"
    assert (built.stats.train_blocks, built.stats.eval_blocks) == (2, 1)  # one example per block, never packed
    block = built.train[0]
    assert supervised_text(tokenizer, block) == f"Конечно, вот ответ.{IM_END}Fine, thanks.{IM_END}"
    rendered = tokenizer.decode(block.input_ids)
    assert rendered.startswith("<|im_start|>system\nОтвечай кратко.")
    for label, token in zip(block.labels, block.input_ids, strict=True):
        assert label in (IGNORE_INDEX, token)


def test_chat_train_on_prompt_labels_every_token(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_record()])
    built = build_dataset(
        JsonlSource(path, "messages", train_on_prompt=True), tokenizer, seq_len=256, eval_fraction=0, seed=0
    )
    assert built.train[0].labels == built.train[0].input_ids


def test_long_chat_examples_are_truncated_to_seq_len_and_reported(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_record("слово " * 100)])
    built = build(path, tokenizer, seq_len=40, eval_fraction=0)
    assert len(built.train[0].input_ids) == 40
    assert any("truncated" in note for note in built.notes)


# -------------------------------------------------------------------------------------------------------- errors


def test_broken_lines_are_reported_with_their_numbers(tmp_path: Path, tokenizer: Any) -> None:
    records: list[Any] = [
        {"text": "good"},
        "{not json",
        "",
        {"messages": [{"role": "user", "content": "other shape"}]},
        {"text": 42},
        {"text": "good again"},
    ]
    with pytest.raises(InvalidArgument) as caught:
        build(write_jsonl(tmp_path / "bad.jsonl", records), tokenizer)
    error = caught.value
    assert error.reason == "BAD_JSONL"
    assert error.metadata["lines"] == "2,4,5"
    assert "line 2: not valid JSON" in error.message and "line 4" in error.message and "line 5" in error.message
    assert "Fix or remove them" in error.message


def test_many_broken_lines_show_the_first_ten(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}] + ["oops"] * 15)
    with pytest.raises(InvalidArgument) as caught:
        build(path, tokenizer)
    assert "has 15 broken lines" in caught.value.message and "(and 5 more)" in caught.value.message
    assert "line 11:" in caught.value.message and "line 12:" not in caught.value.message


def test_chat_line_without_an_assistant_turn_is_broken(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_record(), {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(InvalidArgument) as caught:
        build(path, tokenizer)
    assert caught.value.metadata["lines"] == "2" and "no assistant message" in caught.value.message


@pytest.mark.parametrize("content", ["", "\n\n   \n", '{"text": "   "}\n'])
def test_empty_jsonl_is_an_empty_dataset(tmp_path: Path, tokenizer: Any, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidArgument) as caught:
        build(path, tokenizer)
    assert caught.value.reason == "EMPTY_DATASET"


def test_no_documents_is_an_empty_dataset(tokenizer: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_dataset(TextsSource(()), tokenizer, seq_len=16, eval_fraction=0.1, seed=0)
    assert caught.value.reason == "EMPTY_DATASET" and "ingest documents" in caught.value.message


def test_seq_len_above_the_model_maximum_is_refused(tmp_path: Path, model: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", text_lines(3))
    limit = model_max_positions(model)
    assert limit == 1024
    with pytest.raises(InvalidArgument) as caught:
        build(path, tokenizer, seq_len=2048, max_positions=limit)
    assert caught.value.reason == "SEQ_LEN_TOO_LONG"
    assert "set hyperparameters.seq_len to 1024 or less" in caught.value.message


def test_missing_jsonl_file_says_so(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build(tmp_path / "nope.jsonl", tokenizer)
    assert caught.value.reason == "DATASET_PATH_INVALID"


# ------------------------------------------------------------------------------------------- ingested documents


def test_ingested_texts_are_documents(tmp_path: Path, tokenizer: Any) -> None:
    documents = []
    for i in range(4):
        path = tmp_path / f"{i}.txt"
        path.write_text(f"{RUSSIAN} ({i})" if i != 2 else "  \n", encoding="utf-8")
        documents.append(TextDocument(f"doc-{i}", path, source=f"/home/me/notes/{i}.md"))
    built = build_dataset(TextsSource(tuple(documents)), tokenizer, seq_len=64, eval_fraction=0.3, seed=1)
    assert built.stats.documents == 3  # the empty one is skipped and said so
    assert any("1 empty documents skipped" in note for note in built.notes)
    assert (built.stats.train_documents, built.stats.eval_documents) == (2, 1)
    # What was held out, by id and by where it was ingested from (baton eval views reports probe pairs on it apart).
    (held,) = built.eval_document_ids
    assert built.eval_document_sources == [f"/home/me/notes/{held.removeprefix('doc-')}.md"]

    missing = TextsSource((TextDocument("gone", tmp_path / "gone.txt"),))
    with pytest.raises(InvalidArgument) as caught:
        build_dataset(missing, tokenizer, seq_len=64, eval_fraction=0.1, seed=0)
    assert caught.value.reason == "DATASET_PATH_INVALID" and caught.value.metadata["document_id"] == "gone"


def test_blocks_of_a_bos_model_each_start_with_bos() -> None:
    """Gemma reads every text from <bos>: a block cut in the middle of a document gets it too (and the rest of
    the stream is neither lost nor repeated); a model without a leading token is packed as before."""
    from services.trainer.dataset import Block, _pack

    documents = [Block([2, 5, 6, 7, 1], [2, 5, 6, 7, 1]), Block([2, 8, 9, 1], [2, 8, 9, 1])]
    blocks = [block.input_ids for block in _pack(documents, 4, [2])]
    assert blocks == [[2, 5, 6, 7], [2, 1, 2, 8], [2, 9, 1]]
    assert all(block[0] == 2 for block in blocks)
    plain = [Block([5, 6, 7, 1], [5, 6, 7, 1]), Block([8, 9, 1], [8, 9, 1])]
    assert [block.input_ids for block in _pack(plain, 4)] == [[5, 6, 7, 1], [8, 9, 1]]


def test_leading_special_ids_of_the_real_models(smollm2: Path, gemma3: Path) -> None:
    from transformers import AutoTokenizer

    from services.trainer.dataset import leading_special_ids

    assert leading_special_ids(AutoTokenizer.from_pretrained(str(gemma3))) == [2]  # <bos>
    assert leading_special_ids(AutoTokenizer.from_pretrained(str(smollm2))) == []
