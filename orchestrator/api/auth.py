"""Bearer-token checks for the HTTP API, over the router's `Credentials` (tenants' client tokens and
a separate admin token).

Generation endpoints need a tenant's client token: 401 without a known token, 403 for the admin
token alone (it does not generate). Admin endpoints need the admin token: 401 without a known
token, 403 for a client token. With no tokens configured every door is open (development only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException, Request

from orchestrator.router.tenancy import Caller, Credentials, Forbidden, Unauthenticated


def _client_host(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


@contextmanager
def _as_http_errors() -> Iterator[None]:
    """Unauthenticated -> 401 (with WWW-Authenticate), Forbidden -> 403."""
    try:
        yield
    except Unauthenticated as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    except Forbidden as exc:
        raise HTTPException(403, str(exc)) from None


class Auth:
    """FastAPI dependencies. `client_token`/`admin_token` are shorthand for `Credentials.simple`;
    give those or `credentials`, not both."""

    def __init__(self, client_token: str | None = None, admin_token: str | None = None, *,
                 credentials: Credentials | None = None) -> None:
        if credentials is not None and (client_token is not None or admin_token is not None):
            raise ValueError("Auth: give client_token/admin_token or credentials, not both")
        self.credentials = credentials if credentials is not None else Credentials.simple(client_token,
                                                                                          admin_token)

    async def client(self, request: Request) -> Caller:
        """Generation endpoints: the caller (tenant, client host) of a tenant's client token."""
        with _as_http_errors():
            return self.credentials.caller(request.headers.get("authorization"), _client_host(request))

    async def admin(self, request: Request) -> None:
        """Admin endpoints: the admin token only."""
        with _as_http_errors():
            self.credentials.require_admin(request.headers.get("authorization"))
