"""Bearer-token checks for the HTTP API: one token for clients, a separate one for admin calls."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


class Auth:
    """FastAPI dependencies; a None token means that door is open (local development only)."""

    def __init__(self, client_token: str | None, admin_token: str | None) -> None:
        self._client = client_token
        self._admin = admin_token

    @staticmethod
    def _check(request: Request, want: str | None, what: str) -> None:
        if want is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {want}".encode()):
            raise HTTPException(401, f"missing or wrong {what} bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    async def client(self, request: Request) -> None:
        """Generation endpoints: the client token (the admin token is accepted too)."""
        if self._admin is not None and request.headers.get("authorization") == f"Bearer {self._admin}":
            return
        self._check(request, self._client, "client")

    async def admin(self, request: Request) -> None:
        """Admin endpoints: the admin token only."""
        self._check(request, self._admin, "admin")
