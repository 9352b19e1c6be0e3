"""Who is calling: the tenant always comes from the API key; without auth, from `X-Tenant`. A generation
request may also name its tenant in `model` as `MODEL:TENANT`, the way a gateway that routes by model name
(and by the adapters a replica holds) sees it; with auth on, only the key's own tenant (or the admin key)."""

from __future__ import annotations

import hmac
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .errors import ApiError, Forbidden, Unauthorized
from .state import AppState, get_state

DEFAULT_TENANT = "default"
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _named_tenant(request: Request) -> str:
    tenant = request.headers.get("x-tenant", DEFAULT_TENANT)
    if not _TENANT.match(tenant):
        raise ApiError("X-Tenant must be 1-64 letters, digits, '_', '.' or '-'", "X-Tenant")
    return tenant


async def get_principal(request: Request, state: Annotated[AppState, Depends(get_state)]) -> Principal:
    admin_key = state.settings.admin_key
    if admin_key is None:  # auth disabled: the embedded default
        return Principal(tenant=_named_tenant(request), admin=True)
    key = _bearer(request)
    if key is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if hmac.compare_digest(key.encode(), admin_key.encode()):
        # The tenant comes from the key: the admin key's own traffic is the default tenant's.
        return Principal(tenant=DEFAULT_TENANT, admin=True)
    tenant = await state.tenants.tenant_of(key)
    if tenant is None:
        raise Unauthorized("invalid API key")
    return Principal(tenant=tenant, admin=False)


def addressed(principal: Principal, model: str, served: Collection[str]) -> tuple[str, Principal]:
    """The served model that `model` names, and who calls it: `MODEL:TENANT` addresses TENANT of MODEL."""
    name, colon, tenant = model.rpartition(":")
    if not colon or model in served or name not in served:
        return model, principal
    if not _TENANT.match(tenant):
        raise ApiError("the tenant in MODEL:TENANT must be 1-64 letters, digits, '_', '.' or '-'", "model")
    if not principal.admin and tenant != principal.tenant:
        raise Forbidden(f"this key belongs to tenant {principal.tenant!r}, not {tenant!r}")
    return name, Principal(tenant=tenant, admin=principal.admin)


async def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.admin:
        raise Forbidden("this route needs the admin key")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
State = Annotated[AppState, Depends(get_state)]
