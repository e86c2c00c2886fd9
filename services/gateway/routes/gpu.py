"""GET /v1/gpu: who holds the GPU lease, who waits, their ETAs, and what a chat would do now (the busy policy);
GET /v1/gpu/history: who held it over the last hour (the web page's GPU timeline)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from services.gateway.gpu import chat_eta, holder_json, waiter_json
from services.gateway.routes.deps import gateway_state
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_tenant

router = APIRouter(tags=["gpu"])


@router.get("/v1/gpu", summary="The GPU lease: holder, queue, ETAs, and the chat policy when training holds it")
async def gpu(
    tenant: Annotated[str, Depends(current_tenant)], state: Annotated[GatewayState, Depends(gateway_state)]
) -> dict[str, Any]:
    view = state.gpu
    lease, holders = await view.state()
    eta_s, _ = chat_eta(holders)
    return {
        "capacity_bytes": lease.capacity_bytes,
        "capacity_source": lease.capacity_source,
        "used_bytes": lease.used_bytes,
        "epoch": lease.epoch,
        "holders": [holder_json(h, tenant) for h in holders],
        "queue": [waiter_json(w) for w in lease.waiters],
        "policy": {
            "gpu_policy": view.policy,
            "queue_max_wait_s": view.queue_max_wait_s,
            # What a chat arriving now meets: preempt → it takes the GPU; queue → it waits about chat_eta_s.
            "chat_eta_s": 0.0 if view.policy == "preempt" else round(eta_s, 3),
        },
    }


@router.get("/v1/gpu/history", summary="Who held the GPU lately (the GPU timeline): every lease in the window")
async def gpu_history(
    tenant: Annotated[str, Depends(current_tenant)],
    state: Annotated[GatewayState, Depends(gateway_state)],
    window_s: Annotated[float, Query(ge=1, le=86400, description="How far back, in seconds (at most a day).")] = 3600,
) -> dict[str, Any]:
    return await state.gpu.history(tenant, window_s)
