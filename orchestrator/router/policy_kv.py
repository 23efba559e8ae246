"""Tandem's `kv` policy: choose the (prefill, decode) pair together, by expected cost in seconds.

For every admitting decode worker d and admitting prefill worker p (and, when d would have to
compute at most `DisaggThresholds.local_max_uncached_tokens` tokens itself, the local option
p = None):

    ttft(p)      = (queued_prefill_tokens[p] + uncached[p]) / prefill_rate[p]
                   uncached[w] = max(prompt - matched_blocks[w] * block_size, 1)
    handoff(p,d) = link(p, d).latency + transfer_blocks(d) * kv_bytes_per_block / link.bandwidth
                   transfer_blocks(d) = prompt blocks - matched_blocks[d]   (decode-side reuse)
                   link = NVLink within a domain, RDMA across; 0 when local
    pressure(d)  = max((kv_used + transfer_blocks(d)) / kv_total, (running + 1) / max_running)
                   + max(running + 1 - busiest other dp rank of d's instance, 0) / max_running
    cost(p,d)    = ttft(p) + handoff(p,d) + decode_load_weight_s * pressure(d)

The dp-rank term charges only what a request adds to its instance's busiest rank: dp ranks step
together through the MoE all-to-all, so the busiest rank sets every rank's step time.
The cheapest pair wins. Pairs within `tie_tolerance_s` of the cheapest are ties (measured rates are
not more precise than that); a tie goes to the pair sharing most with the session's previous pair
(decode and prefill), then to the least loaded (prefiller's queued seconds + decode pressure),
then to the lowest (prefill, decode) ids: never at random.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from orchestrator.router.decision import Reason, Refusal, RefusalReason, RouteDecision, RouteOutcome
from orchestrator.router.estimate import handoff_seconds, prefill_seconds, transfer_blocks, uncached_tokens
from orchestrator.router.inputs import FleetParams, Role, WorkerState
from orchestrator.router.view import RoutingView, WorkerPair

_NO_ID_KEY = ("", -1)


@dataclass(frozen=True)
class KvParams:
    """decode_load_weight_s: seconds of TTFT that one unit of decode pressure (a full KV pool or a
    full batch) is worth. tie_tolerance_s: cost differences below this are ties."""

    decode_load_weight_s: float = 0.5
    tie_tolerance_s: float = 1e-3

    def __post_init__(self) -> None:
        if self.decode_load_weight_s < 0:
            raise ValueError(f"KvParams.decode_load_weight_s = {self.decode_load_weight_s}: must be >= 0")
        if self.tie_tolerance_s < 0:
            raise ValueError(f"KvParams.tie_tolerance_s = {self.tie_tolerance_s}: must be >= 0")


@dataclass(frozen=True)
class _Candidate:
    cost: float
    pair: WorkerPair
    ttft_s: float
    handoff_s: float
    load: float
    prefill_cached: int
    decode_cached: int
    uncached: int
    transfer: int
    alloc: int

    def order_key(self) -> tuple:
        p = self.pair.prefill
        return (p is not None, (p.instance, p.dp_rank) if p else _NO_ID_KEY, self.pair.decode)


def decode_pressure(view: RoutingView, d: WorkerState, transfer: int) -> float:
    """pressure(d) of the module formula: KV or batch fill after admitting, plus the dp-rank raise."""
    kv = (d.kv_blocks_used + transfer) / d.kv_blocks_total
    run = (d.running_requests + 1) / d.max_running_requests
    others = [
        w.running_requests
        for w in view.workers
        if w.role is Role.DECODE and w.worker.instance == d.worker.instance and w.worker != d.worker
    ]
    raise_ = max(d.running_requests + 1 - max(others), 0) / d.max_running_requests if others else 0.0
    return max(kv, run) + raise_


class KvPolicy:
    """Tandem's joint (prefill, decode) choice; see the module docstring for the formula."""

    def __init__(self, fleet: FleetParams, params: KvParams | None = None) -> None:
        self.fleet = fleet
        self.params = params if params is not None else KvParams()

    def _prefill_shortlist(
        self, view: RoutingView, prefills: list[WorkerState]
    ) -> list[tuple[WorkerState, float]]:
        """Per NVLink domain, the prefills within tolerance of that domain's best TTFT.

        The pair cost depends on p only through ttft(p) and p's domain, so no other prefill can win.
        """
        n, bs, tol = view.request.prompt_tokens, self.fleet.block_size, self.params.tie_tolerance_s
        by_domain: dict[str, list[tuple[WorkerState, float]]] = defaultdict(list)
        for p in prefills:
            unc = uncached_tokens(n, view.matched_blocks(p.worker), bs)
            by_domain[p.nvlink_domain].append((p, prefill_seconds(p, unc)))
        short = []
        for group in by_domain.values():
            best = min(t for _, t in group)
            short += [(p, t) for p, t in group if t <= best + tol]
        return short

    def _candidates(
        self, view: RoutingView, decodes: list[WorkerState], prefills: list[WorkerState]
    ) -> list[_Candidate]:
        n, bs = view.request.prompt_tokens, self.fleet.block_size
        w = self.params.decode_load_weight_s
        shortlist = self._prefill_shortlist(view, prefills)
        out = []
        for d in decodes:
            held = view.matched_blocks(d.worker)
            moved = transfer_blocks(n, held, bs)
            pressure = decode_pressure(view, d, moved)
            unc_d = uncached_tokens(n, held, bs)
            if unc_d <= self.fleet.disagg.local_max_uncached_tokens:
                t = prefill_seconds(d, unc_d)
                load = d.queued_prefill_tokens / d.prefill_rate_tps + pressure
                out.append(
                    _Candidate(
                        t + w * pressure,
                        WorkerPair(None, d.worker),
                        t,
                        0.0,
                        load,
                        held,
                        held,
                        unc_d,
                        0,
                        moved,
                    )
                )
            for p, t in shortlist:
                h = handoff_seconds(self.fleet, p, d, moved)
                load = p.queued_prefill_tokens / p.prefill_rate_tps + pressure
                cached = view.matched_blocks(p.worker)
                out.append(
                    _Candidate(
                        t + h + w * pressure,
                        WorkerPair(p.worker, d.worker),
                        t,
                        h,
                        load,
                        cached,
                        held,
                        uncached_tokens(n, cached, bs),
                        moved,
                        moved,
                    )
                )
        return out

    def choose(self, view: RoutingView) -> RouteOutcome:
        """The cheapest admitting pair (module formula), or a refusal naming what is full or missing."""
        rid = view.request.request_id
        decodes = view.of_role(Role.DECODE)
        if not decodes:
            return Refusal(rid, RefusalReason.NO_WORKERS, "no decode worker is registered")
        open_decodes = [d for d in decodes if d.admits]
        prefills = view.of_role(Role.PREFILL)
        open_prefills = [p for p in prefills if p.admits]
        cands = self._candidates(view, open_decodes, open_prefills)
        if not cands:
            if not open_decodes:
                return Refusal(
                    rid,
                    RefusalReason.QUEUES_FULL,
                    f"all {len(decodes)} decode workers are at their queue limit",
                )
            if not prefills:
                return Refusal(
                    rid,
                    RefusalReason.NO_WORKERS,
                    "no prefill worker is registered and the uncached part of the prompt exceeds "
                    f"local_max_uncached_tokens = {self.fleet.disagg.local_max_uncached_tokens}",
                )
            return Refusal(
                rid,
                RefusalReason.QUEUES_FULL,
                f"all {len(prefills)} prefill workers are at their queue limit and no decode worker "
                "may prefill this prompt locally",
            )
        best = min(c.cost for c in cands)
        ties = [c for c in cands if c.cost <= best + self.params.tie_tolerance_s]
        aff = view.affinity

        def shared(c: _Candidate) -> int:
            if aff is None:
                return 0
            return int(c.pair.decode == aff.decode) + int(c.pair.prefill == aff.prefill)

        pick = min(ties, key=lambda c: (-shared(c), c.load, c.order_key()))
        if pick.pair.prefill is None:
            reason = Reason.LOCAL_PREFILL
        elif shared(pick) > min(shared(c) for c in ties):
            reason = Reason.SESSION_AFFINITY
        elif pick.prefill_cached > 0 or pick.decode_cached > 0:
            reason = Reason.PREFIX_HIT
        else:
            reason = Reason.LEAST_LOAD
        return RouteDecision(
            request_id=rid,
            prefill=pick.pair.prefill,
            decode=pick.pair.decode,
            reason=reason,
            expected_ttft_s=pick.ttft_s,
            expected_handoff_s=pick.handoff_s,
            prefill_cached_blocks=pick.prefill_cached,
            decode_cached_blocks=pick.decode_cached,
            uncached_tokens=pick.uncached,
            transfer_blocks=pick.transfer,
            decode_alloc_blocks=pick.alloc,
        )
