"""The spec's request limits (`limits:`) and tenants (`security.tenants`), pydantic like the rest of
the spec (orchestrator/spec.py); the router gets frozen `RequestLimits` and `Credentials` from them.

Every refusal a limit causes names it (`limits.max_prompt_tokens`, ...): INVALID_ARGUMENT / 400 for
a request past a size limit, RESOURCE_EXHAUSTED / 429 for a stream past a concurrency budget, and
RESOURCE_EXHAUSTED / 413 for a message past max_request_bytes.
"""

from __future__ import annotations

from pydantic import Field

from orchestrator.router.quotas import DEFAULT_MAX_REQUEST_BYTES
from orchestrator.spec_base import Strict
from tandem.request import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS


class LimitsSpec(Strict):
    """What one request and one client may take (defaults suit a 1M-token context)."""

    # Prompt tokens; unset = the model's context bounds it.
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    # sampling.max_tokens; unset = the room the context leaves. router.default_max_tokens is capped by it.
    max_tokens: int | None = Field(default=None, ge=1)
    max_stop_strings: int = Field(default=MAX_STOP_STRINGS, ge=0, le=MAX_STOP_STRINGS)
    max_stop_token_ids: int = Field(default=MAX_STOP_TOKEN_IDS, ge=0, le=MAX_STOP_TOKEN_IDS)
    # One gRPC message or HTTP body (a 1M-token prompt as ids or text fits the default).
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1024, le=2**30)
    # Concurrent Generate streams of one client (a peer host within a tenant) ...
    max_streams_per_client: int = Field(default=64, ge=1, le=1_000_000)
    # ... and of one tenant (a tenant's max_concurrent_streams overrides this).
    max_streams_per_tenant: int = Field(default=1024, ge=1, le=1_000_000)


class TenantSpec(Strict):
    """A tenant: its own client token, prefix-cache salt and concurrent-stream budget. The token of
    security.token_file belongs to the tenant named "default" (a reserved name)."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    token_file: str = Field(min_length=1)
    # Concurrent streams of this tenant; unset = limits.max_streams_per_tenant.
    max_concurrent_streams: int | None = Field(default=None, ge=1, le=1_000_000)


def check_tenants(tenants: tuple[TenantSpec, ...]) -> None:
    """Tenant names are unique and "default" is reserved; ValueError naming the tenant otherwise."""
    seen: set[str] = set()
    for i, t in enumerate(tenants):
        if t.name == "default":
            raise ValueError(f"tenants[{i}].name 'default' is reserved for security.token_file's tenant")
        if t.name in seen:
            raise ValueError(f"tenants[{i}].name {t.name!r} is used twice")
        seen.add(t.name)
