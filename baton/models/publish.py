"""Publishing a built model folder: atomic, idempotent, safe against a concurrent builder.

A build goes into a temporary sibling folder and is renamed into place, with a stamp file (the build's spec) written
last: a folder with a stamp equal to the spec is complete and is returned at once; a crash never leaves a
half-written folder where a model is expected. Used by the tiny model kit and by ``baton models prepare``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from baton.runtime.errors import FailedPrecondition
from baton.runtime.logging import log_event

log = logging.getLogger(__name__)


def publish(folder: Path, stamp_name: str, spec: dict[str, Any], build: Callable[[Path], None], *, event: str) -> Path:
    """Return ``folder`` if its stamp equals ``spec``; otherwise build into a temporary sibling and swap it in."""
    folder = Path(folder)
    if read_stamp(folder, stamp_name) == spec:
        return folder
    if folder.exists() and not (folder / stamp_name).is_file() and any(folder.iterdir()):
        raise FailedPrecondition(
            f"{folder} exists, is not empty and holds no {stamp_name}: it is not a build of this kit; "
            "remove it or choose another folder"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with staging_dir(folder) as staging:
        build(staging)
        # The stamp is written last: only a complete build carries one.
        write_json(staging / stamp_name, spec)
        swap_in(staging, folder, stamp_name, spec)
    log_event(log, event, folder=str(folder), seconds=round(time.perf_counter() - started, 2))
    return folder


@contextlib.contextmanager
def staging_dir(folder: Path) -> Iterator[Path]:
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone once renamed into place


def swap_in(staging: Path, folder: Path, stamp_name: str, spec: dict[str, Any]) -> None:
    # A stale build (another stamp) is moved aside first: rename() replaces only an empty directory.
    if (folder / stamp_name).is_file():
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
        with contextlib.suppress(FileNotFoundError):  # a concurrent builder moved it already
            os.replace(folder, trash / folder.name)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(staging, folder)
    except OSError as error:
        # A concurrent builder published first; its build is as good as ours if the stamps agree.
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or read_stamp(folder, stamp_name) != spec:
            raise


def read_stamp(folder: Path, stamp_name: str) -> dict[str, Any] | None:
    try:
        return json.loads((folder / stamp_name).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
