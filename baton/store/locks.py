"""The embedded store's two locks: one process per store directory, and many readers or one writer within it."""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from baton.runtime.errors import FailedPrecondition


def acquire_directory_lock(path: Path) -> TextIO:
    """``flock`` on ``path`` (the kernel drops it when the process dies, even by kill -9); the open file holds it."""
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FailedPrecondition(
            f"another process has the vector store at {path.parent} open; stop it or use another store path",
            reason="STORE_LOCKED",
        ) from None
    return handle


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers, so writes are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
