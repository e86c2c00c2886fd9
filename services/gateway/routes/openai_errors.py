"""OpenAI's error shape for the OpenAI-compatible routes: ``{"error": {"message", "type", "param", "code"}}``.

Routers built with ``OpenAIRoute`` answer their failures this way — domain errors (with their HTTP status and
``Retry-After``), request validation, and anything unexpected — so that OpenAI clients raise their own error
classes with a readable message. ``code`` is baton's reason in lower case (``model_not_found``,
``context_length_exceeded``, as OpenAI names them); the rest of the API keeps baton's ``{"error", "error_type",
"reason"}`` shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from baton.runtime.errors import BatonError, EmptyInput, Internal, InvalidArgument, Unauthenticated
from services.gateway.chat.protocol import ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    424: "upstream_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# For the OpenAPI document: the statuses these routes answer with an error body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "model": ErrorResponse}
    for status, description in (
        (400, "Empty input"),
        (401, "No or unknown API key"),
        (403, "The admin key: chat and models need a user's key"),
        (404, "Unknown model, or not found"),
        (422, "Invalid request (validation, prompt over the context length)"),
        (429, "Overloaded: the inference queue is full"),
        (503, "A backend is not ready, or the GPU is busy past the wait limit (Retry-After)"),
    )
}


def error_body(error: BatonError, *, param: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message": error.message,
        "type": _TYPES.get(error.http_status, "server_error"),
        "param": param,
        "code": error.reason.lower(),
    }
    if error.metadata:
        body["details"] = dict(error.metadata)
    if error.retry_after_s is not None:
        body["retry_after_s"] = round(error.retry_after_s, 3)
    return {"error": body}


def openai_error_response(error: BatonError, *, param: str | None = None) -> JSONResponse:
    headers = {}
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="baton"'
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return JSONResponse(status_code=error.http_status, content=error_body(error, param=param), headers=headers)


def validation_error(error: RequestValidationError, request: Request) -> tuple[BatonError, str | None]:
    """The domain error for a failed request validation, and the first offending field (OpenAI's ``param``)."""
    problems = [(".".join(str(p) for p in e.get("loc", ()) if p != "body"), e) for e in error.errors()]
    described = "; ".join(f"{where or 'body'}: {problem.get('msg', 'invalid')}" for where, problem in problems)
    body_missing = any(problem.get("type") == "missing" and not where for where, problem in problems)
    if request.headers.get("content-length") == "0" or body_missing:
        return EmptyInput(f"the request body is empty: {described}", reason="EMPTY_INPUT"), None
    return InvalidArgument(f"invalid request: {described}", reason="INVALID_REQUEST"), problems[0][0] or None


def http_error(error: HTTPException) -> BatonError:
    """The domain error for an HTTPException FastAPI raised before the handler ran; in a POST route that is the
    body failing to parse (FastAPI's 400), which is invalid input like any other: 422."""
    return InvalidArgument(
        f"the request body could not be read ({error.detail}); send JSON encoded as UTF-8", reason="INVALID_JSON"
    )


class OpenAIRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except BatonError as error:
                return openai_error_response(error)
            except RequestValidationError as error:
                domain, param = validation_error(error, request)
                return openai_error_response(domain, param=param)
            except HTTPException as error:
                # FastAPI raises these itself, before the handler runs: a body that is not JSON (bad UTF-8, say).
                return openai_error_response(http_error(error))
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return openai_error_response(Internal("internal error; see the gateway's log"))

        return handle
