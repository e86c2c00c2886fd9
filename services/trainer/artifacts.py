"""What a finished job leaves in ``JOB_DIR/output/``: the peft adapter, ``baton-adapter.json`` and ``loss.png``.

The folder is written aside and renamed into place, so ``output/`` either holds a complete result or does not
exist: the parent copies it into the adapter registry only after the child's ``done`` event, and a child killed
half-way through publishing leaves nothing it could mistake for a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from baton.runtime.files import fsync_dir, fsync_tree

METADATA_FILE = "baton-adapter.json"
LOSS_PLOT_FILE = "loss.png"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Up to this much weight data the base-model hash covers the bytes; above it, names and sizes (hashing tens of
# gigabytes would delay every job by minutes for a check that names and sizes already make near-certain).
FULL_HASH_LIMIT_BYTES = 256 * 1024 * 1024


def base_model_hash(model_path: Path) -> str:
    """sha256 (hex) of config.json and the weight files: their bytes when small, their names and sizes otherwise."""
    folder = Path(model_path)
    weights = sorted(path for path in folder.iterdir() if path.is_file() and _is_weight_file(path))
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    full = sum(path.stat().st_size for path in weights) <= FULL_HASH_LIMIT_BYTES
    digest.update(b"\0bytes\0" if full else b"\0sizes\0")
    for path in weights:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        if full:
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json")


def plot_losses(path: Path, steps: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> None:
    """Train loss per step, eval loss of the adapter, and the base model's eval loss as a reference line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, no display, safe in any process.
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if steps:
        axes.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", linewidth=1.2)
    adapter = [e for e in evals if e["which"] == "adapter"]
    if adapter:
        axes.plot([e["step"] for e in adapter], [e["eval_loss"] for e in adapter], "o-", label="eval loss (adapter)")
    base = next((e for e in evals if e["which"] == "base"), None)
    if base is not None:
        axes.axhline(base["eval_loss"], linestyle="--", color="grey", label="eval loss (base model)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    if steps or evals:
        axes.legend()
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def publish_output(
    output: Path,
    write_adapter: Callable[[Path], None],
    metadata: dict[str, Any],
    steps: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Write the adapter, the metadata and the loss plot into a temporary sibling of ``output`` and rename it into
    place (replacing an older output of the same job); return the metadata as written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.writing-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the registry copy and other readers need the usual mode
    try:
        write_adapter(staging)
        plot_losses(staging / LOSS_PLOT_FILE, steps, evals)
        written = {
            **metadata,
            "size_bytes": sum(path.stat().st_size for path in staging.iterdir() if path.suffix == ".safetensors"),
            "loss_plot": LOSS_PLOT_FILE,
            "created_unix_s": time.time(),
        }
        (staging / METADATA_FILE).write_text(
            json.dumps(written, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        fsync_tree(staging)
        _replace_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
    return written


def _replace_dir(staging: Path, output: Path) -> None:
    # rename() replaces only an empty directory: an older output (a rerun after a crash) is moved aside first.
    if output.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, trash / output.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staging, output)
    fsync_dir(output.parent)
