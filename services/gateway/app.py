"""The gateway's FastAPI app: the only public port. Routes are thin; the work is in the state's cores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import make_asgi_app

from baton import __version__
from baton.runtime.http import install_error_handlers
from services.gateway.routes import documents, embeddings, search
from services.gateway.settings import GatewaySettings
from services.gateway.state import GatewayState

DESCRIPTION = """\
baton's public API: your documents become searchable memory (hybrid BM25 + vectors, Russian included), with
citations. Errors are JSON: `{"error", "error_type", "reason"}` with 4xx for bad input (422 validation, 400 empty,
413 too large, 404 unknown) and 503 when a backend is not ready.

Tenancy (provisional): the `X-Baton-Tenant` header names the tenant (default `default`).
"""


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = await GatewayState.open(settings)
        yield
        await app.state.gateway.close()

    app = FastAPI(title="baton gateway", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    for module in (documents, search, embeddings):
        app.include_router(module.router)
    app.mount("/metrics", make_asgi_app())

    @app.get("/health", tags=["health"], summary="Ready when the catalog, the store and the embedder answer")
    async def health() -> dict[str, Any]:
        state: GatewayState = app.state.gateway
        return {"status": "ok", "store": state.store.health(), "embedder": state.embedder_model}

    return app
