"""Tandem's `kv` policy: choose the (prefill, decode) pair together, by expected cost in seconds.

Candidates: for every admitting decode worker d, the local option (None, d) when
`DisaggThresholds.local(uncached[d], prompt)` says d prefills this request itself, otherwise the
pairs (p, d) over admitting prefill workers p. With n = prompt tokens, B = n's blocks (partial
last block included), held[w] = leading blocks of the prompt w holds as resumable hits
(`view.matches`), kept[d] >= held[d] = leading blocks d holds resumable or pulled without a boundary
(`view.held`: pages a handoff need not move, but no computation starts after them):

    uncached[w]  = max(n - held[w] * block_size, 1)         (also decides d's local option)
    ttft(w)      = (queued_prefill_tokens[w] + uncached[w]) / prefill_rate[w]
    handoff(p,d) = link(p, d).latency + (B - kept[d]) * kv_bytes_per_block / link.bandwidth
                   (NVLink within a domain, RDMA across; only the blocks d lacks move; 0 if local)
    kv(d)        = (kv_used[d] + B - reuse_credit * reused[d]) / kv_total[d]
                   (reused[d] = held[d] for the local option, kept[d] for a pair: a local prefill
                   takes only resumable pages, a handoff every held one)
    run(d)       = (running[d] + 1) / max_running[d]
    dp(d)        = max(running[d] + 1 - busiest other dp rank of d's instance, 0) / max_running[d]
                   (0 for a single-rank instance)
    pressure(d)  = w_kv * kv(d) + w_running * run(d) + w_dp * dp(d)
    cost(p,d)    = ttft(p) + handoff(p,d) + decode_load_weight_s * pressure(d)
    cost(None,d) = ttft(d) + decode_load_weight_s * pressure(d)

The dp term charges only what a request adds to its instance's busiest rank: the dp ranks of an
instance step together through the MoE all-to-all, so the busiest rank sets all their step times.
The cheapest candidate wins. Candidates within `tie_tolerance_s` of the cheapest are ties
(measured rates are not more precise than that); a tie goes to the candidate sharing most workers
with the session's previous pair, then to the least loaded (prefiller's queued seconds plus
decode pressure), then to the lowest (prefill, decode) ids: never at random.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

from orchestrator.router.decision import Reason, Refusal, RefusalReason, RouteDecision, RouteOutcome
from orchestrator.router.estimate import (
    handoff_seconds,
    prompt_blocks,
    transfer_blocks,
    uncached_tokens,
)
from orchestrator.router.inputs import FleetParams, Role, WorkerId, WorkerState
from orchestrator.router.view import RoutingView


@dataclass(frozen=True)
class KvParams:
    """The `kv` policy's knobs (the spec's router.weights give the first four).

    w_kv, w_running, w_dp: weights of the decode pressure terms, each a fraction in [0, 1] when the
    decode has room. reuse_credit: share of the blocks a decode holds that count as free for it.
    decode_load_weight_s: seconds of TTFT that one unit of pressure is worth.
    tie_tolerance_s: cost differences below this are ties.
    """

    w_kv: float = 1.0
    w_running: float = 1.0
    w_dp: float = 0.5
    reuse_credit: float = 1.0
    decode_load_weight_s: float = 0.5
    tie_tolerance_s: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("w_kv", "w_running", "w_dp", "reuse_credit", "decode_load_weight_s", "tie_tolerance_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"KvParams.{name} = {value!r}: must be >= 0")


class _Tie(NamedTuple):
    """A candidate within tolerance of the cheapest (a plain tuple: built by the dozen per request)."""

    cost: float
    prefill: WorkerState | None
    decode: WorkerState
    ttft_s: float
    handoff_s: float
    pressure: float


def _busiest_other_ranks(view: RoutingView) -> dict[WorkerId, int]:
    """For each decode rank of a multi-rank instance: the most running requests on any OTHER rank
    of its instance (all ranks count, admitting or not). One pass over the workers."""
    ranks: dict[str, list[WorkerState]] = defaultdict(list)
    for w in view.workers:
        if w.role is Role.DECODE:
            ranks[w.worker.instance].append(w)
    out = {}
    for group in ranks.values():
        if len(group) < 2:
            continue
        top = sorted(group, key=lambda w: -w.running_requests)[:2]
        for w in group:
            out[w.worker] = (top[1] if w.worker == top[0].worker else top[0]).running_requests
    return out


class KvPolicy:
    """Tandem's joint (prefill, decode) choice; see the module docstring for the formula."""

    def __init__(self, fleet: FleetParams, params: KvParams | None = None) -> None:
        self.fleet = fleet
        self.params = params if params is not None else KvParams()

    def pressure(self, view: RoutingView, d: WorkerState, local: bool = True) -> float:
        """pressure(d) of the module formula, for view.request: of d's local option, or (local
        False) of a pair with d as its decode."""
        reused = view.matched_blocks(d.worker) if local else view.held_blocks(d.worker)
        return self._pressure(view, d, _busiest_other_ranks(view).get(d.worker), reused)

    def _pressure(self, view: RoutingView, d: WorkerState, busiest_other: int | None, reused: int) -> float:
        p, bs = self.params, self.fleet.block_size
        blocks = prompt_blocks(view.request.prompt_tokens, bs)
        kv = (d.kv_blocks_used + blocks - p.reuse_credit * reused) / d.kv_blocks_total
        run = (d.running_requests + 1) / d.max_running_requests
        dp = (
            0.0
            if busiest_other is None
            else max(d.running_requests + 1 - busiest_other, 0) / d.max_running_requests
        )
        return p.w_kv * kv + p.w_running * run + p.w_dp * dp

    def _domains(self, view: RoutingView, prefills: list[WorkerState]) -> list[tuple[float, list]]:
        """Per NVLink domain: (best ttft, [(prefill, ttft, queued seconds), ...]). A pair's cost
        depends on its prefill only through ttft and domain, so each decode is first costed per
        domain. (`uncached_tokens` and `prefill_seconds` inlined: this runs per prefill per request.)"""
        n, bs, matches = view.request.prompt_tokens, self.fleet.block_size, view.matches
        by_domain: dict[str, list[tuple[WorkerState, float, float]]] = defaultdict(list)
        for p in prefills:
            queued, rate = p.queued_prefill_tokens, p.prefill_rate_tps
            unc = max(n - matches.get(p.worker, 0) * bs, 1)
            by_domain[p.nvlink_domain].append((p, (queued + unc) / rate, queued / rate))
        return [(min(m[1] for m in group), group) for group in by_domain.values()]

    def _ties(
        self, view: RoutingView, decodes: list[WorkerState], prefills: list[WorkerState]
    ) -> tuple[list[tuple[tuple, _Tie]], int | None]:
        """The candidates within tie_tolerance_s of the cheapest that can win the tie-break, each as
        (tie-break key, `_Tie`), and the largest first key element over ALL candidates within the
        tolerance (None when there is none). The key is `choose`'s: (-workers shared with the
        session's last pair, load, remote, prefill id, decode id). ([], None) if no candidate."""
        n, bs, matches = view.request.prompt_tokens, self.fleet.block_size, view.matches
        weight, tol, local_ok = (
            self.params.decode_load_weight_s,
            self.params.tie_tolerance_s,
            self.fleet.disagg.local,
        )
        blocks = prompt_blocks(n, bs)
        domains = self._domains(view, prefills)
        busiest = _busiest_other_ranks(view)
        local: list[_Tie] = []
        rows = []  # (cost with the domain's best prefill, decode, members, handoff, pressure)
        for d in decodes:
            held, kept = matches.get(d.worker, 0), view.held_blocks(d.worker)
            pressure = self._pressure(view, d, busiest.get(d.worker), held)
            unc_d = max(n - held * bs, 1)
            if local_ok(unc_d, n):
                t = (d.queued_prefill_tokens + unc_d) / d.prefill_rate_tps
                local.append(_Tie(t + weight * pressure, None, d, t, 0.0, pressure))
                continue
            if kept != held:
                pressure = self._pressure(view, d, busiest.get(d.worker), kept)
            moved = max(blocks - kept, 0)
            for best_t, members in domains:
                h = handoff_seconds(self.fleet, members[0][0], d, moved)
                rows.append((best_t + h + weight * pressure, d, members, h, pressure))
        costs = [c.cost for c in local] + [r[0] for r in rows]
        if not costs:
            return [], None
        limit = min(costs) + tol
        aff = view.affinity
        aff_p, aff_d = (None, None) if aff is None else (aff.prefill, aff.decode)
        ties = [
            ((-(int(c.decode.worker == aff_d) + int(aff_p is None)) if aff else 0,
              c.decode.queued_prefill_tokens / c.decode.prefill_rate_tps + c.pressure,
              False, ("", -1), c.decode.worker), c)
            for c in local if c.cost <= limit
        ]
        top = max((k[0] for k, _ in ties), default=None)
        # A row's candidates share its decode: only its best one can win, so only that one becomes
        # a `_Tie`; the most negated shared count over all of them is kept for the reason.
        for cost, d, members, h, pressure in rows:
            if cost <= limit:
                extra, dw = h + weight * pressure, d.worker
                if aff is None:
                    cands = [((0, load + pressure, True, p.worker, dw), p, t)
                             for p, t, load in members if t + extra <= limit]
                else:
                    base = int(dw == aff_d)
                    cands = [((-(base + int(p.worker == aff_p)), load + pressure, True, p.worker, dw), p, t)
                             for p, t, load in members if t + extra <= limit]
                if not cands:  # the row's cost adds in another order: it may round past the limit
                    continue
                key, p, t = min(cands, key=itemgetter(0))
                ties.append((key, _Tie(t + extra, p, d, t, h, pressure)))
                row_top = max(c[0][0] for c in cands) if aff is not None else 0
                top = row_top if top is None else max(top, row_top)
        return ties, top

    def _refusal(self, view: RoutingView, decodes: tuple[WorkerState, ...], open_decodes: list) -> Refusal:
        rid = view.request.request_id
        if not decodes:
            return Refusal(rid, RefusalReason.NO_WORKERS, "no decode worker is registered")
        if not open_decodes:
            return Refusal(
                rid, RefusalReason.QUEUES_FULL, f"all {len(decodes)} decode workers are at a limit"
            )
        prefills = view.of_role(Role.PREFILL)
        if not prefills:
            return Refusal(
                rid,
                RefusalReason.NO_WORKERS,
                "no prefill worker is registered and no admitting decode worker may prefill this prompt "
                f"locally ({self.fleet.disagg})",
            )
        return Refusal(
            rid,
            RefusalReason.QUEUES_FULL,
            f"all {len(prefills)} prefill workers are at a limit and no admitting decode worker may "
            f"prefill this prompt locally ({self.fleet.disagg})",
        )

    def choose(self, view: RoutingView) -> RouteOutcome:
        """The cheapest admitting candidate (module formula), or a refusal naming what is full or missing."""
        decodes = view.of_role(Role.DECODE)
        open_decodes = [d for d in decodes if d.admits]
        open_prefills = [p for p in view.of_role(Role.PREFILL) if p.admits]
        ties, top = self._ties(view, open_decodes, open_prefills)
        if not ties:
            return self._refusal(view, decodes, open_decodes)
        # the winner: fewest negated shared workers, then least load (prefiller's queued seconds
        # plus decode pressure), then local before remote, then the lowest (prefill, decode) ids
        best_key, pick = min(ties, key=itemgetter(0))
        n, bs = view.request.prompt_tokens, self.fleet.block_size
        if pick.prefill is None:
            held = view.matched_blocks(pick.decode.worker)
            alloc = transfer_blocks(n, held, bs)
            reason, cached, moved = Reason.LOCAL_PREFILL, held, 0
        else:
            held = view.held_blocks(pick.decode.worker)
            alloc = transfer_blocks(n, held, bs)
            cached, moved = view.matched_blocks(pick.prefill.worker), alloc
            if best_key[0] < top:  # fewer negated shared = more shared than some other tie
                reason = Reason.SESSION_AFFINITY
            elif cached > 0 or held > 0:
                reason = Reason.PREFIX_HIT
            else:
                reason = Reason.LEAST_LOAD
        return RouteDecision(
            request_id=view.request.request_id,
            prefill=None if pick.prefill is None else pick.prefill.worker,
            decode=pick.decode.worker,
            reason=reason,
            expected_ttft_s=pick.ttft_s,
            expected_handoff_s=pick.handoff_s,
            prefill_cached_blocks=cached,
            decode_cached_blocks=held,
            uncached_tokens=uncached_tokens(n, cached, bs),
            transfer_blocks=moved,
            decode_alloc_blocks=alloc,
        )
