"""The gateway's FastAPI app: the only public port. Routes are thin; the work is in the state's cores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import make_asgi_app

from baton import __version__
from baton.runtime.http import install_error_handlers
from services.gateway.routes import (
    adapters,
    chat,
    documents,
    embeddings,
    errors,
    gpu,
    models,
    plan,
    search,
    training,
    users,
    web,
)
from services.gateway.settings import GatewaySettings
from services.gateway.state import GatewayState

DESCRIPTION = """\
baton's public API: your documents become searchable memory (hybrid BM25 + vectors, Russian included), with
citations. Errors are JSON: `{"error", "error_type", "reason"}` with 4xx for bad input (422 validation, 400 empty,
413 too large, 404 unknown) and 503 when a backend is not ready.

The OpenAI-compatible routes (`/v1/chat/completions`, `/v1/models`, `/v1/embeddings`) answer errors in OpenAI's
shape instead, `{"error": {"message", "type", "param", "code"}}`. Chat answers from your memory and numbers its
sources: the answer cites `[n]`, and `baton.citations` (on the response, or on the last stream chunk) says which
document, heading, page and chunk each `[n]` is; send `"baton": {"rag": false}` to chat without memory.

Every /v1 route needs an API key, `Authorization: Bearer bt_…` (what OpenAI clients send as their api_key); the key
is bound to a tenant, and everything you store and search belongs to that tenant (another tenant's document or job
is a 404). No key or a bad or revoked one: 401. The admin key manages users and keys (`/v1/users`, `baton users`)
and nothing else; `baton up` writes it to BATON_HOME/admin.key, and a key for the user `me` to BATON_HOME/api.key.
"""


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = await GatewayState.open(settings)
        yield
        await app.state.gateway.close()

    app = FastAPI(title="baton gateway", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    for module in (documents, search, embeddings, users, training, adapters, gpu, plan):
        app.include_router(module.router, responses=errors.ERROR_RESPONSES)
    for module in (chat, models):  # OpenAI's error shape, documented per route
        app.include_router(module.router)
    app.mount("/metrics", make_asgi_app())
    web.install(app)  # the web page at /, its assets under /web

    @app.get("/health", tags=["health"], summary="Ready when the catalog, the store and the embedder answer")
    async def health() -> dict[str, Any]:
        state: GatewayState = app.state.gateway
        return {"status": "ok", "store": state.store.health(), "embedder": state.embedder_model}

    return app
