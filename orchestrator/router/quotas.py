"""Per-request size limits and per-client / per-tenant concurrent-stream budgets.

`RequestLimits` comes from the spec's `limits:` section (the router enforces it; the model's context
still bounds prompt + max_tokens through `admission.Limits`). `check_request` refuses an admitted
request past a limit with a `RequestError` naming the field and the limit (INVALID_ARGUMENT / 400).
`StreamSlots.take` counts open Generate streams; past a budget it raises `QuotaExceeded` naming the
limit (the frontend answers RESOURCE_EXHAUSTED, 429 over HTTP). The frontend releases the slot in a
`finally`, so it is freed when the stream ends however it ends (last chunk, error, client cancel).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from orchestrator.router.tenancy import Caller
from tandem.request import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, GenerationRequest, RequestError

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a 1M-token prompt as token ids or text fits


@dataclass(frozen=True)
class RequestLimits:
    """What one request and one client may take. None on max_prompt_tokens: the context bounds it."""

    max_prompt_tokens: int | None = None
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_token_ids: int = MAX_STOP_TOKEN_IDS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_streams_per_client: int = 64
    max_streams_per_tenant: int = 1024

    def __post_init__(self) -> None:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"RequestLimits.max_prompt_tokens = {self.max_prompt_tokens}: must be >= 1")
        stops = (("max_stop_strings", MAX_STOP_STRINGS), ("max_stop_token_ids", MAX_STOP_TOKEN_IDS))
        for name, most in stops:
            value = getattr(self, name)
            if not 0 <= value <= most:
                raise ValueError(f"RequestLimits.{name} = {value}: must be in [0, {most}]")
        for name in ("max_request_bytes", "max_streams_per_client", "max_streams_per_tenant"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"RequestLimits.{name} = {value}: must be >= 1")


def check_request(req: GenerationRequest, limits: RequestLimits) -> None:
    """Refuse an admitted request past a size limit; the RequestError names the field and the limit."""
    n = len(req.prompt_ids)
    if limits.max_prompt_tokens is not None and n > limits.max_prompt_tokens:
        raise RequestError("prompt", f"{n} tokens; limits.max_prompt_tokens is {limits.max_prompt_tokens}")
    s = req.sampling
    if len(s.stop) > limits.max_stop_strings:
        raise RequestError("sampling.stop", f"{len(s.stop)} strings; limits.max_stop_strings is "
                                            f"{limits.max_stop_strings}")
    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        n, most = len(s.stop_token_ids), limits.max_stop_token_ids
        raise RequestError("sampling.stop_token_ids", f"{n} ids; limits.max_stop_token_ids is {most}")


class QuotaExceeded(Exception):
    """A caller past its concurrent-stream budget; str() names the limit."""


class Slot:
    """One open stream's place in the counts; `release` is idempotent."""

    def __init__(self, owner: StreamSlots, key: tuple[str, str]) -> None:
        self._owner = owner
        self._key: tuple[str, str] | None = key

    def release(self) -> None:
        if self._key is not None:
            self._owner._release(self._key)
            self._key = None


class StreamSlots:
    """Open Generate streams per client (tenant, peer host) and per tenant. One per router; asyncio
    single-threaded, so plain counters are enough."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self._clients: Counter[tuple[str, str]] = Counter()
        self._tenants: Counter[str] = Counter()

    def open_streams(self, caller: Caller) -> tuple[int, int]:
        """(streams of this client, streams of its tenant) open now."""
        return self._clients[(caller.tenant.name, caller.client)], self._tenants[caller.tenant.name]

    def take(self, caller: Caller) -> Slot:
        """A slot for the caller's new stream; raises QuotaExceeded naming the limit it would pass."""
        tenant = caller.tenant
        key = (tenant.name, caller.client)
        per_client = self.limits.max_streams_per_client
        per_tenant = tenant.max_streams or self.limits.max_streams_per_tenant
        if self._clients[key] >= per_client:
            raise QuotaExceeded(f"limits.max_streams_per_client: client {caller.client} of tenant "
                                f"{tenant.name!r} has {per_client} streams open (limit {per_client})")
        if self._tenants[tenant.name] >= per_tenant:
            where = (f"security.tenants[{tenant.name}].max_concurrent_streams" if tenant.max_streams
                     else "limits.max_streams_per_tenant")
            raise QuotaExceeded(f"{where}: tenant {tenant.name!r} has {per_tenant} streams open "
                                f"(limit {per_tenant})")
        self._clients[key] += 1
        self._tenants[tenant.name] += 1
        return Slot(self, key)

    def _release(self, key: tuple[str, str]) -> None:
        for counts, k in ((self._clients, key), (self._tenants, key[0])):
            counts[k] -= 1
            if counts[k] <= 0:
                del counts[k]
