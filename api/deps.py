"""Request dependencies: the service state, the leased searcher, and the key checks.

A key is read from `Authorization: Bearer KEY`, `X-API-Key: KEY`, or HTTP Basic with the key as
password (so URL userinfo works for clients that cannot set headers: http://:KEY@host/...).
Keys are compared with hmac.compare_digest and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.routing import BaseRoute

from api.errors import Problem
from api.limits import BODY_LIMIT_KEY, NO_BODY_LIMIT, RoutePolicy
from api.settings import Settings
from api.state import ServiceState
from retrieval.index import Index

AUTH_HEADERS = {"WWW-Authenticate": 'Bearer realm="clipdex"'}


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def presented_key(headers: Headers) -> str | None:
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return password or user or None
    return headers.get("x-api-key") or None


def _matches(key: str, candidates: list[str]) -> bool:
    found = False
    for candidate in candidates:  # no early exit: time does not depend on which key matched
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def check_key(settings: Settings, need: str, headers: Headers) -> None:
    """Raise the 401/403 Problem when `headers` carry no key good for `need` ("read" or
    "admin"). Called by the route dependencies and, before any body is read, by the AdmissionMiddleware."""
    if need == "admin":
        _check_admin(settings, presented_key(headers))
        return
    if not settings.read_keys:
        return
    key = presented_key(headers)
    admin = settings.admin_secret()
    allowed = settings.read_secrets() + ([admin] if admin else [])
    if key is None:
        raise Problem(401, "Unauthorized", "this service needs a read key: send "
                      "'Authorization: Bearer KEY' or 'X-API-Key: KEY'", headers=AUTH_HEADERS)
    if not _matches(key, allowed):
        raise Problem(401, "Unauthorized", "the key is not valid for this service; check it",
                      headers=AUTH_HEADERS)


def _check_admin(settings: Settings, key: str | None) -> None:
    if not settings.admin_key:
        raise Problem(403, "Forbidden", "write endpoints are disabled; start the service "
                      "with an admin key (CLIPDEX_ADMIN_KEY) to enable them")
    if key is None:
        raise Problem(401, "Unauthorized", "this endpoint needs the admin key: send "
                      "'Authorization: Bearer KEY'", headers=AUTH_HEADERS)
    if _matches(key, [settings.admin_secret() or ""]):
        return
    if _matches(key, settings.read_secrets()):
        raise Problem(403, "Forbidden", "a read key cannot change the index; use the admin key")
    raise Problem(401, "Unauthorized", "the key is not valid for this service; check it",
                  headers=AUTH_HEADERS)


# The schemes as OpenAPI shows them (and /docs offers to fill in). They only declare; the check
# is `check_key`, which also takes HTTP Basic with the key as password. auto_error=False: a
# missing or other credential is check_key's to judge, with the service's own problem bodies.
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="Authorization: Bearer KEY")
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                       description="X-API-Key: KEY")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
ApiKey = Annotated[str | None, Security(API_KEY)]


def require_read(request: Request, state: State, _bearer: Bearer = None,
                 _api_key: ApiKey = None) -> None:
    check_key(state.settings, "read", request.headers)


def require_admin(request: Request, state: State, _bearer: Bearer = None,
                  _api_key: ApiKey = None) -> None:
    check_key(state.settings, "admin", request.headers)


def route_policy(route: BaseRoute, default_max_body: int) -> RoutePolicy:
    """What the AdmissionMiddleware enforces for a route: the key its dependencies require, and the body cap
    in its openapi_extra (routes that take a body default to the upload cap)."""
    if not isinstance(route, APIRoute):
        return RoutePolicy(None, NO_BODY_LIMIT)  # static files, the page
    needs = {dependency.dependency for dependency in route.dependencies}
    need = "admin" if require_admin in needs else "read" if require_read in needs else None
    takes_body = bool(route.methods & {"POST", "PUT", "PATCH"})
    fallback = default_max_body if takes_body else NO_BODY_LIMIT
    return RoutePolicy(need, (route.openapi_extra or {}).get(BODY_LIMIT_KEY, fallback))


async def lease_index(state: State) -> AsyncIterator[Index]:
    """The served index, held for the whole request even if a reload swaps it meanwhile."""
    problem = state.ready_problem()
    if problem is not None or state.slot is None:
        raise Problem(503, "Not ready", problem or "not ready", headers={"Retry-After": "5"})
    with state.slot.lease() as index:
        yield index


ReadAccess = Depends(require_read)
AdminAccess = Depends(require_admin)
Leased = Annotated[Index, Depends(lease_index)]
