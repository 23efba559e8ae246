"""Blocks a simulated decode received in a KV handoff are held-only, as on the workers: they spare a
later handoff's pull (the router's `match_held`) but no local prefill resumes right after them
(`match`); blocks the decode computed itself after them (an answer it decoded) are resume points."""

from __future__ import annotations

import pytest

from orchestrator.planner.cache import PrefixCache
from orchestrator.planner.cost import Parallelism
from orchestrator.planner.fleet import FleetConfig, PoolConfig
from orchestrator.planner.hardware import GpuKind
from orchestrator.planner.kv_layout import block_bytes, handoff_bytes
from orchestrator.planner.models import ModelName, Precision, model
from orchestrator.planner.sim import Simulator
from orchestrator.planner.trace import TraceRequest
from orchestrator.router.inputs import DisaggMode, DisaggThresholds, WorkerId
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.policy import PolicyName

pytestmark = pytest.mark.planner

BLOCKS = 20  # full blocks of the first prompt
SHARED = 12  # leading blocks the second prompt shares with it


def _fleet(mode: DisaggMode) -> FleetConfig:
    """One prefill and one decode instance: every handoff goes to the same decode."""
    return FleetConfig(
        model=ModelName.V4_FLASH, gpu=GpuKind.GB200, precision=Precision.FP4, domain_gpus=72,
        prefill=PoolConfig(instances=1, par=Parallelism(4, 1, 4), max_batch=8, max_batched_tokens=8192),
        decode=PoolConfig(instances=1, par=Parallelism(4, 1, 4), max_batch=128, max_batched_tokens=8192),
        policy=PolicyName.KV, disagg=DisaggThresholds(mode=mode))


def _transfer_s(fleet: FleetConfig, prompt: int, reused: int) -> float:
    return fleet.fleet_params().topology.intra_domain.seconds(handoff_bytes(model(fleet.model), prompt, reused))


def test_the_second_handoff_of_a_shared_prefix_pulls_k_blocks_fewer() -> None:
    fleet = _fleet(DisaggMode.ALWAYS)
    first = tuple(range(BLOCKS))
    second = first[:SHARED] + tuple(range(1000, 1000 + BLOCKS - SHARED))
    prompt = BLOCKS * 256
    sim = Simulator(fleet, [TraceRequest("a", 1.0, prompt, 50, first), TraceRequest("b", 5.0, prompt, 50, second)])
    sim.run()
    a, b = sim.jobs
    assert a.t_join < b.req.arrival_s  # a's pages had landed on the decode before b arrived
    assert (a.reused_blocks, b.reused_blocks) == (0, SHARED)
    # the handoff's time is exactly the link's time for the bytes of the blocks the decode lacks
    assert a.t_join - a.t_first == pytest.approx(_transfer_s(fleet, prompt, 0), rel=1e-12)
    assert b.t_join - b.t_first == pytest.approx(_transfer_s(fleet, prompt, SHARED), rel=1e-12)
    arch = model(fleet.model)
    assert handoff_bytes(arch, prompt, 0) - handoff_bytes(arch, prompt, SHARED) == SHARED * block_bytes(arch)
    # every block the decode has came by handoff: held-only in its cache and in the router's index
    decode = sim.decodes[0]
    assert decode.cache.pulled == set(first) | set(second) == decode.cache.present.keys()
    assert sim.index.held_only(decode.worker) == frozenset(first) | frozenset(second)
    assert sim.index.holdings(decode.worker) == frozenset()
    resumable, held = sim.index.match_views(list(second))
    assert decode.worker not in resumable and held[decode.worker] == BLOCKS


