"""HTTP side of the error taxonomy, for every FastAPI app (gateway, the embedder's TEI API), and the few response
helpers both apps share (fast JSON, OpenAI's embedding encodings).

Domain errors become ``{"error", "error_type", "reason", ...}`` with their HTTP status (TEI's split) and a
``Retry-After`` header when the error carries a hint; request validation failures become 422 in the same shape;
anything unexpected is logged and answered 500 without leaking internals.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton.runtime.errors import BatonError, EmptyInput, Internal, InvalidArgument, NotFound, Unauthenticated

log = logging.getLogger(__name__)

EmbeddingEncoding = Literal["float", "base64"]


def error_response(error: BatonError) -> JSONResponse:
    headers = {}
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="baton"'  # RFC 9110: a 401 names the scheme it wants
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return JSONResponse(status_code=error.http_status, content=error.to_json(), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BatonError)
    async def domain_error(request: Request, error: BatonError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(_describe(e) for e in error.errors())
        if request.headers.get("content-length") == "0" or ("body" in problems and "missing" in problems):
            return error_response(EmptyInput(f"the request body is empty or incomplete: {problems}"))
        return error_response(InvalidArgument(f"invalid request: {problems}", reason="INVALID_REQUEST"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}; see /docs"))
        body = {"error": str(error.detail), "error_type": "http", "reason": f"HTTP_{error.status_code}"}
        return JSONResponse(status_code=error.status_code, content=body)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(Internal("internal error; see the service log"))


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    return f"{where or 'body'}: {error.get('msg', 'invalid')}"


def fast_json_response(content: object) -> Response:
    """A compact JSON response. json.dumps directly: FastAPI's generic encoder is several times slower on the
    thousands of floats of an embeddings answer."""
    return Response(json.dumps(content, separators=(",", ":")), media_type="application/json")


def encode_embedding(vector: np.ndarray, encoding_format: EmbeddingEncoding) -> list[float] | str:
    """One vector in OpenAI's encodings: a list of numbers, or base64 of little-endian float32 bytes (what
    openai-python asks for unless told otherwise: a quarter of the bytes on the wire)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
