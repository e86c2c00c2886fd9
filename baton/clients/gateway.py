"""A small, typed HTTP client of the gateway: what the ``baton`` command line is made of.

Errors come back as the same domain errors the gateway raised (matched on ``reason`` and status, never on text).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from baton.runtime import errors

_BY_STATUS: dict[int, type[errors.BatonError]] = {
    400: errors.EmptyInput,
    401: errors.Unauthenticated,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    409: errors.AlreadyExists,
    413: errors.PayloadTooLarge,
    422: errors.InvalidArgument,
    424: errors.UpstreamFailed,
    429: errors.ResourceExhausted,
    503: errors.Unavailable,
}


class GatewayClient:
    def __init__(self, base_url: str, *, tenant: str | None = None, timeout_s: float = 600.0) -> None:
        headers = {"X-Baton-Tenant": tenant} if tenant else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---------------------------------------------------------------------------------------------- documents

    def upload(self, paths: Sequence[Path], *, collection: str = "default") -> dict[str, Any]:
        files = [("files", (path.name, path.read_bytes())) for path in paths]
        return self._call("POST", "/v1/documents", files=files, data={"collection": collection})

    def upload_texts(self, named_texts: Sequence[tuple[str, str]], *, collection: str = "default") -> dict[str, Any]:
        files = [("files", (name, text.encode())) for name, text in named_texts]
        return self._call("POST", "/v1/documents", files=files, data={"collection": collection})

    def start_folder_ingest(self, folder: Path, *, collection: str = "default") -> dict[str, Any]:
        return self._call("POST", "/v1/documents", json={"path": str(folder), "collection": collection})

    def ingest_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/ingest/jobs/{job_id}")

    def follow_job(
        self, job_id: str, on_progress: Callable[[dict[str, Any]], None], *, poll_s: float = 0.5
    ) -> dict[str, Any]:
        while True:
            job = self.ingest_job(job_id)
            on_progress(job)
            if job["state"] != "running":
                return job
            time.sleep(poll_s)

    def documents(self, *, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", "/v1/documents", params={"limit": limit, "offset": offset})

    def delete_document(self, document_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/documents/{document_id}")

    # ---------------------------------------------------------------------------------------------- search

    def search(
        self, query: str, *, k: int = 10, mode: str = "hybrid", collection: str | None = None,
        filters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        body = {"query": query, "k": k, "mode": mode, "collection": collection, "filters": filters or {}}
        return self._call("POST", "/v1/search", json=body)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise errors.Unavailable(
                f"cannot reach the gateway at {self.base_url} ({error}); is it running? (baton up)"
            ) from error
        if response.is_success:
            return response.json()
        raise error_from_response(response)


def error_from_response(response: httpx.Response) -> errors.BatonError:
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text or response.reason_phrase}
    cls = _BY_STATUS.get(response.status_code, errors.Internal)
    reason = body.get("reason")
    for candidate in _subclasses(cls):
        if reason and candidate.default_reason == reason:
            cls = candidate
    retry = response.headers.get("Retry-After")
    return cls(
        str(body.get("error", response.reason_phrase)),
        reason=reason,
        metadata={k: str(v) for k, v in (body.get("details") or {}).items()},
        retry_after_s=float(retry) if retry else None,
    )


def _subclasses(cls: type[errors.BatonError]) -> Iterator[type[errors.BatonError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)
