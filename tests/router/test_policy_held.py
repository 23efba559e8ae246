"""Pulled (held-only) blocks count for a decode's transfer, never for a local prefill.

A decode that pulled a prompt's prefix in a handoff holds those block pages but has no window or
compressor state at their ends: it cannot resume a computation after them. The `kv` policy must
therefore decide conditional disaggregation from resumable blocks only (`KvIndex.match`) and cost
the handoff to the decode from every block it holds (`KvIndex.match_held`).

Fleet and numbers as in test_policy_kv.py: 1 MB of KV per block, NVLink 100 GB/s inside a domain,
local prefill below 2048 uncached tokens and 0.7 of the prompt, 0.5 s per unit of pressure. The
prompt is 40 full blocks (10,240 tokens); the decode holds its first 36.
"""

from __future__ import annotations

import pytest

from orchestrator.router.decision import Reason, RouteDecision
from orchestrator.router.inputs import FleetParams, Link, Role, RouteRequest, Topology, WorkerId, WorkerState
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.policy import PolicyName
from orchestrator.router.ray_gateway import _kv_event
from orchestrator.router.router import Router
from tandem.blocks import block_hashes
from workers.actor_common import HandoffPath, WorkerConfig, events_proto
from workers.engine.engine import Role as WorkerRole
from workers.kv.geometry import KvGeometry
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import kv_shape
from workers.model.presets import tiny

pytestmark = pytest.mark.router

MB = 1_000_000
FLEET = FleetParams(kv_bytes_per_block=MB, topology=Topology(Link(100e9, 0.0), Link(10e9, 1e-3)))
N = 40 * 256
PROMPT = [(7 * i + 3) % 1000 for i in range(N)]
HASHES = tuple(block_hashes(PROMPT))
D0, D1, P0 = WorkerId("d0"), WorkerId("d1"), WorkerId("p")


def _workers() -> list[WorkerState]:
    dec = {"kv_blocks_total": 1000, "max_running_requests": 8, "queue_limit": 4}
    return [
        WorkerState(P0, Role.PREFILL, "r0", 10_000.0, queue_limit=4),
        WorkerState(D0, Role.DECODE, "r0", 5_000.0, **dec),
        WorkerState(D1, Role.DECODE, "r0", 5_000.0, **dec),
    ]


def _route(index: KvIndex) -> RouteDecision:
    matches, held = index.match_views(HASHES)
    got = Router.named(PolicyName.KV, FLEET).route(RouteRequest("r", N, HASHES), _workers(), matches, 0.0, held)
    assert isinstance(got, RouteDecision)
    return got


def test_resumable_prefix_is_prefilled_locally() -> None:
    """The reference: 36 resumable blocks leave 1024 uncached tokens (< 2048, 0.1 of the prompt),
    so d0 prefills locally: 1024 / 5000 + 0.5 * (4/1000 + 1/8) = 0.2693 s, below any pair."""
    index = KvIndex()
    index.stored(D0, HASHES[:36])
    got = _route(index)
    assert (got.prefill, got.decode, got.reason) == (None, D0, Reason.LOCAL_PREFILL)
    assert (got.decode_cached_blocks, got.uncached_tokens, got.decode_alloc_blocks) == (36, 1024, 4)


def test_pulled_prefix_is_not_prefilled_locally_but_spares_the_transfer() -> None:
    """The same 36 blocks held only: d0 would compute all 10,240 tokens, so it has no local
    option. The pair (p, d0) moves 4 blocks (0.04 ms) and d0's pressure is
    (40 - 36)/1000 + 1/8 = 0.129: 1.024 + 0.00004 + 0.0645 = 1.08854 s, against
    1.024 + 0.0004 + 0.0825 = 1.1069 s for (p, d1)."""
    index = KvIndex()
    index.stored(D0, HASHES[:36], held_only=True)
    assert index.match(HASHES) == {} and index.match_held(HASHES) == {D0: 36}
    got = _route(index)
    assert (got.prefill, got.decode, got.reason) == (P0, D0, Reason.PREFIX_HIT)
    assert got.expected_ttft_s == pytest.approx(1.024)
    assert got.expected_handoff_s == pytest.approx(0.00004)
    assert (got.prefill_cached_blocks, got.uncached_tokens) == (0, N)
    assert (got.decode_cached_blocks, got.transfer_blocks, got.decode_alloc_blocks) == (36, 4, 4)


def test_blocks_a_decode_pulled_reach_the_router_as_held_only() -> None:
    """The whole path: a decode's cache adopts 36 pulled blocks, its KV events go through the
    worker's proto conversion and the gateway's into the index, and the route is the pair."""
    geom = KvGeometry.of(kv_shape(tiny(), with_mtp=False))
    m = KvCacheManager(geom, KvCapacity(40, 8, 2), "d0", device="meta")
    m.admit(1, list(HASHES[:36]), 36 * 256 + 10, 36 * 256 + 20)
    m.ensure(1, 36 * 256 + 10)
    m.advance(1, 36 * 256 + 10, boundary_state_written=False, settle=False, pulled=True)
    config = WorkerConfig("d0", WorkerRole.DECODE, handoff=HandoffPath.RAY_OBJECT_STORE)
    index = KvIndex()
    for ev in events_proto(config, m.flush_events().events).events:
        index.apply(D0, _kv_event(ev))
    assert index.held_only(D0) == frozenset(HASHES[:36]) and index.blocks_of(D0) == 0
    got = _route(index)
    assert (got.prefill, got.decode, got.transfer_blocks) == (P0, D0, 4)


def test_held_below_the_resumable_match_is_refused() -> None:
    router = Router.named(PolicyName.KV, FLEET)
    with pytest.raises(ValueError, match=r"held\[d0/0\] = 3: must be in \[matches\[d0/0\] = 5, 40\]"):
        router.route(RouteRequest("r", N, HASHES), _workers(), {D0: 5}, 0.0, {D0: 3})
