"""The adapter registry on disk: ``<root>/<name>/<version>/`` with version = 1, 2, ... per name.

A version appears only complete: the job's ``output/`` is copied into ``<root>/<name>/.staging-<job_id>/`` (files
fsynced), ``registry.json`` is added (which job made it, when), and the folder is renamed to the next free version
number. A crash or a cancel before the rename leaves only a staging folder, which the next publish of that name
removes; nobody ever sees half a version. Publishing is idempotent per job: a job whose version already exists (the
service died between the rename and recording SUCCEEDED) gets that version back instead of a second one.

The inference service loads adapters from the same root (its ``adapter_root``), by the relative path
``<name>/<version>``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.runtime.files import fsync_dir, fsync_tree

REGISTRY_FILE = "registry.json"
METADATA_FILE = "baton-adapter.json"  # written by the training process (services/trainer/artifacts.py)
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE)
_STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    path: Path
    registry: dict[str, Any]
    metadata: dict[str, Any]

    @property
    def relative_path(self) -> str:
        return f"{self.name}/{self.version}"


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(entry.name) for entry in folder.iterdir() if entry.name.isdigit() and entry.is_dir())

    def owner(self, name: str) -> str | None:
        """The tenant whose jobs publish under ``name`` (the first version's), or None for a free name."""
        for version in self.versions(name):
            tenant = self.read(name, version).registry.get("tenant")
            if tenant:
                return str(tenant)
        return None

    def read(self, name: str, version: int) -> RegisteredVersion:
        path = self.root / name / str(version)
        registry, metadata = _read_json(path / REGISTRY_FILE), _read_json(path / METADATA_FILE)
        return RegisteredVersion(name, version, path, registry, metadata)

    def find_by_job(self, name: str, job_id: str) -> RegisteredVersion | None:
        for version in reversed(self.versions(name)):
            found = self.read(name, version)
            if found.registry.get("job_id") == job_id:
                return found
        return None

    def publish(self, name: str, job_id: str, output: Path, record: dict[str, Any]) -> RegisteredVersion:
        """Copy ``output`` in as the next version of ``name`` (see the module docstring); returns it."""
        existing = self.find_by_job(name, job_id)
        if existing is not None:
            return existing
        missing = [file for file in REQUIRED_FILES if not (output / file).is_file()]
        if missing:
            raise FileNotFoundError(f"{output} lacks {', '.join(missing)}")
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging(folder)
        staging = folder / f"{_STAGING_PREFIX}{job_id}"
        shutil.copytree(output, staging)
        while True:
            version = (self.versions(name) or [0])[-1] + 1
            _write_json(staging / REGISTRY_FILE, {**record, "job_id": job_id, "name": name, "version": version})
            fsync_tree(staging)
            try:
                # rename(2) onto an existing non-empty folder fails, so a version is never overwritten.
                staging.rename(folder / str(version))
                break
            except OSError:
                if not (folder / str(version)).exists():
                    raise
        fsync_dir(folder)
        return self.read(name, version)

    def remove_staging(self, name: str, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root / name / f"{_STAGING_PREFIX}{job_id}")

    def all_versions(self) -> list[RegisteredVersion]:
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                found += [self.read(folder.name, version) for version in self.versions(folder.name)]
        return found

    @staticmethod
    def _remove_stale_staging(folder: Path) -> None:
        for entry in folder.iterdir():
            if entry.name.startswith(_STAGING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps({**data, "registered_unix_s": data.get("registered_unix_s", time.time())}, indent=1))
