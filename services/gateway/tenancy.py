"""Which tenant a request acts for: the one its API key (``Authorization: Bearer <key>``) is bound to.

Everything stored and searched is scoped by that tenant, and a route never takes a tenant from the request itself,
so another tenant's document or job is simply not found (404, the same answer as for one that never existed).
The admin key manages users and keys only; data routes refuse it (403), as admin routes refuse user keys.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from baton.runtime.errors import PermissionDenied
from services.gateway.auth import NAME_PATTERN, Principal, bearer_key

TENANT_PATTERN = NAME_PATTERN

# Declared so that OpenAPI (and /docs' "Authorize" button, and schemathesis) know every data route needs a key;
# the header is parsed below, where a missing or malformed one gets a message saying what to send.
bearer_scheme = HTTPBearer(
    scheme_name="apiKey",
    description="An API key: `Authorization: Bearer bt_…`. The admin creates them (baton users create NAME); "
    "`baton up` writes one for the user `me` to BATON_HOME/api.key.",
    auto_error=False,
)


def current_principal(
    request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]
) -> Principal:
    key = bearer_key(request.headers.get("authorization"), legacy_tenant_header="x-baton-tenant" in request.headers)
    return request.app.state.gateway.auth.authenticate(key)


def current_tenant(principal: Annotated[Principal, Depends(current_principal)]) -> str:
    if principal.admin or principal.tenant is None:
        raise PermissionDenied(
            "the admin key manages users and keys only; call this with a user's key (baton users keys NAME)",
            reason="ADMIN_KEY_NOT_A_USER",
        )
    return principal.tenant


def require_admin(request: Request, principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not principal.admin:
        configured = request.app.state.gateway.auth.has_admin
        hint = (
            "send the admin key (BATON_GATEWAY_ADMIN_KEY, or BATON_HOME/admin.key on a stack started by baton up)"
            if configured
            else "this gateway has no admin key: set BATON_GATEWAY_ADMIN_KEY or write one to BATON_HOME/admin.key "
            "and restart it"
        )
        raise PermissionDenied(f"managing users and keys needs the admin key; {hint}", reason="ADMIN_ONLY")
    return principal
