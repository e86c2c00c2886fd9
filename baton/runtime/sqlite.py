"""SQLite the way every baton store uses it: WAL, a chosen durability, a schema version, one writer at a time.

WAL lets readers run beside the single writer; ``synchronous=NORMAL`` survives a crash of the process (what kill -9
tests), ``FULL`` also a power loss. ``user_version`` records the schema, so an older baton refuses a newer file
instead of misreading it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

Durability = Literal["FULL", "NORMAL"]


def open_database(
    path: Path, schema: str, version: int | None, *, durability: Durability = "NORMAL"
) -> sqlite3.Connection:
    """Open (or create) ``path`` in autocommit mode with ``schema`` applied; transactions are explicit.

    ``version`` None: the file's schema version belongs to another owner (tables added beside its own).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={durability}")
    db.execute("PRAGMA busy_timeout=5000")
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if version is not None and found > version:
        db.close()
        raise RuntimeError(f"{path} was written by a newer baton (schema {found} > {version}); upgrade baton")
    db.executescript(schema)
    if version is not None:
        db.execute(f"PRAGMA user_version={version}")
    return db


@contextmanager
def transaction(db: sqlite3.Connection, lock: threading.RLock | None = None) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error; under ``lock`` when threads share ``db``."""
    with lock if lock is not None else _NO_LOCK:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
