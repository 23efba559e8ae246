"""What the router tells the controller about load: cumulative counters and each rank's last report.

A `LoadSnapshot` is cheap to take and carries no rates: counters only grow (from the router
process's start), so the controller's autoscaler turns two snapshots into rates over the time
between them. A counter that went down means the router restarted; the reader drops its window.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from orchestrator.router.decision import Reason
from orchestrator.router.inputs import Role


@dataclass(frozen=True)
class RankLoad:
    """One routable rank at its last report (`tandem.v1.WorkerStats`)."""

    instance: str
    rank: int
    role: Role
    draining: bool
    queued_requests: int
    queued_prefill_tokens: int
    running_requests: int
    prefill_tok_s: float  # prompt tokens computed per second over the rank's last ~0.5 s
    decode_tok_s: float  # tokens sampled per second over the rank's last ~0.5 s


@dataclass(frozen=True)
class RequestCounters:
    """Cumulative since the router started. TTFT and TPOT as sums and counts of observations."""

    arrivals: int  # admitted requests
    prompt_tokens: int  # of admitted requests
    finished: int  # requests that streamed their last chunk
    output_tokens: int  # tokens streamed to clients
    prompt_blocks: int  # full prompt blocks routed
    cached_blocks: int  # of which the prefilling worker already held
    ttft_sum_s: float
    ttft_count: int
    tpot_sum_s: float
    tpot_count: int
    routed: int  # routing decisions (a request routed again counts again)
    local_prefills: int  # of which the decode worker prefills itself (conditional disaggregation)

    def minus(self, earlier: RequestCounters) -> RequestCounters:
        """The counts between `earlier` and this; ValueError when a counter went down (a restart)."""
        out = {}
        for name in self.__dataclass_fields__:
            now, then = getattr(self, name), getattr(earlier, name)
            if now < then:
                raise ValueError(f"RequestCounters.{name} went down ({then} -> {now}): the router restarted")
            out[name] = now - then
        return RequestCounters(**out)


@dataclass(frozen=True)
class LoadSnapshot:
    at_s: float  # the router's time.monotonic() when taken
    counters: RequestCounters
    ranks: tuple[RankLoad, ...]


def read_counters(registry: CollectorRegistry) -> RequestCounters:
    """The request counters from the router's Prometheus registry (`RouterMetrics`), read in one
    pass over it (get_sample_value would walk every collector once per value)."""
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in registry.collect() for s in family.samples}

    def get(name: str) -> float:
        value = samples.get((name, ()))
        if value is None:
            raise KeyError(f"router metric {name!r} is not registered")
        return value

    def decisions(reason: Reason) -> int:
        value = samples.get(("tandem_router_decisions_total", (("reason", reason.value),)))
        return 0 if value is None else int(value)  # a reason's series appears with its first decision

    return RequestCounters(
        arrivals=int(get("tandem_router_arrivals_total")),
        prompt_tokens=int(get("tandem_router_prompt_tokens_total")),
        finished=int(get("tandem_router_request_seconds_count")),
        output_tokens=int(get("tandem_router_output_tokens_total")),
        prompt_blocks=int(get("tandem_router_prompt_blocks_total")),
        cached_blocks=int(get("tandem_router_cached_blocks_total")),
        ttft_sum_s=get("tandem_router_ttft_seconds_sum"),
        ttft_count=int(get("tandem_router_ttft_seconds_count")),
        tpot_sum_s=get("tandem_router_tpot_seconds_sum"),
        tpot_count=int(get("tandem_router_tpot_seconds_count")),
        routed=sum(decisions(r) for r in Reason),
        local_prefills=decisions(Reason.LOCAL_PREFILL),
    )
