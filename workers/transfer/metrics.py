"""Transfer metrics on a registry the caller passes in (no process-global collectors).

Names as exported (prometheus adds `_total` to counters):
  kv_transfer_bytes_total, kv_transfer_descriptors_total, kv_transfer_seconds (histogram),
  kv_transfer_failures_total, kv_lease_expiries_total, kv_handoff_claims_total{outcome}.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# From a 1-block pull on a loaded CPU (~1e-4 s) to a 128K-token pull of a large model (~seconds).
_SECONDS_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


class TransferMetrics:
    """The collectors of one rank's transfers, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.bytes = Counter("kv_transfer_bytes", "KV bytes pulled over NIXL", registry=registry)
        self.descriptors = Counter(
            "kv_transfer_descriptors", "Coalesced descriptors in pulled READs", registry=registry
        )
        self.seconds = Histogram(
            "kv_transfer_seconds",
            "READ time, post to completion",
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "kv_transfer_failures", "Pulls that failed (the decode recomputes)", registry=registry
        )
        self.lease_expiries = Counter(
            "kv_lease_expiries", "Handoffs freed because no claim or release came in time", registry=registry
        )
        self.claims = Counter(
            "kv_handoff_claims", "Claims answered, by outcome", labelnames=("outcome",), registry=registry
        )

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0.0 when never observed), e.g. value('kv_transfer_bytes_total')."""
        got = self.registry.get_sample_value(name, labels or None)
        return 0.0 if got is None else got
