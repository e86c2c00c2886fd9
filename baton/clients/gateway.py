"""A small, typed HTTP client of the gateway: what the ``baton`` command line is made of.

Errors come back as the same domain errors the gateway raised (matched on ``reason`` and status, never on text).
The API key: the one given, else ``BATON_API_KEY``, else the key ``baton up`` wrote for the user ``me``
(``BATON_HOME/api.key``). Key files are written 0600, like ssh keys.
"""

from __future__ import annotations

import json
import os
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


API_KEY_FILE = "api.key"
ADMIN_KEY_FILE = "admin.key"


def baton_home() -> Path:
    return Path(os.environ.get("BATON_HOME", "var"))


def read_secret(path: Path) -> str | None:
    """A key file's content, or None when there is no such file."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def write_secret(path: Path, secret: str) -> None:
    """Write a key file readable by its owner only (0600 from the first byte), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (secret + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)


def default_api_key() -> str | None:
    """BATON_API_KEY, else the key `baton up` wrote for the default user (BATON_HOME/api.key)."""
    return os.environ.get("BATON_API_KEY", "").strip() or read_secret(baton_home() / API_KEY_FILE)


def default_admin_key() -> str | None:
    """BATON_GATEWAY_ADMIN_KEY (the gateway's own setting), else BATON_HOME/admin.key (written by `baton up`)."""
    return os.environ.get("BATON_GATEWAY_ADMIN_KEY", "").strip() or read_secret(baton_home() / ADMIN_KEY_FILE)


class GatewayClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.api_key = api_key if api_key is not None else default_api_key()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
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

    def me(self) -> dict[str, Any]:
        """Who this client's key is: {admin, user, tenant, key_id}."""
        return self._call("GET", "/v1/me")

    # ---------------------------------------------------------------------------------------------- users (admin key)

    def create_user(self, name: str, *, tenant: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/v1/users", json={"name": name, "tenant": tenant})

    def users(self, *, limit: int = 1000, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", "/v1/users", params={"limit": limit, "offset": offset})

    def user(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/users/{name}")

    def delete_user(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/users/{name}")

    def create_key(self, user: str, *, label: str = "") -> dict[str, Any]:
        """A new key for ``user``; its secret is in ``["key"]``, and only in this answer."""
        return self._call("POST", f"/v1/users/{user}/keys", json={"label": label})

    def keys(self, user: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/users/{user}/keys")

    def revoke_key(self, user: str, key_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/users/{user}/keys/{key_id}")

    def ensure_user_key(self, name: str, *, tenant: str | None = None, label: str = "") -> dict[str, Any]:
        """A new key for user ``name`` (``["key"]`` is the secret, ``["id"]`` its id), creating the user (bound to
        ``tenant``) if it does not exist yet."""
        try:
            self.create_user(name, tenant=tenant)
        except errors.AlreadyExists:
            bound = self.user(name)["tenant"]
            if tenant is not None and bound != tenant:
                raise errors.FailedPrecondition(
                    f"user {name!r} exists, bound to tenant {bound!r} rather than {tenant!r}", reason="TENANT_MISMATCH"
                ) from None
        return self.create_key(name, label=label)

    # ---------------------------------------------------------------------------------------------- training, GPU

    def submit_training(
        self, name: str, *, collections: Sequence[str] = (), jsonl: Path | None = None, **options: Any
    ) -> dict[str, Any]:
        """A training job on this tenant's documents (``collections``; empty: all), or on a local JSONL file
        (uploaded). ``options``: any field of the gateway's TrainingJobBody (rank, max_steps, seq_len, ...)."""
        fields = {"name": name, **{k: v for k, v in options.items() if v is not None}}
        if jsonl is None:
            return self._call("POST", "/v1/training/jobs", json={**fields, "collections": list(collections)})
        data = {k: [str(x) for x in v] if isinstance(v, list | tuple) else _form_value(v) for k, v in fields.items()}
        files = {"file": (jsonl.name, jsonl.read_bytes(), "application/x-ndjson")}
        return self._call("POST", "/v1/training/jobs", data=data, files=files)

    def training_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/training/jobs/{job_id}")

    def training_jobs(self, *, states: Sequence[str] = (), page_size: int = 50) -> dict[str, Any]:
        return self._call("GET", "/v1/training/jobs", params={"states": list(states), "page_size": page_size})

    def cancel_training(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/training/jobs/{job_id}")

    def watch_training(self, job_id: str, *, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events (SSE) until it ends: a ``snapshot`` first, then ``state_changed``, ``step``, ``eval``,
        ``checkpoint_saved``, ``log``. Each event is the JSON the gateway sent, with ``type`` and ``state``."""
        headers = {"Last-Event-ID": str(after_seq)} if after_seq else {}
        try:
            with self._http.stream(
                "GET", f"/v1/training/jobs/{job_id}/events", headers=headers, timeout=None
            ) as response:
                if not response.is_success:
                    response.read()
                    raise error_from_response(response)
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[len("data: ") :])
                        if "error" in event and "type" not in event:
                            raise _stream_error(event)
                        yield event
        except httpx.TransportError as error:
            raise errors.Unavailable(
                f"lost the gateway at {self.base_url} while following {job_id} ({error})"
            ) from error

    def wait_training(self, job_id: str, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the job to its end (calling ``on_event`` for each event); returns the finished job."""
        for event in self.watch_training(job_id):
            if on_event is not None:
                on_event(event)
        return self.training_job(job_id)

    def adapters(self) -> dict[str, Any]:
        return self._call("GET", "/v1/adapters")

    def gpu(self) -> dict[str, Any]:
        return self._call("GET", "/v1/gpu")

    # ---------------------------------------------------------------------------------------------- chat

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the base model and every adapter this tenant may chat with."""
        return self._call("GET", "/v1/models")

    def chat(
        self, messages: Sequence[dict[str, str]], *, model: str | None = None, baton: dict[str, Any] | None = None,
        **sampling: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """POST /v1/chat/completions, not streamed. ``baton``: the extensions (rag, collection, k); ``sampling``:
        OpenAI fields such as temperature, max_tokens, seed. The answer's citations are in ``["baton"]``."""
        body = {"messages": list(messages), "model": model, "baton": baton, **sampling}
        return self._call("POST", "/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})

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
    if isinstance(body.get("error"), dict):  # OpenAI's shape (chat, models): {"error": {"message", "code", ...}}
        nested = body["error"]
        body = {"error": nested.get("message", ""), "reason": str(nested.get("code") or "").upper() or None,
                "details": nested.get("details") or body.get("details")}  # fmt: skip
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


def _form_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _stream_error(event: dict[str, Any]) -> errors.BatonError:
    """An ``event: error`` of a stream (baton's error shape) as the domain error."""
    cls = errors.Internal
    for candidate in _subclasses(errors.BatonError):
        if candidate.default_reason == event.get("reason"):
            cls = candidate
    return cls(str(event.get("error", "")), reason=event.get("reason"), metadata=event.get("details"))


def _subclasses(cls: type[errors.BatonError]) -> Iterator[type[errors.BatonError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)
