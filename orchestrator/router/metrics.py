"""The router's Prometheus metrics, on a registry it is given (no process-wide globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class RouterMetrics:
    """Requests by status, TTFT, TPOT, prefix hits, routing decisions by reason, queue depth."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("tandem_router_requests", "Generate requests by final gRPC status",
                                ["code"], registry=registry)
        self.ttft = Histogram("tandem_router_ttft_seconds", "Arrival to first token sent",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("tandem_router_tpot_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram("tandem_router_request_seconds", "Arrival to last token sent",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.prompt_blocks = Counter("tandem_router_prompt_blocks", "Full prompt blocks routed",
                                     registry=registry)
        self.cached_blocks = Counter("tandem_router_cached_blocks",
                                     "Prompt blocks the chosen prefilling worker already held",
                                     registry=registry)
        self.decisions = Counter("tandem_router_decisions", "Routing decisions by reason", ["reason"],
                                 registry=registry)
        self.in_flight = Gauge("tandem_router_in_flight_requests", "Requests being served now",
                               registry=registry)
        self.kv_transfer_bytes = Counter("tandem_router_kv_transfer_bytes",
                                         "KV bytes moved prefill -> decode, as the decode reported",
                                         registry=registry)
        # MTP speculation, from the decodes' final summaries: acceptance rate = accepted / drafted.
        self.drafted_tokens = Counter("tandem_router_spec_drafted_tokens",
                                      "Draft tokens the decodes' MTP layer proposed", registry=registry)
        self.accepted_tokens = Counter("tandem_router_spec_accepted_tokens",
                                       "Draft tokens the verifying steps accepted", registry=registry)
        self.worker_queue = Gauge("tandem_router_worker_queue_depth",
                                  "Requests waiting on a worker at its last report", ["worker"],
                                  registry=registry)
        self.worker_queued_tokens = Gauge("tandem_router_worker_queued_prefill_tokens",
                                          "Prompt tokens waiting on a worker at its last report", ["worker"],
                                          registry=registry)
        self.output_tokens = Counter("tandem_router_output_tokens", "Tokens streamed to clients",
                                     registry=registry)
        self.arrivals = Counter("tandem_router_arrivals", "Requests admitted (valid, tokenised)",
                                registry=registry)
        self.prompt_tokens = Counter("tandem_router_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=registry)
        self.migrations = Counter("tandem_router_migrations",
                                  "Requests routed again after a worker holding them was lost",
                                  registry=registry)
        self.kv_resyncs = Counter("tandem_router_kv_resyncs",
                                  "KV index rebuilds of a worker from its snapshot (start, event gap)",
                                  registry=registry)

    def prefix_hit_rate(self) -> float:
        """Cached / routed prompt blocks since start (0 before any block was routed)."""
        total = self.prompt_blocks._value.get()
        return self.cached_blocks._value.get() / total if total else 0.0
