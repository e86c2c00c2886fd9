"""Which tenant a request acts for.

Provisional until API keys arrive (issue 6): the tenant is named by the ``X-Baton-Tenant`` header (default
``default``). Everything stored and searched is scoped by it, so the switch to keys changes only this module.
"""

from __future__ import annotations

import re

from fastapi import Header

from baton.runtime.errors import InvalidArgument

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_TENANT = "default"


def current_tenant(x_baton_tenant: str | None = Header(default=None)) -> str:
    tenant = x_baton_tenant or DEFAULT_TENANT
    if not TENANT_PATTERN.match(tenant):
        raise InvalidArgument(
            "X-Baton-Tenant must be 1-64 letters, digits, '_' or '-', starting with a letter or digit",
            reason="BAD_TENANT",
        )
    return tenant
