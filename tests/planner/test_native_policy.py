"""The native policies (orchestrator/planner/native/policy.c) decide exactly as the router's Python
policies: thousands of random fleets per policy and disaggregation mode, many built to tie (equal
rates, loads and costs, costs within the tolerance), each routed by a fresh `Router.route` and by
`ts_route`, compared on (prefill, decode, uncached tokens) or both refusing. The tie statistics
are asserted too, so the tie-breaks are proven exercised, not just possibly reached."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from orchestrator.planner.native.lib import load
from orchestrator.planner.native.policy_params import (
    LOCAL_PREFILL,
    TsChoice,
    policy_struct,
    request_view,
    route,
    worker_struct,
)
from orchestrator.router.decision import Reason, RouteDecision
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
from orchestrator.router.policy import PolicyName, RoutingPolicy
from orchestrator.router.policy_dynamo import DynamoParams, DynamoPolicy
from orchestrator.router.policy_kv import KvParams, KvPolicy
from orchestrator.router.policy_round_robin import RoundRobinPolicy
from orchestrator.router.policy_sglang import SglangParams, SglangPolicy, sglang_load
from orchestrator.router.router import Router
from orchestrator.router.view import RoutingView, WorkerPair

pytestmark = pytest.mark.planner

CASES = {PolicyName.KV: 2500, PolicyName.ROUND_ROBIN: 600, PolicyName.SGLANG: 1200, PolicyName.DYNAMO: 1200}


@pytest.fixture(scope="module")
def lib():
    return load()


@dataclass(frozen=True)
class Case:
    """One random situation: a fleet, its workers (WorkerId order) and one request against them."""

    fleet: FleetParams
    states: tuple[WorkerState, ...]
    prompt_tokens: int
    matches: dict[WorkerId, int]
    held: dict[WorkerId, int] | None
    affinity: WorkerPair | None
    decisions_made: int
    tied: bool  # built from few distinct values, so that costs and loads coincide


def _fleet(rng: random.Random, mode: DisaggMode, tied: bool) -> FleetParams:
    if tied:
        intra, cross = Link(1e9, 0.0), Link(1e9, 0.0) if rng.random() < 0.5 else Link(5e8, 1e-3)
    else:
        intra = Link(rng.uniform(1e8, 1e10), rng.choice([0.0, rng.uniform(0, 1e-3)]))
        cross = Link(rng.uniform(1e7, 1e9), rng.uniform(0, 5e-3))
    return FleetParams(
        kv_bytes_per_block=rng.choice([1, 4096, 1 << 20, 3_000_000]),
        topology=Topology(intra, cross),
        disagg=DisaggThresholds(mode, rng.choice([0, 64, 512, 2048, 100_000]), rng.choice([0.0, 0.3, 0.7, 1.0])),
        block_size=rng.choice([1, 16, 64, 256]),
    )


def _state(rng: random.Random, wid: WorkerId, role: Role, domains: list[str], tied: bool) -> WorkerState:
    max_running, queue_limit = rng.choice([1, 4, 64]), rng.choice([1, 3, 16])
    max_queued = rng.choice([1, 2048, 1 << 20])
    # loads cluster at the admission limits: just under, at, and (running) past them
    running = max(max_running + rng.choice([-2, -1, 0, 1]), 0) if rng.random() < 0.4 else rng.randrange(3)
    queue = max(queue_limit + rng.choice([-1, 0]), 0) if rng.random() < 0.3 else 0
    queued = max(max_queued + rng.choice([-1, 0]), 0) if rng.random() < 0.15 else None
    if tied:
        rate, kv_total = rng.choice([1000.0, 2000.0]), 1000
        queued = queued if queued is not None else rng.choice([0, 0, 512])
        kv_used = rng.choice([0, 100])
    else:
        rate, kv_total = rng.uniform(100.0, 50_000.0), rng.randint(1, 5000)
        queued = queued if queued is not None else rng.randrange(0, min(max_queued, 200_000))
        kv_used = rng.randint(0, kv_total)
    return WorkerState(wid, role, rng.choice(domains), rate, queued, kv_used, kv_total, running, max_running,
                       queue, queue_limit, max_queued)


def _case(rng: random.Random, mode: DisaggMode) -> Case:
    tied = rng.random() < 0.5
    fleet = _fleet(rng, mode, tied)
    domains = ["nvl-a", "nvl-b", "local", "z"][: rng.randint(1, 4)]
    n_pre = 0 if rng.random() < 0.03 else rng.randint(1, 12)
    n_dec = 0 if rng.random() < 0.02 else rng.randint(1, 10)
    names = rng.sample(range(1000), n_pre + n_dec)  # random names: the roles interleave in WorkerId order
    roles = [Role.PREFILL] * n_pre + [Role.DECODE] * n_dec
    made = (_state(rng, WorkerId(f"w{k}"), role, domains, tied) for k, role in zip(names, roles, strict=True))
    states = tuple(sorted(made, key=lambda w: w.worker))
    bs = fleet.block_size
    prompt = rng.choice([1, bs, 3 * bs, rng.randint(1, 5000), rng.randint(1, 60_000)])
    full = prompt // bs
    matches, held = {}, {}
    shared = rng.randint(0, full)  # tied fleets: many workers hold the same prefix
    for w in states:
        if rng.random() < 0.7:
            m = shared if tied and rng.random() < 0.6 else rng.randint(0, full)
            matches[w.worker] = m
            if rng.random() < 0.5:
                held[w.worker] = rng.randint(m, full)
    affinity = None
    if states and rng.random() < 0.6:
        gone = WorkerId("gone")  # a pair whose worker left the fleet matches nobody
        ids = [w.worker for w in states]
        affinity = WorkerPair(rng.choice([None, gone, *ids]), rng.choice([gone, *ids]))
    return Case(fleet, states, prompt, matches, held or None, affinity, rng.randrange(0, 10**6), tied)


def _policy(name: PolicyName, rng: random.Random, fleet: FleetParams) -> RoutingPolicy:
    if name is PolicyName.KV:
        return KvPolicy(fleet, KvParams(
            w_kv=rng.choice([0.0, 1.0, rng.random()]), w_running=rng.choice([0.0, 1.0, rng.random()]),
            w_dp=rng.choice([0.0, 0.5]), reuse_credit=rng.choice([0.0, 1.0, rng.random()]),
            decode_load_weight_s=rng.choice([0.0, 0.5, rng.uniform(0, 5)]),
            tie_tolerance_s=rng.choice([0.0, 1e-3, 0.05, 1.0, 100.0])))
    if name is PolicyName.SGLANG:
        return SglangPolicy(fleet, SglangParams(rng.choice([0.0, 0.3, 0.9]), rng.choice([0, 1, 2, 64]),
                                                rng.choice([1.0, 1.5, 3.0])))
    if name is PolicyName.DYNAMO:
        return DynamoPolicy(fleet, DynamoParams(rng.choice([0.0, 0.5, 1.0, 3.0]), rng.choice([0.0, 1.0, 2.5])))
    return RoundRobinPolicy(fleet)


def _python(policy: RoutingPolicy, case: Case) -> tuple[int, int, int] | str:
    """Router.route of a fresh router whose book holds exactly the case's affinity and counter."""
    router = Router(policy, case.fleet)
    if case.affinity is not None:  # booked before every report: it sets the session, folds no load
        router.book.book(RouteDecision("prior", case.affinity.prefill, case.affinity.decode, Reason.LEAST_LOAD,
                                       0.0, 0.0, 0, 0, 1, 0, 0), "s", -1.0)
    router.book.decisions_made = case.decisions_made
    hashes = tuple(range(case.prompt_tokens // case.fleet.block_size))
    out = router.route(RouteRequest("r", case.prompt_tokens, hashes, "s"), case.states, case.matches, 0.0,
                       held=case.held)
    if not isinstance(out, RouteDecision):
        return "refused"
    index = {w.worker: i for i, w in enumerate(case.states)}
    return (LOCAL_PREFILL if out.prefill is None else index[out.prefill], index[out.decode], out.uncached_tokens)


def _native(lib, name: PolicyName, policy: RoutingPolicy, case: Case) -> tuple[int, int, int] | str:
    view = request_view(case.states, case.prompt_tokens, case.fleet.block_size, case.matches, case.held,
                        case.affinity, case.decisions_made)
    out: TsChoice = route(lib, policy_struct(name, case.fleet, policy), worker_struct(case.states), view)
    return "refused" if out.refused else (out.prefill, out.decode, out.uncached_tokens)


def _view(case: Case) -> RoutingView:
    return RoutingView(RouteRequest("r", case.prompt_tokens), case.states, case.matches, case.fleet, case.affinity,
                       case.decisions_made, held=case.held or {})


_KEY_PARTS = ("affinity", "load", "local before remote", "prefill id", "decode id")


def _tie_stats(policy: RoutingPolicy, case: Case, stats: Counter) -> None:
    """What decided the case among equals (Python's own intermediate values, for the evidence)."""
    view = _view(case)
    open_ = {r: [w for w in view.of_role(r) if w.admits] for r in Role}
    if isinstance(policy, KvPolicy):
        ties, _ = policy._ties(view, open_[Role.DECODE], open_[Role.PREFILL])
        if len(ties) >= 2:
            stats["ties >= 2 candidates"] += 1
            keys = sorted(k for k, _ in ties)
            first_diff = next(i for i in range(5) if keys[0][i] != keys[1][i])
            stats[f"decided by {_KEY_PARTS[first_diff]}"] += 1
            if len({t.cost for _, t in ties}) < len(ties):
                stats["exactly equal costs"] += 1
    elif isinstance(policy, DynamoPolicy):
        for role, weight in ((Role.DECODE, 0.0), (Role.PREFILL, policy.params.overlap_weight)):
            costs = sorted(policy.cost(view, w, weight) for w in open_[role])
            if len(costs) >= 2 and costs[0] == costs[1]:
                stats[f"equal least {role.value} cost"] += 1
    elif isinstance(policy, SglangPolicy):
        for role in Role:
            loads = sorted(sglang_load(w) for w in open_[role])
            if len(loads) >= 2 and loads[0] == loads[1]:
                stats[f"equal least {role.value} load"] += 1
    else:
        for role in Role:
            all_ = view.of_role(role)
            if all_ and open_[role] and not all_[case.decisions_made % len(all_)].admits:
                stats[f"{role.value} turn skips a full worker"] += 1


@pytest.mark.parametrize("mode", list(DisaggMode), ids=lambda m: m.value)
@pytest.mark.parametrize("name", list(PolicyName), ids=lambda n: n.value)
def test_native_routes_exactly_as_python(lib, name: PolicyName, mode: DisaggMode) -> None:
    rng = random.Random(f"{name.value}-{mode.value}")
    stats: Counter = Counter()
    for i in range(CASES[name]):
        case = _case(rng, mode)
        policy = _policy(name, rng, case.fleet)
        want, got = _python(policy, case), _native(lib, name, policy, case)
        assert got == want, f"case {i}: native {got} != python {want}\n{case}\n{policy.__dict__}"
        stats["refused" if want == "refused" else "routed"] += 1
        if want != "refused" and want[0] == LOCAL_PREFILL:
            stats["local prefill"] += 1
        _tie_stats(policy, case, stats)
    print(name.value, mode.value, dict(stats))
    assert stats["routed"] > CASES[name] // 3 and stats["refused"] > 0
    if name is PolicyName.KV:
        assert stats["exactly equal costs"] > 20
        deciders = ["affinity", "load", "decode id"]  # NEVER: local candidates only
        if mode is not DisaggMode.NEVER:
            deciders.append("prefill id")
        if mode is DisaggMode.CONDITIONAL:
            deciders.append("local before remote")
        for part in deciders:
            assert stats[f"decided by {part}"] > 0, (part, stats)
    elif name is PolicyName.DYNAMO:
        assert stats["equal least decode cost"] > 20
    elif name is PolicyName.SGLANG:
        assert stats["equal least decode load"] > 20
    else:
        assert stats["decode turn skips a full worker"] > 0
    if mode is DisaggMode.NEVER:
        assert stats["local prefill"] == stats["routed"]


def _ws(name: str, role: Role, domain: str, rate: float, queued: int = 0, **kw: int) -> WorkerState:
    return WorkerState(WorkerId(name), role, domain, rate, queued, **kw)


def test_kv_zero_tolerance_refuses_when_the_only_pair_rounds_past_its_own_cost(lib) -> None:
    """tie_tolerance_s = 0: the row's cost (0.3 + 0.2) + 0.1 = 0.6 but its member's t + (h + wp) =
    0.3 + 0.30000000000000004 rounds above it, so Python drops the only candidate and refuses; so must C."""
    fleet = FleetParams(kv_bytes_per_block=1, topology=Topology(Link(10.0, 0.0), Link(10.0, 0.0)),
                        disagg=DisaggThresholds(DisaggMode.ALWAYS), block_size=1)
    policy = KvPolicy(fleet, KvParams(w_kv=0.0, w_running=1.0, w_dp=0.5, decode_load_weight_s=0.1,
                                      tie_tolerance_s=0.0))
    states = (_ws("d", Role.DECODE, "x", 1.0), _ws("p", Role.PREFILL, "x", 10.0))
    case = Case(fleet, states, 3, {WorkerId("d"): 1}, None, None, 0, False)  # moved 2 blocks: h = 2 / 10
    assert _python(policy, case) == "refused"
    assert _native(lib, PolicyName.KV, policy, case) == "refused"
    loose = KvPolicy(fleet, KvParams(w_kv=0.0, w_running=1.0, decode_load_weight_s=0.1, tie_tolerance_s=1e-9))
    assert _python(loose, case) == _native(lib, PolicyName.KV, loose, case) == (1, 0, 3)


def test_kv_row_over_the_limit_stays_out_even_when_its_member_sums_under_it(lib) -> None:
    """tie_tolerance_s = 0, limit 0.6 (d1's pair: 0.1 + 0.0 + 0.3 * 5/3). d2's row costs
    (0.1 + 0.2) + 0.3 = 0.6000000000000001 > limit, though its member's 0.1 + (0.2 + 0.3) = 0.6 is
    not: Python skips the whole row, so the less loaded d2 must not win the tie-break."""
    fleet = FleetParams(kv_bytes_per_block=1, topology=Topology(Link(10.0, 0.0), Link(10.0, 0.0)),
                        disagg=DisaggThresholds(DisaggMode.ALWAYS), block_size=1)
    policy = KvPolicy(fleet, KvParams(w_kv=0.0, w_running=1.0, decode_load_weight_s=0.3, tie_tolerance_s=0.0))
    states = (_ws("d1", Role.DECODE, "x", 1.0, running_requests=4, max_running_requests=3, queue_limit=3),
              _ws("d2", Role.DECODE, "x", 1.0), _ws("p", Role.PREFILL, "x", 10.0))
    matches = {WorkerId("d1"): 3, WorkerId("d2"): 1, WorkerId("p"): 2}
    case = Case(fleet, states, 3, matches, None, None, 0, False)
    assert _python(policy, case) == _native(lib, PolicyName.KV, policy, case) == (2, 0, 1)


def test_sglang_match_rate_exactly_at_the_threshold_is_no_hit(lib) -> None:
    """The published rule is `rate > cache_threshold`: 5 of 10 tokens at 0.5 goes to the least
    loaded prefill, 6 of 10 to the matching one."""
    fleet = FleetParams(kv_bytes_per_block=1, topology=Topology(Link(1.0, 0.0), Link(1.0, 0.0)),
                        disagg=DisaggThresholds(DisaggMode.ALWAYS), block_size=1)
    policy = SglangPolicy(fleet, SglangParams(cache_threshold=0.5))
    states = (_ws("d", Role.DECODE, "x", 1.0), _ws("p1", Role.PREFILL, "x", 1.0),
              _ws("p2", Role.PREFILL, "x", 1.0, running_requests=1, max_running_requests=2))
    for matched, want in ((5, (1, 0, 10)), (6, (2, 0, 4))):
        case = Case(fleet, states, 10, {WorkerId("p2"): matched}, None, None, 0, False)
        assert _python(policy, case) == _native(lib, PolicyName.SGLANG, policy, case) == want


def test_glue_rejects_what_the_native_policies_do_not_model() -> None:
    fleet = FleetParams(kv_bytes_per_block=1, topology=Topology(Link(1.0, 0.0), Link(1.0, 0.0)))
    a, b = _ws("a", Role.DECODE, "x", 1.0), _ws("b", Role.PREFILL, "x", 1.0)
    with pytest.raises(ValueError, match=r"states\[1\].*sorted by WorkerId"):
        worker_struct([b, a])
    ranked = WorkerState(WorkerId("a", 1), Role.DECODE, "x", 1.0)
    with pytest.raises(ValueError, match=r"dp_rank = 1"):
        worker_struct([ranked])
    with pytest.raises(ValueError, match=r"at most 256"):
        worker_struct([_ws(f"w{i:03d}", Role.DECODE, "x", 1.0) for i in range(257)])
    with pytest.raises(TypeError, match="SglangPolicy"):
        policy_struct(PolicyName.SGLANG, fleet, Router.named(PolicyName.KV, fleet))
    with pytest.raises(ValueError, match=r"held\[b/0\] = 0: must be in \[matches = 1"):
        request_view([a, b], 600, 256, {WorkerId("b"): 1}, {WorkerId("b"): 0}, None, 0)
    with pytest.raises(ValueError, match=r"matches\[a/0\] = 3"):
        request_view([a, b], 600, 256, {WorkerId("a"): 3}, None, None, 0)
