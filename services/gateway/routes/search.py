"""Search memory: hybrid (default), vector or BM25, with filters; hits carry their citation fields."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from baton.store.base import SearchMode
from services.gateway.retrieval import SearchRequest, citation
from services.gateway.routes.deps import gateway_state
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant

router = APIRouter(tags=["search"])


class SearchBody(BaseModel):
    query: str = Field(description="What to look for, in any language.")
    k: int = Field(10, description="How many hits (1..max_search_k).")
    mode: SearchMode = Field(SearchMode.HYBRID, description="hybrid (default), vector or bm25.")
    collection: str | None = Field(None, description="Only this collection.")
    filters: dict[str, str | int | float | bool | list[str | int | float | bool]] = Field(
        default_factory=dict, description="Equality (or any-of, with a list) on chunk metadata, e.g. document_id."
    )


@router.post("/v1/search", summary="Search the tenant's memory")
async def search(
    body: SearchBody,
    tenant: Annotated[str, Depends(current_tenant)],
    state: Annotated[GatewayState, Depends(gateway_state)],
) -> dict[str, Any]:
    filters = dict(body.filters)
    if body.collection:
        filters["collection"] = body.collection
    hits = await state.retriever.search(SearchRequest(tenant, body.query, body.k, body.mode, filters))
    return {"query": body.query, "mode": body.mode.value, "hits": [citation(i, h) for i, h in enumerate(hits, 1)]}
