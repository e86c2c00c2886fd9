"""FastAPI dependencies shared by the routes."""

from __future__ import annotations

from fastapi import Request

from services.gateway.state import GatewayState


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway
