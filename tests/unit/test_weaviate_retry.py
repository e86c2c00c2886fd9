"""baton.store.weaviate_client shortens weaviate-client's hard-coded gRPC retries (1+2+4+8+16+32 s per call against a
dead server) by replacing a private class of the pinned client. If a client upgrade renames or reshapes it, this fails
first, before a dead server makes every ingest wait a minute per document again."""

from __future__ import annotations

import inspect

import grpc
import pytest
import weaviate.connect.v4 as connection

from baton.store import weaviate_client as store


class _Refused(grpc.RpcError, grpc.Call):
    def code(self) -> grpc.StatusCode:  # type: ignore[override]
        return grpc.StatusCode.UNAVAILABLE


def test_the_client_uses_the_short_retry() -> None:
    assert connection._Retry is store._ShortRetry
    base = inspect.signature(store._ShortRetry.__mro__[1].with_exponential_backoff)
    assert list(base.parameters)[:4] == ["self", "count", "error", "f"]


def test_a_refused_call_is_retried_briefly_then_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(store.time, "sleep", pauses.append)
    calls = 0

    def refused() -> None:
        nonlocal calls
        calls += 1
        raise _Refused()

    with pytest.raises(grpc.RpcError):
        store._ShortRetry(4).with_exponential_backoff(0, "search", refused)
    assert calls == len(store._RETRY_PAUSES_S) + 1 and sum(pauses) < 5


def test_other_errors_are_not_retried() -> None:
    calls = 0

    class _Invalid(_Refused):
        def code(self) -> grpc.StatusCode:  # type: ignore[override]
            return grpc.StatusCode.INVALID_ARGUMENT

    def invalid() -> None:
        nonlocal calls
        calls += 1
        raise _Invalid()

    with pytest.raises(grpc.RpcError):
        store._ShortRetry(4).with_exponential_backoff(0, "search", invalid)
    assert calls == 1
