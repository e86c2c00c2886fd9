"""Users and API keys, managed with the admin key; ``GET /v1/me`` tells any key who it is.

A user is bound to one tenant (by default its own, named like the user); its keys act for that tenant. A key's
secret is in the answer that issues it and nowhere else: the gateway keeps only its hash.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from services.gateway.auth import NAME_PATTERN, Principal
from services.gateway.routes.deps import gateway_state
from services.gateway.state import GatewayState
from services.gateway.tenancy import current_principal, require_admin

router = APIRouter(tags=["users"])

State = Annotated[GatewayState, Depends(gateway_state)]
Admin = Annotated[Principal, Depends(require_admin)]


class NewUser(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="1-64 letters, digits, '_' or '-'.")
    tenant: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="The tenant its keys act for [the user's name]. Users given the same tenant share its documents.",
    )


class NewKey(BaseModel):
    label: str = Field("", max_length=100, description="What the key is for (shown in lists), e.g. 'laptop'.")


@router.post(
    "/v1/users",
    status_code=201,
    summary="Admin: create a user bound to a tenant (default: its own, named like it); then issue it a key",
)
async def create_user(body: NewUser, _: Admin, state: State) -> dict[str, Any]:
    return state.auth.create_user(body.name, body.tenant).to_json()


@router.get("/v1/users", summary="Admin: list users with their tenants and number of active keys")
async def list_users(
    _: Admin, state: State, limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: Annotated[int, Query(ge=0)] = 0
) -> dict[str, Any]:
    users, total = state.auth.list_users(limit=limit, offset=offset)
    return {"total": total, "users": [user.to_json() for user in users]}


@router.get("/v1/users/{name}", summary="Admin: one user and its keys (prefixes only; secrets are never stored)")
async def get_user(name: str, _: Admin, state: State) -> dict[str, Any]:
    user = state.auth.get_user(name).to_json()
    return user | {"keys": [key.to_json() for key in state.auth.list_keys(name)]}


@router.delete(
    "/v1/users/{name}",
    summary="Admin: delete a user; its keys stop working at once (its tenant's documents stay)",
)
async def delete_user(name: str, _: Admin, state: State) -> dict[str, Any]:
    return {"name": name, "deleted": True, "keys_deleted": state.auth.delete_user(name)}


@router.post(
    "/v1/users/{name}/keys",
    status_code=201,
    summary="Admin: issue a key for a user; the secret (`key`) is in this answer only — store it now",
)
async def issue_key(
    name: str, _: Admin, state: State, response: Response, body: NewKey | None = None
) -> dict[str, Any]:
    response.headers["Cache-Control"] = "no-store"  # the one answer that carries a secret
    record, secret = state.auth.issue_key(name, (body or NewKey()).label)
    tenant = state.auth.get_user(name).tenant
    return record.to_json() | {"key": secret, "tenant": tenant}


@router.get("/v1/users/{name}/keys", summary="Admin: a user's keys, active and revoked (prefixes only)")
async def list_keys(name: str, _: Admin, state: State) -> dict[str, Any]:
    return {"user": name, "keys": [key.to_json() for key in state.auth.list_keys(name)]}


@router.delete(
    "/v1/users/{name}/keys/{key_id}", summary="Admin: revoke a key; the next request with it gets 401 (idempotent)"
)
async def revoke_key(name: str, key_id: str, _: Admin, state: State) -> dict[str, Any]:
    return state.auth.revoke_key(name, key_id).to_json()


@router.get("/v1/me", summary="Who this key is: its user and tenant (or the admin)")
async def me(response: Response, principal: Annotated[Principal, Depends(current_principal)]) -> dict[str, Any]:
    response.headers["Cache-Control"] = "no-store"
    return principal.to_json()
