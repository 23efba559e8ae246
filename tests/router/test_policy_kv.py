"""Tandem's `kv` policy on hand-made situations, each expected answer computed by hand below.

Fleet used throughout: 1 MB of KV per 256-token block; NVLink 100 GB/s with no latency inside a
domain, RDMA 10 GB/s + 1 ms across; conditional disaggregation at 2048 tokens / 0.7; policy
defaults w_kv = w_running = 1, w_dp = 0.5, reuse 1, 0.5 s per unit of pressure, ties within 1 ms.
The prompt is 40 full blocks (10,240 tokens) unless a test says otherwise.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.router.decision import Reason, Refusal, RefusalReason, RouteDecision
from orchestrator.router.inputs import (
    DisaggMode,
    DisaggThresholds,
    FleetParams,
    Link,
    Role,
    RouteRequest,
    Topology,
    WorkerId,
    WorkerState,
)
from orchestrator.router.policy import PolicyName
from orchestrator.router.policy_kv import KvPolicy
from orchestrator.router.router import Router
from orchestrator.router.view import RoutingView, WorkerPair

pytestmark = pytest.mark.router

MB = 1_000_000
FLEET = FleetParams(kv_bytes_per_block=MB, topology=Topology(Link(100e9, 0.0), Link(10e9, 1e-3)))
N = 40 * 256


def P(name: str, domain: str = "r0", rate: float = 10_000.0, **kw: int) -> WorkerState:  # noqa: N802
    kw.setdefault("queue_limit", 4)
    return WorkerState(WorkerId(name), Role.PREFILL, domain, rate, **kw)


def D(name: str, domain: str = "r0", rate: float = 5_000.0, rank: int = 0, **kw: int) -> WorkerState:  # noqa: N802
    kw = {"kv_blocks_total": 1000, "max_running_requests": 8, "queue_limit": 4} | kw
    return WorkerState(WorkerId(name, rank), Role.DECODE, domain, rate, **kw)


def req(rid: str = "r", tokens: int = N, session: str | None = None) -> RouteRequest:
    return RouteRequest(rid, tokens, tuple(range(1, tokens // 256 + 1)), session)


def choose(
    workers: list[WorkerState],
    matches: dict | None = None,
    fleet: FleetParams = FLEET,
    request: RouteRequest | None = None,
    affinity: WorkerPair | None = None,
) -> RouteDecision | Refusal:
    view = RoutingView(
        request or req(),
        tuple(sorted(workers, key=lambda w: w.worker)),
        matches or {},
        fleet,
        affinity=affinity,
    )
    return KvPolicy(fleet).choose(view)


def test_hot_prefix_goes_to_the_prefill_that_holds_it() -> None:
    # p1 holds 32 blocks: ttft(p1) = (10240 - 8192) / 1e4 = 0.2048 s; p0: 10240 / 1e4 = 1.024 s.
    # Handoff: 40 MB / 100 GB/s = 0.4 ms. pressure(d) = 40/1000 + 1/8 = 0.165 -> 0.0825 s.
    got = choose([P("p0"), P("p1"), D("d")], {WorkerId("p1"): 32})
    assert isinstance(got, RouteDecision)
    assert (got.prefill, got.decode, got.reason) == (WorkerId("p1"), WorkerId("d"), Reason.PREFIX_HIT)
    assert got.expected_ttft_s == pytest.approx(0.2048)
    assert got.expected_handoff_s == pytest.approx(0.0004)
    assert (got.prefill_cached_blocks, got.uncached_tokens, got.transfer_blocks) == (32, 2048, 40)


@pytest.mark.parametrize(("queued", "want"), [(5_000, "p1"), (12_000, "p0")])
def test_overloaded_owner_loses_only_when_its_queue_outweighs_the_hit(queued: int, want: str) -> None:
    # ttft(p1) = (queued + 2048) / 1e4: 0.7048 s (< 1.024: still p1) or 1.4048 s (> 1.024: p0).
    got = choose([P("p0"), P("p1", queued_prefill_tokens=queued), D("d")], {WorkerId("p1"): 32})
    assert got.prefill == WorkerId(want)
    assert got.reason is (Reason.PREFIX_HIT if want == "p1" else Reason.LEAST_LOAD)
    assert got.expected_ttft_s == pytest.approx(0.7048 if want == "p1" else 1.024)


@pytest.mark.parametrize(("queued", "want", "handoff"), [(20, "near", 0.0004), (100, "far", 0.005)])
def test_cross_rack_transfer_is_charged(queued: int, want: str, handoff: float) -> None:
    # The decode sits in r1. far (r0): 1.024 s + RDMA 1 ms + 40 MB / 10 GB/s = 1.029 s.
    # near (r1) with `queued` tokens ahead: (queued + 10240) / 1e4 + 0.4 ms: 1.0264 s (20) or 1.0344 s (100).
    got = choose([P("far", "r0"), P("near", "r1", queued_prefill_tokens=queued), D("d", "r1")])
    assert got.prefill == WorkerId(want)
    assert got.expected_handoff_s == pytest.approx(handoff)


def test_decode_that_already_holds_the_prefix_receives_only_the_rest() -> None:
    # d1 holds 30 blocks: 10 move (0.1 ms) and kv = (40 - 30) / 1000: pressure 0.135 vs 0.165.
    got = choose([P("p"), D("d0"), D("d1")], {WorkerId("d1"): 30})
    assert (got.decode, got.transfer_blocks, got.decode_alloc_blocks) == (WorkerId("d1"), 10, 10)
    assert got.expected_handoff_s == pytest.approx(0.0001)
    assert got.reason is Reason.PREFIX_HIT


def test_dp_rank_balance_charges_the_raise_of_the_busiest_rank() -> None:
    ranks = [D("d", rank=0, running_requests=4), D("d", rank=1, running_requests=1)]
    view = RoutingView(req(), tuple(ranks), {}, FLEET)
    policy = KvPolicy(FLEET)
    # rank 0: 0.04 + 5/8 + 0.5 * (5 - 1)/8 = 0.915; rank 1: 0.04 + 2/8 + 0.5 * max(2 - 4, 0)/8 = 0.29.
    assert policy.pressure(view, ranks[0]) == pytest.approx(0.915)
    assert policy.pressure(view, ranks[1]) == pytest.approx(0.29)
    assert choose([P("p"), *ranks]).decode == WorkerId("d", 1)


def test_equal_costs_go_to_the_session_then_to_the_least_loaded_never_by_chance() -> None:
    workers = [P("p"), D("d0"), D("d1")]
    assert choose(workers).decode == WorkerId("d0")  # exact tie: lowest id
    got = choose(workers, affinity=WorkerPair(WorkerId("p"), WorkerId("d1")))
    assert (got.decode, got.reason) == (WorkerId("d1"), Reason.SESSION_AFFINITY)
    # Costs equal, loads not: "a" queues 10240 tokens at twice the rate, (10240 + 10240) / 2e4 =
    # 1.024 s, the same TTFT as idle "z" (10240 / 1e4), but 0.512 s of queue: "z" wins although
    # "a" has the lower id.
    got = choose([P("a", rate=20_000.0, queued_prefill_tokens=10_240), P("z"), D("d")])
    assert (got.prefill, got.reason) == (WorkerId("z"), Reason.LEAST_LOAD)


def test_router_keeps_a_conversation_on_its_pair_across_turns() -> None:
    router = Router.named(PolicyName.KV, FLEET)
    first = router.route(
        req("t1", session="s"), [P("p"), D("d0", running_requests=1), D("d1")], {}, now_s=0.0
    )
    assert first.decode == WorkerId("d1")  # d0 is busier
    router.finish("t1")
    equal = [P("p"), D("d0", running_requests=1), D("d1", running_requests=1)]
    other = router.route(req("t2", session="other"), equal, {}, now_s=1.0)
    assert (other.decode, other.reason) == (WorkerId("d0"), Reason.LEAST_LOAD)  # no history: lowest id
    router.finish("t2")
    again = router.route(req("t3", session="s"), equal, {}, now_s=2.0)
    assert (again.decode, again.reason) == (WorkerId("d1"), Reason.SESSION_AFFINITY)


def test_short_uncached_part_is_prefilled_on_the_decode() -> None:
    # d0 holds 36 blocks: 1024 uncached < 2048 and 1024 / 10240 = 0.1 < 0.7 -> local candidate,
    # cost 1024 / 5000 + 0.5 * (4/1000 + 1/8) = 0.2693 s; the best remote pair (p, d1) costs
    # 1.024 + 0.0004 + 0.0825 = 1.1069 s.
    got = choose([P("p"), D("d0"), D("d1")], {WorkerId("d0"): 36})
    assert (got.prefill, got.decode, got.reason) == (None, WorkerId("d0"), Reason.LOCAL_PREFILL)
    assert got.expected_ttft_s == pytest.approx(0.2048)
    assert (got.expected_handoff_s, got.transfer_blocks, got.decode_alloc_blocks) == (0.0, 0, 4)


def test_disaggregation_modes() -> None:
    short = req(tokens=1000)  # 3 full blocks; nothing cached: 1000 / 1000 >= 0.7 -> not local
    assert choose([P("p"), D("d")], request=short).prefill == WorkerId("p")
    never = FleetParams(MB, FLEET.topology, DisaggThresholds(mode=DisaggMode.NEVER))
    assert choose([P("p"), D("d")], fleet=never).prefill is None
    always = FleetParams(MB, FLEET.topology, DisaggThresholds(mode=DisaggMode.ALWAYS))
    assert choose([P("p"), D("d")], {WorkerId("d"): 36}, fleet=always).prefill == WorkerId("p")
    with pytest.raises(ValueError, match="max_local_uncached_fraction = 1.5"):
        DisaggThresholds(max_local_uncached_fraction=1.5)


def test_admission_refuses_at_once_when_every_worker_is_full() -> None:
    full_p = P("p", queue_length=4)
    full_d = D("d", queue_length=4)
    got = choose([full_p, full_d])
    assert isinstance(got, Refusal) and got.reason is RefusalReason.QUEUES_FULL
    assert "decode" in got.detail
    # Prefills full: a decode that may prefill locally still takes the request ...
    got = choose([full_p, D("d")], {WorkerId("d"): 36})
    assert got.prefill is None
    # ... one that may not is refused, naming the prefills.
    got = choose([full_p, D("d")])
    assert got.reason is RefusalReason.QUEUES_FULL and "prefill" in got.detail
    # The prefill-token limit counts too; a decode past its batch slots waits (counts as queued).
    assert not P("p", queued_prefill_tokens=100, max_queued_prefill_tokens=100).admits
    assert not D("d", running_requests=12, queue_length=0).admits  # 12 - 8 = 4 waiting = limit
    got = choose([D("d")])
    assert got.reason is RefusalReason.NO_WORKERS and "no prefill worker" in got.detail
    assert choose([P("p")]).reason is RefusalReason.NO_WORKERS


# -- the optimised search against a brute-force spelling of the module formula --


def brute_force(workers: list[WorkerState], matches: dict, request: RouteRequest, aff: WorkerPair | None):
    """Every candidate costed from scratch, straight from the policy's docstring."""
    n, b = request.prompt_tokens, -(-request.prompt_tokens // 256)
    disagg = FLEET.disagg

    def held(w: WorkerState) -> int:
        return matches.get(w.worker, 0)

    def unc(w: WorkerState) -> int:
        return max(n - 256 * held(w), 1)

    def ttft(w: WorkerState) -> float:
        return (w.queued_prefill_tokens + unc(w)) / w.prefill_rate_tps

    def pressure(d: WorkerState) -> float:
        others = [
            w.running_requests
            for w in workers
            if w.role is Role.DECODE and w.worker.instance == d.worker.instance and w.worker != d.worker
        ]
        dp = max(d.running_requests + 1 - max(others), 0) / d.max_running_requests if others else 0.0
        return (
            (d.kv_blocks_used + b - held(d)) / d.kv_blocks_total
            + (d.running_requests + 1) / d.max_running_requests
            + 0.5 * dp
        )

    cands = []
    for d in (w for w in workers if w.role is Role.DECODE and w.admits):
        if unc(d) < disagg.max_local_prefill_tokens and unc(d) < disagg.max_local_uncached_fraction * n:
            cands.append((ttft(d) + 0.5 * pressure(d), None, d, d.queued_prefill_tokens / d.prefill_rate_tps))
            continue
        for p in (w for w in workers if w.role is Role.PREFILL and w.admits):
            link = (
                FLEET.topology.intra_domain
                if p.nvlink_domain == d.nvlink_domain
                else FLEET.topology.cross_domain
            )
            moved = b - held(d)
            h = link.latency_s + moved * MB / link.bandwidth_bytes_per_s if moved else 0.0
            cands.append(
                (ttft(p) + h + 0.5 * pressure(d), p, d, p.queued_prefill_tokens / p.prefill_rate_tps)
            )
    if not cands:
        return None
    best = min(c[0] for c in cands)
    ties = [c for c in cands if c[0] <= best + 1e-3]

    def shared(c: tuple) -> int:
        pw = None if c[1] is None else c[1].worker
        return 0 if aff is None else int(c[2].worker == aff.decode) + int(pw == aff.prefill)

    def key(c: tuple) -> tuple:
        pw = None if c[1] is None else c[1].worker
        return (-shared(c), c[3] + pressure(c[2]), pw is not None, pw or ("", -1), c[2].worker)

    win = min(ties, key=key)
    if win[1] is None:
        reason = Reason.LOCAL_PREFILL
    elif shared(win) > min(shared(c) for c in ties):  # the session's pair beat a tie
        reason = Reason.SESSION_AFFINITY
    elif held(win[1]) > 0 or held(win[2]) > 0:
        reason = Reason.PREFIX_HIT
    else:
        reason = Reason.LEAST_LOAD
    return (*win, reason)


settings_kw = {"derandomize": True, "max_examples": 150, "deadline": None}


@st.composite
def situations(draw: st.DrawFn) -> tuple:
    workers = []
    for i in range(draw(st.integers(1, 4))):
        workers.append(
            P(
                f"p{i}",
                draw(st.sampled_from(["r0", "r1"])),
                draw(st.sampled_from([5e3, 1e4, 2e4])),
                queued_prefill_tokens=draw(st.sampled_from([0, 0, 2048, 9000])),
                queue_length=draw(st.sampled_from([0, 0, 0, 4])),
            )
        )
    for i in range(draw(st.integers(1, 2))):
        for r in range(draw(st.integers(1, 3))):
            workers.append(
                D(
                    f"d{i}",
                    draw(st.sampled_from(["r0", "r1"])),
                    rank=r,
                    running_requests=draw(st.integers(0, 6)),
                    kv_blocks_used=draw(st.sampled_from([0, 500])),
                    queue_length=draw(st.sampled_from([0, 0, 0, 4])),
                )
            )
    tokens = draw(st.sampled_from([700, 4000, N, 3 * N]))
    matches = {w.worker: draw(st.integers(0, tokens // 256)) for w in workers if draw(st.booleans())}
    aff = None
    if draw(st.booleans()):
        aff = WorkerPair(
            draw(st.sampled_from([None] + [w.worker for w in workers if w.role is Role.PREFILL])),
            draw(st.sampled_from([w.worker for w in workers if w.role is Role.DECODE])),
        )
    return workers, matches, req(tokens=tokens), aff


@settings(**settings_kw)
@given(situations())
def test_choice_equals_brute_force_over_every_candidate(case: tuple) -> None:
    workers, matches, request, aff = case
    got = choose(workers, matches, request=request, affinity=aff)
    want = brute_force(workers, matches, request, aff)
    if want is None:
        assert isinstance(got, Refusal)
        return
    assert isinstance(got, RouteDecision)
    assert (got.prefill, got.decode) == (None if want[1] is None else want[1].worker, want[2].worker)
    assert got.reason is want[4]
    assert got.expected_ttft_s + got.expected_handoff_s == pytest.approx(
        want[0]
        - 0.5
        * KvPolicy(FLEET).pressure(
            RoutingView(request, tuple(sorted(workers, key=lambda w: w.worker)), matches, FLEET), want[2]
        )
    )
