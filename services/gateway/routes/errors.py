"""For the OpenAPI document: the error statuses baton's own routes answer, in baton's error shape
(``baton.runtime.http``). The OpenAI-compatible routes document theirs in ``openai_errors``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class BatonErrorBody(BaseModel):
    """``{"error", "error_type", "reason"}``; some errors add fields (``retry_after_s``, details)."""

    model_config = ConfigDict(extra="allow")

    error: str
    error_type: str
    reason: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "model": BatonErrorBody}
    for status, description in (
        (400, "Empty input (no files, an empty query or text)"),
        (401, "No or unknown API key"),
        (403, "The wrong kind of key (the admin key manages users and keys only; a user's key cannot)"),
        (404, "Not found, or another tenant's"),
        (409, "Conflict (exists already, or in a state that forbids this)"),
        (413, "Too large"),
        (422, "Invalid request"),
        (503, "A backend is not ready (Retry-After)"),
    )
}
