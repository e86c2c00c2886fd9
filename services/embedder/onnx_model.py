"""The ONNX Runtime backend: the folder's modules exported once to ONNX (fp32, opset 17), then run without torch.

The export lands in ``<cache>/<model sha>-opset17-r<revision>/`` with a ``card.json`` and the tokenizer beside
it, so a later start loads ONNX Runtime alone (no torch import, no export); ``backends`` runs the export itself in
a child process, so even a first start leaves no torch in the service. BERT-family encoders are exported with
plain ("eager") attention and then fused by ONNX Runtime's transformer optimizer (Attention, SkipLayerNorm,
BiasGelu, EmbedLayerNorm kernels, still fp32): on CPU that is what makes ONNX Runtime faster than torch, and the
SDPA graph torch exports by default is not recognised by the fusions. Every export is checked against torch before
it is kept: a fused graph that disagrees falls back to the plain one, and a plain one that disagrees (cosine < 0.999
on probe texts) is refused rather than cached.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from baton.runtime.errors import Internal, InvalidArgument
from baton.runtime.logging import log_event
from services.embedder.model import (
    LoadOptions,
    ModelCard,
    TokenIdsModel,
    card_from_sentence_transformer,
    load_sentence_transformer,
    pooled_modules,
)

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_REVISION = 2  # part of the cache folder's name: bump it whenever the export changes
MIN_EXPORT_COSINE = 0.999
# Encoders whose attention ONNX Runtime's "bert" fusions recognise (config.json model_type).
_FUSABLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert"})
_PROBE_TEXTS = (
    "A short probe.",
    "The export must give the same vectors as torch for inputs of different lengths, so padding is exercised "
    "and the attention mask really masks.",
    "Проверка: кириллица тоже проходит через экспорт.",
)


class OnnxModel(TokenIdsModel):
    def __init__(self, card: ModelCard, tokenizer: Tokenizer, session: Any) -> None:
        super().__init__(card, tokenizer)
        self._session = session
        self._output = session.get_outputs()[0].name

    @classmethod
    def from_export(cls, folder: Path, options: LoadOptions) -> OnnxModel:
        """Run a finished export (``export_to_onnx``'s folder) with the options' threads, device and names."""
        import onnxruntime

        card = ModelCard.from_json(json.loads((folder / "card.json").read_text()))
        card = _with_overrides(card, options)
        providers = ["CPUExecutionProvider"]
        if options.device == "cuda" or (
            options.device == "auto" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), _session_options(options), providers)
        device = "cuda:0" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if options.device == "cuda" and device != "cuda:0":
            raise InvalidArgument("device=cuda but ONNX Runtime has no CUDA provider here; use --device cpu or auto")
        card = ModelCard.from_json({**card.to_json(), "device": device})
        log_event(log, "model.loaded", backend=card.backend, model=card.model_id, device=device, onnx=folder)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_truncation()  # this copy is ours: switched off in place, not copied again (untruncated)
        tokenizer.no_padding()
        return cls(card, tokenizer, session)

    def embed_token_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        (vectors,) = self._session.run([self._output], self.padded_inputs(batch))
        return np.asarray(vectors, dtype=np.float32)


def export_folder(cache_dir: Path, weights_sha: str) -> Path:
    """Where the export of the weights with this sha256 lives: the key changes with the weights and the export."""
    return cache_dir / f"{weights_sha[:16]}-opset{OPSET}-r{EXPORT_REVISION}"


def is_exported(folder: Path) -> bool:
    return (folder / "card.json").is_file()  # written last: a folder with it is complete


def _session_options(options: LoadOptions) -> Any:
    import onnxruntime

    session_options = onnxruntime.SessionOptions()
    session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.threads:
        session_options.intra_op_num_threads = options.threads
    # Idle pool threads sleep instead of spinning: between batches the same cores tokenize and serve HTTP.
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return session_options


def _with_overrides(card: ModelCard, options: LoadOptions) -> ModelCard:
    """Settings that may differ from the export's (name, languages) without a new export."""
    data = card.to_json()
    data["model_id"] = options.model_id or data["model_id"]
    data["model_path"] = str(options.model_path)
    if options.languages:
        data["languages"] = options.languages
    return ModelCard.from_json(data)


def export_to_onnx(
    options: LoadOptions, folder: Path, *, rewrite: Callable[[Path], None] | None = None, **card_fields: Any
) -> None:
    """Export the folder's pooled modules to ``folder`` (atomically: a crash leaves no half-written cache).
    ``rewrite`` may change the checked graph file in place (it is checked against torch again after it);
    ``card_fields`` replace what the card would say of the folder (a model converted from another format keeps
    its own name and hash)."""
    st = load_sentence_transformer(options.model_path, "cpu")
    card = card_from_sentence_transformer(st, options, backend="onnxruntime", device="cpu")
    card = ModelCard.from_json({**card.to_json(), **card_fields})
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared by whoever runs the service
    try:
        expected = _torch_probe_vectors(st, card)
        graph = _export_checked(st, card, staging, expected)
        if rewrite is not None:
            rewrite(graph)
            _require_agreement(graph, card, st, expected)
        os.replace(graph, staging / "model.onnx")
        for leftover in staging.glob("*.onnx"):  # the other candidates
            if leftover.name != "model.onnx":
                leftover.unlink()
        st.tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "card.json").write_text(json.dumps(card.to_json(), indent=2))
        if not is_exported(folder):  # another process may have finished the same export first
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log_event(log, "model.onnx_exported", model=card.model_id, folder=folder, opset=OPSET)


