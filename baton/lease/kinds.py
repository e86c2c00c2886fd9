"""Lease kinds, shared by the scheduler and its clients. Values equal ``baton.v1.LeaseKind``."""

from __future__ import annotations

import enum


class LeaseKind(enum.IntEnum):
    SERVING = 1
    TRAINING = 2
    EMBEDDING_BULK = 3

    @property
    def label(self) -> str:
        return self.name.lower()