def test_a_decode_holding_only_pulled_blocks_does_not_prefill_locally() -> None:
    fleet = _fleet(DisaggMode.CONDITIONAL)
    hashes = tuple(range(BLOCKS))
    prompt, longer = BLOCKS * 256, BLOCKS * 256 + 100  # the second: the same blocks and 100 tokens more
    sim = Simulator(fleet, [TraceRequest("a", 1.0, prompt, 50, hashes), TraceRequest("b", 5.0, longer, 50, hashes)])
    sim.run()
    a, b = sim.jobs
    assert not a.local and a.t_join < b.req.arrival_s
    # had the pulled blocks been resumable, the decode would have had 100 tokens left to compute:
    # few enough that the thresholds send b to it; held-only, it would compute all of them
    assert fleet.disagg.local(longer - BLOCKS * 256, longer)
    assert not fleet.disagg.local(longer, longer)
    # so b goes remote: the prefill resumes after its own resumable blocks, and the handoff moves
    # only what the decode lacks (the partial last block and the state)
    assert not b.local and b.prefill is sim.prefills[0].engine
    assert b.cached_blocks == BLOCKS and b.reused_blocks == BLOCKS
    assert b.t_join - b.t_first == pytest.approx(_transfer_s(fleet, longer, BLOCKS), rel=1e-12)


def test_a_held_only_block_becomes_resumable_once_computed_here() -> None:
    index, w = KvIndex(), WorkerId("decode0")
    cache = PrefixCache(w, 100, index)
    assert cache.reserve(10)
    cache.complete([1, 2, 3], held_only=True)  # received in a handoff
    cache.unreserve(10)
    cache.release([1, 2, 3])
    assert index.match_views([1, 2, 3]) == ({}, {w: 3})
    assert cache.reserve(10)
    assert cache.acquire_leading([1, 2, 3]) == 0  # no computation resumes after a held-only block
    cache.complete([1, 2], 0)  # a local prefill computes the first two blocks itself
    cache.unreserve(10)
    cache.release([1, 2])
    assert cache.pulled == {3}
    assert index.match_views([1, 2, 3]) == ({w: 2}, {w: 3})
    assert index.holdings(w) == frozenset({1, 2}) and index.held_only(w) == frozenset({3})
    assert cache.reserve(10)
    assert (cache.acquire_leading([1, 2, 3]), cache.acquire_kept([1, 2, 3])) == (2, 3)


def test_a_follow_up_turn_is_prefilled_on_the_decode_that_kept_the_answer() -> None:
    """Turn 1 is prefilled remotely and decoded on the decode, whose KV then holds the prompt's blocks
    (pulled, held-only) and the answer's (computed there, resumable: `answer_blocks`). Turn 2 of the
    session (prompt + answer + 100 new tokens) resumes after the answer on that decode: local, with
    exactly the uncached tail computed."""
    fleet = _fleet(DisaggMode.CONDITIONAL)
    answer_out = 3 * 256 + 1  # the answer fills 3 more blocks (prompt + output - 1 tokens in the KV)
    turn1 = tuple(range(BLOCKS))
    turn2 = turn1 + tuple(range(500, 503)) + tuple(range(900, 901))  # + answer blocks + one new block
    p1, p2 = BLOCKS * 256, (BLOCKS + 4) * 256 + 100
    sim = Simulator(fleet, [TraceRequest("t1", 1.0, p1, answer_out, turn1, session_id="s"),
                            TraceRequest("t2", 9.0, p2, 20, turn2, session_id="s")])
    res = sim.run()
    a, b = sim.jobs
    assert a.answer == tuple(range(500, 503)) and b.answer == ()
    assert not a.local and a.t_finish < b.req.arrival_s
    decode = sim.decodes[0]
    assert decode.cache.pulled == set(turn1)  # the prompt: held-only; the answer: computed here
    assert b.local and b.cached_blocks == BLOCKS + 3 and b.cached_tokens == (BLOCKS + 3) * 256
    # afterwards the decode can resume after all of turn 2's blocks (it computed the last one itself)
    assert sim.index.match(list(turn2)) == {decode.worker: BLOCKS + 4, sim.prefills[0].worker: BLOCKS}
    assert res.completed == 2
