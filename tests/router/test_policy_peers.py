"""The peers' policies, each on hand-computed cases of its published formula at its defaults.

Prompt: 40 full blocks of 256 tokens (10,240 tokens) unless a test says otherwise.
"""

from __future__ import annotations

import pytest

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
from orchestrator.router.policy import POLICIES, PolicyName, make_policy
from orchestrator.router.policy_dynamo import DynamoPolicy
from orchestrator.router.policy_sglang import SglangPolicy
from orchestrator.router.router import Router
from orchestrator.router.view import RoutingView

pytestmark = pytest.mark.router

FLEET = FleetParams(kv_bytes_per_block=1_000_000, topology=Topology(Link(100e9, 0.0), Link(10e9, 1e-3)))
N = 40 * 256


def W(name: str, role: Role, **kw: int) -> WorkerState:  # noqa: N802
    kw = {"kv_blocks_total": 10_000, "max_running_requests": 1000, "queue_limit": 1000} | kw
    return WorkerState(WorkerId(name), role, "r0", 10_000.0, **kw)


def req(rid: str = "r", tokens: int = N) -> RouteRequest:
    return RouteRequest(rid, tokens, tuple(range(1, tokens // 256 + 1)))


def view(
    workers: list[WorkerState],
    matches: dict[str, int] | None = None,
    fleet: FleetParams = FLEET,
    decisions: int = 0,
) -> RoutingView:
    m = {WorkerId(k): v for k, v in (matches or {}).items()}
    return RoutingView(
        req(), tuple(sorted(workers, key=lambda w: w.worker)), m, fleet, decisions_made=decisions
    )


def test_registry_selects_by_enum_and_rejects_strings() -> None:
    assert {p.value for p in PolicyName} == {"kv", "round-robin", "sglang", "dynamo"}
    assert set(POLICIES) == set(PolicyName)
    assert isinstance(make_policy(PolicyName.DYNAMO, FLEET), DynamoPolicy)
    assert isinstance(make_policy(PolicyName("sglang"), FLEET), SglangPolicy)
    with pytest.raises(TypeError, match="'sglang'"):
        make_policy("sglang", FLEET)  # type: ignore[arg-type]


# -- round-robin --


def test_round_robin_cycles_each_side_and_skips_full_workers() -> None:
    router = Router.named(PolicyName.ROUND_ROBIN, FLEET)
    workers = [
        W("p0", Role.PREFILL),
        W("p1", Role.PREFILL),
        W("p2", Role.PREFILL),
        W("d0", Role.DECODE),
        W("d1", Role.DECODE),
    ]
    pairs = []
    for k in range(4):
        got = router.route(req(f"r{k}"), workers, {}, now_s=0.0)
        assert got.reason is Reason.ROUND_ROBIN
        pairs.append((got.prefill.instance, got.decode.instance))
    assert pairs == [("p0", "d0"), ("p1", "d1"), ("p2", "d0"), ("p0", "d1")]
    # Turn 4 starts at p1 (4 mod 3) and d0; p1 is full, so p2.
    workers[1] = W("p1", Role.PREFILL, queue_length=1000)
    got = router.route(req("r4"), workers, {}, now_s=0.0)
    assert (got.prefill, got.decode) == (WorkerId("p2"), WorkerId("d0"))
    full = [W("p0", Role.PREFILL, queue_length=1000), W("d0", Role.DECODE)]
    refused = router.route(req("r5"), full, {}, now_s=0.0)
    assert isinstance(refused, Refusal) and refused.reason is RefusalReason.QUEUES_FULL
    assert router.book.decisions_made == 5  # the refusal booked nothing


# -- sglang: imbalanced iff max - min > 64 and max > 1.5 min; else match / prompt > 0.3 --


def sg(loads: dict[str, int], matches: dict[str, int]) -> tuple[str, Reason]:
    workers = [W(n, Role.PREFILL, running_requests=v) for n, v in loads.items()]
    chosen, reason = SglangPolicy(FLEET).pick(view(workers, matches), workers)
    return chosen.worker.instance, reason


def test_sglang_balanced_with_a_good_match_takes_the_match() -> None:
    # loads 10 / 40: 30 <= 64, balanced; p1 matches 20 blocks: 5120 / 10240 = 0.5 > 0.3.
    assert sg({"p0": 10, "p1": 40}, {"p1": 20}) == ("p1", Reason.PREFIX_HIT)


def test_sglang_weak_match_falls_back_to_least_loaded() -> None:
    # 12 blocks: 3072 / 10240 = 0.3, not > 0.3.
    assert sg({"p0": 10, "p1": 40}, {"p1": 12}) == ("p0", Reason.LEAST_LOAD)
    assert sg({"p0": 10, "p1": 40}, {"p1": 13}) == ("p1", Reason.PREFIX_HIT)  # 0.325


@pytest.mark.parametrize(
    ("lo", "hi", "imbalanced"), [(10, 100, True), (130, 195, False), (110, 175, True), (100, 160, False)]
)
def test_sglang_balance_thresholds_are_exact(lo: int, hi: int, imbalanced: bool) -> None:
    # (130, 195): diff 65 > 64 but 195 = 1.5 * 130, not more. (100, 160): diff 60 <= 64.
    got = sg({"p0": lo, "p1": hi}, {"p1": 40})
    assert got == (("p0", Reason.LOAD_IMBALANCE) if imbalanced else ("p1", Reason.PREFIX_HIT))


def test_sglang_routes_each_side_and_reports_the_prefill_reason() -> None:
    workers = [
        W("p0", Role.PREFILL),
        W("p1", Role.PREFILL),
        W("d0", Role.DECODE, queue_length=3),
        W("d1", Role.DECODE),
    ]
    got = SglangPolicy(FLEET).choose(view(workers, {"p1": 30, "d0": 30}))
    assert isinstance(got, RouteDecision)
    # Prefill: p1 by match (0.75). Decode: d0 matches 0.75 too and loads 3 vs 0 are balanced.
    assert (got.prefill, got.decode, got.reason) == (WorkerId("p1"), WorkerId("d0"), Reason.PREFIX_HIT)
    assert (got.transfer_blocks, got.uncached_tokens) == (10, 2560)


# -- dynamo: cost = max((queued + isl) / 256 - credit, 0) + kv_used + request_blocks --


def test_dynamo_costs_by_hand() -> None:
    workers = [
        W("p0", Role.PREFILL, kv_blocks_used=100),  # 40 + 100 + 40 = 180
        W("p1", Role.PREFILL, queued_prefill_tokens=2560, kv_blocks_used=50),  # (50 - 30) + 50 + 40 = 110
        W("d0", Role.DECODE, kv_blocks_used=200),  # no credit on the decode stage: 40 + 200 + 40 = 280
        W("d1", Role.DECODE, queued_prefill_tokens=2560, kv_blocks_used=150),  # 50 + 150 + 40 = 240
    ]
    v = view(workers, {"p1": 30, "d0": 40})
    policy = DynamoPolicy(FLEET)
    costs = {w.worker.instance: policy.cost(v, w, 1.0 if w.role is Role.PREFILL else 0.0) for w in workers}
    assert costs == {"p0": 180.0, "p1": 110.0, "d0": 280.0, "d1": 240.0}
    got = policy.choose(v)
    assert (got.prefill, got.decode, got.reason) == (WorkerId("p1"), WorkerId("d1"), Reason.PREFIX_HIT)
    assert got.expected_ttft_s == pytest.approx((2560 + 2560) / 10_000)  # shared estimator


def test_dynamo_credit_cannot_go_below_zero_and_ties_take_the_lowest_id() -> None:
    # p0 queued 0, matches all 40 blocks: max(40 - 40, 0) + 0 + 40 = 40. p1 queued 2560 with the
    # same credit: max(50 - 40, 0) + 40 = 50. Two equal decodes: d0 (lowest id).
    workers = [
        W("p1", Role.PREFILL, queued_prefill_tokens=2560),
        W("p0", Role.PREFILL),
        W("d1", Role.DECODE),
        W("d0", Role.DECODE),
    ]
    got = DynamoPolicy(FLEET).choose(view(workers, {"p0": 40, "p1": 40}))
    assert (got.prefill, got.decode) == (WorkerId("p0"), WorkerId("d0"))


def test_dynamo_conditional_disaggregation_on_the_chosen_decode() -> None:
    workers = [W("p", Role.PREFILL), W("d", Role.DECODE)]
    # d holds 36 blocks: 1024 uncached < 2048 and 0.1 < 0.7 -> local; 20 blocks: 5120 -> remote.
    local = DynamoPolicy(FLEET).choose(view(workers, {"d": 36}))
    assert (local.prefill, local.reason, local.expected_ttft_s) == (None, Reason.LOCAL_PREFILL, 0.1024)
    remote = DynamoPolicy(FLEET).choose(view(workers, {"d": 20}))
    assert remote.prefill == WorkerId("p")
    never = FleetParams(FLEET.kv_bytes_per_block, FLEET.topology, DisaggThresholds(mode=DisaggMode.NEVER))
    assert DynamoPolicy(never).choose(view(workers, fleet=never)).prefill is None
    refused = DynamoPolicy(FLEET).choose(view([W("d", Role.DECODE)], {"d": 20}))
    assert refused.reason is RefusalReason.NO_WORKERS
