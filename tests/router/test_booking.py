"""The load book and the Router: consecutive decisions see each other; reports are not double counted."""

from __future__ import annotations

import pytest

from orchestrator.router.booking import LoadBook
from orchestrator.router.decision import Reason, RouteDecision
from orchestrator.router.inputs import FleetParams, Link, Role, RouteRequest, Topology, WorkerId, WorkerState
from orchestrator.router.policy import PolicyName
from orchestrator.router.router import Router

pytestmark = pytest.mark.router

FLEET = FleetParams(kv_bytes_per_block=1_000_000, topology=Topology(Link(100e9, 0.0), Link(10e9, 1e-3)))
N = 40 * 256


def P(name: str, at: float = 0.0, **kw: int) -> WorkerState:  # noqa: N802
    return WorkerState(WorkerId(name), Role.PREFILL, "r0", 10_000.0, queue_limit=2, reported_at_s=at, **kw)


def D(name: str, at: float = 0.0, **kw: int) -> WorkerState:  # noqa: N802
    kw = {"kv_blocks_total": 1000, "max_running_requests": 8, "queue_limit": 4} | kw
    return WorkerState(WorkerId(name), Role.DECODE, "r0", 5_000.0, reported_at_s=at, **kw)


def req(rid: str, tokens: int = N) -> RouteRequest:
    return RouteRequest(rid, tokens, tuple(range(1, tokens // 256 + 1)))


def test_a_burst_spreads_because_each_booking_counts_until_released() -> None:
    router = Router.named(PolicyName.KV, FLEET)
    workers = [P("p0"), P("p1"), D("d")]
    first = router.route(req("a"), workers, {}, now_s=1.0)
    second = router.route(req("b"), workers, {}, now_s=1.0)  # same stale reports
    assert (first.prefill, second.prefill) == (WorkerId("p0"), WorkerId("p1"))
    # Both prefills now have one booked request; with queue_limit 2 one more fits on each.
    third = router.route(req("c"), workers, {}, now_s=1.0)
    assert third.prefill == WorkerId("p0") and third.expected_ttft_s == pytest.approx(2 * 1.024)
    router.route(req("d"), workers, {}, now_s=1.0)
    refused = router.route(req("e"), workers, {}, now_s=1.0)
    assert refused.reason.value == "queues_full"
    router.prefill_done("a")  # the first token of "a" is back: p0 has room again
    again = router.route(req("e"), workers, {}, now_s=1.0)
    assert again.prefill == WorkerId("p0") and again.expected_ttft_s == pytest.approx(2 * 1.024)


def test_fold_adds_only_bookings_newer_than_the_report_and_forgets_reported_ones() -> None:
    book = LoadBook()
    decision = RouteDecision(
        "a", WorkerId("p"), WorkerId("d"), Reason.LEAST_LOAD, 1.0, 0.0, 0, 0, 3000, 12, 12
    )
    book.book(decision, session_id=None, now_s=5.0)
    older = book.fold([P("p", at=4.0), D("d", at=4.0)])
    assert (older[0].queued_prefill_tokens, older[0].queue_length) == (0, 0)  # sorted: d first
    assert (older[0].kv_blocks_used, older[0].running_requests) == (12, 1)
    assert (older[1].queued_prefill_tokens, older[1].queue_length) == (3000, 1)
    assert len(book) == 1
    newer = book.fold([P("p", at=6.0, queued_prefill_tokens=3000), D("d", at=6.0, kv_blocks_used=12)])
    assert newer[1].queued_prefill_tokens == 3000 and newer[0].kv_blocks_used == 12  # not doubled
    assert len(book) == 0  # both reports carry it now
    book.finish("a")  # an id no longer tracked: nothing to release


def test_local_prefill_books_both_loads_on_the_decode() -> None:
    book = LoadBook()
    decision = RouteDecision("a", None, WorkerId("d"), Reason.LOCAL_PREFILL, 0.2, 0.0, 36, 36, 1024, 0, 4)
    book.book(decision, session_id="s", now_s=0.0)
    (d,) = book.fold([D("d")])
    assert (d.queued_prefill_tokens, d.queue_length, d.kv_blocks_used, d.running_requests) == (1024, 1, 4, 1)
    book.prefill_done("a")
    (d,) = book.fold([D("d")])
    assert (d.queued_prefill_tokens, d.queue_length, d.kv_blocks_used, d.running_requests) == (0, 0, 4, 1)
    assert book.affinity("s").decode == WorkerId("d") and book.affinity(None) is None
    with pytest.raises(ValueError, match="'a' is already booked"):
        book.book(decision, session_id=None, now_s=0.0)


def test_session_memory_is_bounded_least_recent_first() -> None:
    book = LoadBook(max_sessions=2)
    for i, s in enumerate(["s1", "s2", "s1", "s3"]):
        d = RouteDecision(f"r{i}", None, WorkerId(f"d{i}"), Reason.LOCAL_PREFILL, 0.0, 0.0, 0, 0, 1, 0, 0)
        book.book(d, session_id=s, now_s=0.0)
    assert book.affinity("s2") is None  # s1 was used again after s2
    assert book.affinity("s1").decode == WorkerId("d2") and book.affinity("s3").decode == WorkerId("d3")


def test_route_rejects_inconsistent_inputs_naming_the_field() -> None:
    router = Router.named(PolicyName.KV, FLEET)
    with pytest.raises(
        ValueError, match=r"block_hashes has 3 hashes; 10240 prompt tokens make 40 full blocks"
    ):
        router.route(RouteRequest("x", N, (1, 2, 3)), [P("p"), D("d")], {}, now_s=0.0)
    with pytest.raises(ValueError, match=r"matches\[p/0\] = 41"):
        router.route(req("y"), [P("p"), D("d")], {WorkerId("p"): 41}, now_s=0.0)
    with pytest.raises(ValueError, match=r"prefill_rate_tps = 0"):
        WorkerState(WorkerId("w"), Role.DECODE, "r0", 0)
    with pytest.raises(ValueError, match=r"WorkerId.dp_rank = -1"):
        WorkerId("w", -1)
