"""POST /v1/embeddings: OpenAI's shape, answered by the embedder service."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from baton.runtime.errors import EmptyInput
from services.gateway.routes.deps import gateway_state
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant

router = APIRouter(tags=["openai"])


class EmbeddingsBody(BaseModel):
    input: str | list[str] = Field(description="A text or a list of texts.")
    model: str | None = Field(None, description="Ignored: the embedder serves one model (see /v1/models later).")


# Not tenant data, but compute: any user's key may embed; no key may not.
@router.post("/v1/embeddings", summary="Embed texts (OpenAI-compatible)", dependencies=[Depends(current_tenant)])
async def embeddings(body: EmbeddingsBody, state: Annotated[GatewayState, Depends(gateway_state)]) -> dict[str, Any]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(not text for text in texts):
        raise EmptyInput("input is empty; send a non-empty text or list of texts", reason="EMPTY_INPUT")
    vectors = await state.embedder.embed(texts)
    counts = await state.embedder.count_tokens(texts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
        "model": state.embedder_model,
        "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)},
    }
