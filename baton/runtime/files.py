"""File operations: what "written aside, then renamed" needs to survive a crash or a power loss, and reading a model
folder's metadata (config.json, safetensors headers) without loading the model."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from baton.runtime.errors import FailedPrecondition

_MAX_SAFETENSORS_HEADER_BYTES = 100 << 20


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folder itself (before renaming it into place)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names → dtype, shape, offsets), without reading the weights.

    Raises ``ValueError`` (or ``OSError``) when the file is not a readable safetensors file.
    """
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_SAFETENSORS_HEADER_BYTES:
            raise ValueError(f"header of {length} bytes")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def model_config(folder: Path) -> dict[str, Any]:
    """A Hugging Face model folder's ``config.json``. A missing or unreadable file is a FAILED_PRECONDITION that
    names the file, the same for every service and command that reads one."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FailedPrecondition(
            f"{folder} has no config.json (give a Hugging Face model folder)", reason="MODEL_CONFIG_MISSING"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FailedPrecondition(f"{path} is unreadable: {error}", reason="MODEL_CONFIG_UNREADABLE") from None
    if not isinstance(config, dict):
        raise FailedPrecondition(f"{path} is not a JSON object", reason="MODEL_CONFIG_UNREADABLE")
    return config
