"""Where a job's training data comes from, checked by the service before any training process starts.

- A JSONL file must lie inside the configured allowed roots (symlinks resolved first) and hold at least one
  non-blank line (its lines are checked, with their numbers, when the dataset is built in PREPARING).
- Ingested documents are read from the gateway's catalog (read-only): the tenant's documents of the chosen
  collections, duplicates dropped (the same text twice would let one document sit in both the training and the eval
  split), each with its cleaned text at ``texts_dir/<content_hash>.txt``.

Reading, tokenizing, packing and splitting are services/trainer/dataset.py's (run by services/trainer/prepare.py in
PREPARING, and again by the training process, which must not depend on the service's copy).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from baton.runtime.errors import InvalidArgument
from services.trainer.model import DocumentRef

_MAX_IDS_IN_METADATA = 200


def check_jsonl_path(path_text: str, allowed_roots: list[Path]) -> Path:
    """The resolved dataset file, or INVALID_ARGUMENT (DATASET_PATH_INVALID / EMPTY_DATASET)."""
    if not path_text:
        message = "dataset.jsonl.path is empty; give the path of a JSONL file"
        raise InvalidArgument(message, reason="DATASET_PATH_INVALID")
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        raise InvalidArgument(
            f"dataset path {path_text!r} is relative; give an absolute path inside "
            f"{', '.join(str(r) for r in allowed_roots)}",
            reason="DATASET_PATH_INVALID",
        )
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in allowed_roots):
        raise InvalidArgument(
            f"dataset path {path_text!r} is outside the folders the trainer may read "
            f"({', '.join(str(r) for r in allowed_roots)}); move the file there or add its folder to "
            "BATON_TRAINER_ALLOWED_ROOTS",
            reason="DATASET_PATH_INVALID",
            metadata={"allowed_roots": ",".join(str(r) for r in allowed_roots)},
        )
    if not resolved.is_file():
        raise InvalidArgument(f"dataset file {path_text!r} does not exist", reason="DATASET_PATH_INVALID")
    if not _has_content(resolved):
        raise InvalidArgument(
            f'dataset file {path_text!r} is empty: add JSONL lines such as {{"text": "..."}}',
            reason="EMPTY_DATASET",
        )
    return resolved


def _has_content(path: Path) -> bool:
    with path.open("rb") as handle:
        return any(line.strip() for line in handle)


def resolve_documents(
    catalog_path: Path, texts_dir: Path, tenant: str, collections: list[str], document_ids: list[str]
) -> list[DocumentRef]:
    """The tenant's documents to train on, duplicates dropped, each with its cleaned text on disk."""
    rows = _catalog_rows(catalog_path, tenant, collections, document_ids)
    if document_ids:
        unknown = sorted(set(document_ids) - {row[0] for row in rows})
        if unknown:
            raise InvalidArgument(
                f"unknown document ids for tenant {tenant!r}: {', '.join(unknown[:10])}",
                reason="UNKNOWN_DOCUMENTS",
                metadata={"document_ids": ",".join(unknown[:_MAX_IDS_IN_METADATA])},
            )
    seen: set[str] = set()
    documents: list[DocumentRef] = []
    for document_id, content_hash, source in rows:
        if content_hash not in seen:
            seen.add(content_hash)
            documents.append(DocumentRef(document_id, content_hash, source))
    if not documents:
        where = f"collections {', '.join(collections)}" if collections else "any collection"
        raise InvalidArgument(
            f"tenant {tenant!r} has no ingested documents in {where}; ingest some first (baton ingest DIR)",
            reason="EMPTY_DATASET",
        )
    missing = [d.document_id for d in documents if not document_text_path(texts_dir, d).is_file()]
    if missing:
        raise InvalidArgument(
            f"{len(missing)} document(s) have no cleaned text in {texts_dir} (ingested before the gateway kept "
            f"texts?): {', '.join(missing[:10])}; ingest them again",
            reason="DOCUMENT_TEXT_MISSING",
            metadata={"document_ids": ",".join(missing[:_MAX_IDS_IN_METADATA])},
        )
    return documents


def document_text_path(texts_dir: Path, document: DocumentRef) -> Path:
    return texts_dir / f"{document.content_hash}.txt"


def _catalog_rows(
    catalog_path: Path, tenant: str, collections: list[str], document_ids: list[str]
) -> list[tuple[str, str, str]]:
    if not catalog_path.is_file():
        raise InvalidArgument(
            f"no catalog at {catalog_path}: nothing has been ingested yet (baton ingest DIR)", reason="EMPTY_DATASET"
        )
    # Duplicates are kept here (a document id the caller named must not look unknown) and dropped by content hash.
    query = "SELECT document_id, content_hash, source FROM documents WHERE tenant = ?"
    params: list[str] = [tenant]
    if collections:
        query += f" AND collection IN ({','.join('?' * len(collections))})"
        params += collections
    if document_ids:
        query += f" AND document_id IN ({','.join('?' * len(document_ids))})"
        params += document_ids
    # Read-only, so a trainer can never damage the gateway's catalog.
    db = sqlite3.connect(f"file:{catalog_path}?mode=ro", uri=True)
    try:
        return [
            (str(a), str(b), str(c or "")) for a, b, c in db.execute(query + " ORDER BY document_id", params).fetchall()
        ]
    finally:
        db.close()