def _export_checked(st: Any, card: ModelCard, staging: Path, expected: np.ndarray) -> Path:
    """The best graph that reproduces torch's ``expected`` probe vectors: fused if possible, else plain."""
    transformer = st[0].auto_model
    config = transformer.config
    if config.model_type in _FUSABLE_MODEL_TYPES and hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")  # the pattern the fusions know
        eager = _export(st, card, staging / "eager.onnx")
        fused = staging / "fused.onnx"
        if _fuse(eager, fused, config) and _probe_cosine(fused, card, st, expected) >= MIN_EXPORT_COSINE:
            return fused
        log_event(log, "model.onnx_fusion_skipped", level=logging.WARNING, model=card.model_id)
    plain = _export(st, card, staging / "plain.onnx")
    _require_agreement(plain, card, st, expected)
    return plain


def _require_agreement(graph: Path, card: ModelCard, st: Any, expected: np.ndarray) -> None:
    cosine = _probe_cosine(graph, card, st, expected)
    if cosine < MIN_EXPORT_COSINE:
        raise Internal(
            f"the ONNX export of {card.model_id} disagrees with torch (cosine {cosine:.4f} < {MIN_EXPORT_COSINE}); "
            "use --backend torch for this model"
        )


def _export(st: Any, card: ModelCard, path: Path) -> Path:
    import torch

    network = _pooled_network(pooled_modules(st), card.input_names)
    with warnings.catch_warnings():
        # The tracer warns about Python branches on shapes; they are fixed for every input length here, and the
        # probe check proves the graph right on inputs of other lengths.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            _example_inputs(st, card),
            str(path),
            input_names=list(card.input_names),
            output_names=["sentence_embedding"],
            dynamic_axes={
                **{name: {0: "batch", 1: "sequence"} for name in card.input_names},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: the dynamo one needs onnxscript, which is not installed
        )
    return path


def _fuse(source: Path, target: Path, config: Any) -> bool:
    from onnxruntime.transformers import optimizer

    try:
        fused = optimizer.optimize_model(
            str(source), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
        )
    except Exception as error:  # an unusual graph: the plain export still works
        log_event(log, "model.onnx_fusion_failed", level=logging.WARNING, error=repr(error))
        return False
    fused.save_model_to_file(str(target))
    return fused.get_fused_operator_statistics().get("Attention", 0) > 0


def _pooled_network(modules: list[Any], input_names: Sequence[str]) -> Any:
    """The sentence-transformers modules as a network with positional tensor inputs, as the exporter wants."""
    import torch

    class PooledNetwork(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(*modules)

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.body(dict(zip(input_names, inputs, strict=True)))["sentence_embedding"]

    return PooledNetwork().eval()


def _example_inputs(st: Any, card: ModelCard) -> tuple[Any, ...]:
    # Two inputs of different lengths: the trace must include a real padding mask, or a graph that ignores the
    # mask (all-ones at trace time) would be exported.
    import torch

    features = st.preprocess(list(_PROBE_TEXTS[:2]))
    return tuple(torch.as_tensor(features[name]) for name in card.input_names)


def _torch_probe_vectors(st: Any, card: ModelCard) -> np.ndarray:
    import torch

    with torch.inference_mode():
        features = st.preprocess(list(_PROBE_TEXTS))
        return torch.nn.Sequential(*pooled_modules(st))(dict(features))["sentence_embedding"].numpy()


def _probe_cosine(graph: Path, card: ModelCard, st: Any, expected: np.ndarray) -> float:
    import onnxruntime

    features = st.preprocess(list(_PROBE_TEXTS))
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feeds = {name: np.asarray(features[name], dtype=np.int64) for name in card.input_names}
    (actual,) = session.run(None, feeds)
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12
    return float((np.sum(actual * expected, axis=1) / norms).min())
