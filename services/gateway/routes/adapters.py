"""GET /v1/adapters: the caller's tenant's trained adapters (every registered version), and whether each is served."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from services.gateway.routes.deps import gateway_state
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant

router = APIRouter(tags=["training"])


@router.get("/v1/adapters", summary="Your adapters: name, version, eval losses, served now or not")
async def list_adapters(
    tenant: Annotated[str, Depends(current_tenant)], state: Annotated[GatewayState, Depends(gateway_state)]
) -> dict[str, Any]:
    return {"adapters": await state.training.adapters(tenant)}
