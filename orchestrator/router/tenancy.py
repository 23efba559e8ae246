"""Who is calling: bearer tokens -> principals (a tenant and/or the admin role), and the per-tenant
prefix-cache salt.

A deployment has one or more tenants, each with its own client token; the token of
`security.token_file` belongs to the tenant named "default". The admin token only authorises the
admin endpoints (scale, drain, down, status): it does not generate, unless the same token is also a
tenant's token (then that principal has both roles). With no tokens at all (local development
only) every caller is the anonymous tenant with the admin role.

The cache salt a request's blocks are hashed with always starts with the authenticated tenant's
name, length-prefixed, then the client's own `cache_salt`: a client can narrow sharing inside its
tenant, never reach into another tenant's blocks, so one tenant cannot learn another's prompts
from prefix-cache timing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_TENANT = "default"
ANONYMOUS_TENANT = "anonymous"


class Unauthenticated(PermissionError):
    """No credentials, or credentials that match no principal."""


class Forbidden(PermissionError):
    """A known principal asked for something its role does not allow."""


@dataclass(frozen=True)
class Tenant:
    """A group of clients sharing a token, a prefix-cache salt and a concurrent-stream budget.

    max_streams: the tenant's concurrent Generate streams; None = the deployment-wide default."""

    name: str
    max_streams: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Tenant.name must be non-empty")
        if self.max_streams is not None and self.max_streams < 1:
            raise ValueError(f"Tenant({self.name!r}).max_streams = {self.max_streams}: must be >= 1")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller's rights: the tenant it generates as (None: it may not generate)."""

    tenant: Tenant | None
    admin: bool


@dataclass(frozen=True)
class Caller:
    """A Generate call's origin: the tenant and the client (peer host) within it."""

    tenant: Tenant
    client: str


ANONYMOUS = Caller(Tenant(ANONYMOUS_TENANT), "local")


@dataclass(frozen=True)
class TenantToken:
    """A tenant and the bearer token its clients present."""

    tenant: Tenant
    token: str

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError(f"TenantToken({self.tenant.name!r}): the token is empty")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Credentials:
    """Bearer token -> Principal. Tokens are compared as SHA-256 digests in constant time."""

    def __init__(self, tenants: Sequence[TenantToken] = (), admin_token: str | None = None) -> None:
        names = [t.tenant.name for t in tenants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"Credentials: tenant names must be unique, repeated: {dup}")
        digests = [_digest(t.token) for t in tenants]
        if len(set(digests)) != len(digests):
            raise ValueError("Credentials: two tenants share one token")
        if admin_token is not None and not admin_token:
            raise ValueError("Credentials: the admin token is empty")
        self._tenants = tuple(zip(digests, (t.tenant for t in tenants), strict=True))
        self._admin = _digest(admin_token) if admin_token is not None else None

    @classmethod
    def simple(cls, client_token: str | None, admin_token: str | None = None) -> Credentials:
        """One client token (tenant "default") and an optional admin token."""
        tenants = [TenantToken(Tenant(DEFAULT_TENANT), client_token)] if client_token is not None else []
        return cls(tenants, admin_token)

    @property
    def open(self) -> bool:
        """True when no token is configured: every caller is anonymous and admin (development only)."""
        return not self._tenants and self._admin is None

    def resolve(self, authorization: str | bytes | None) -> Principal:
        """The principal of an `authorization` header value ("Bearer <token>").

        Raises Unauthenticated when the header is missing, malformed or names no principal."""
        if self.open:
            return Principal(ANONYMOUS.tenant, admin=True)
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing bearer token (header 'authorization: Bearer <token>')")
        got = _digest(token.strip())
        tenant = None
        for digest, t in self._tenants:  # every entry is compared: the time does not tell which matched
            if hmac.compare_digest(digest, got):
                tenant = t
        admin = self._admin is not None and hmac.compare_digest(self._admin, got)
        if tenant is None and not admin:
            raise Unauthenticated("wrong bearer token")
        return Principal(tenant, admin)

    def caller(self, authorization: str | bytes | None, client: str) -> Caller:
        """The Generate caller for these credentials from `client` (peer host).

        Raises Unauthenticated (no principal) or Forbidden (the admin token alone does not generate)."""
        principal = self.resolve(authorization)
        if principal.tenant is None:
            raise Forbidden("the admin token does not generate; use a tenant's client token")
        return Caller(principal.tenant, client)

    def require_admin(self, authorization: str | bytes | None) -> Principal:
        """The principal, if it holds the admin role; Unauthenticated or Forbidden otherwise."""
        principal = self.resolve(authorization)
        if not principal.admin:
            raise Forbidden("this endpoint needs the admin token")
        return principal


def tenant_salt(tenant: str, client_salt: str) -> str:
    """The prefix-cache salt for a tenant's request: the tenant part, length-prefixed so no client
    salt can forge another tenant's, then the client's own salt (which only narrows sharing)."""
    return f"tenant:{len(tenant)}:{tenant}|{client_salt}"


__all__ = ["ANONYMOUS", "Caller", "Credentials", "Forbidden", "Principal", "Tenant", "TenantToken",
           "Unauthenticated", "tenant_salt"]
