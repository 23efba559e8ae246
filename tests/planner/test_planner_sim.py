"""The fleet simulator: exact against the cost model for one request, Little's law, conservation of
requests and KV blocks, determinism, and the `kv` policy's prefix hits on the synthetic trace."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator.planner.cost import Parallelism
from orchestrator.planner.fleet import FleetConfig, PoolConfig
from orchestrator.planner.generators import Lengths, poisson, shared_prefix
from orchestrator.planner.goodput import Slo, at_rate, goodput
from orchestrator.planner.hardware import GpuKind
from orchestrator.planner.kv_layout import handoff_bytes
from orchestrator.planner.models import ModelName, Precision, model
from orchestrator.planner.sim import Simulator
from orchestrator.planner.trace import TraceRequest, load_mooncake
from orchestrator.router.inputs import DisaggMode, DisaggThresholds
from orchestrator.router.policy import PolicyName

pytestmark = pytest.mark.planner

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake-synthetic.jsonl"


def _fleet(policy: PolicyName = PolicyName.KV, mode: DisaggMode = DisaggMode.CONDITIONAL,
           prefills: int = 2, decodes: int = 2) -> FleetConfig:
    return FleetConfig(
        model=ModelName.V4_FLASH, gpu=GpuKind.GB200, precision=Precision.FP4, domain_gpus=72,
        prefill=PoolConfig(instances=prefills, par=Parallelism(4, 1, 4), max_batch=8, max_batched_tokens=8192),
        decode=PoolConfig(instances=decodes, par=Parallelism(4, 1, 4), max_batch=128, max_batched_tokens=8192),
        policy=policy, disagg=DisaggThresholds(mode=mode))


def _one(prompt: int, output: int) -> list[TraceRequest]:
    tokens = tuple(range(prompt // 256))  # any distinct ints stand for block hashes here
    return [TraceRequest("only", 1.0, prompt, output, tokens)]


def test_single_remote_request_equals_the_cost_model_sum() -> None:
    fleet = _fleet(mode=DisaggMode.ALWAYS, prefills=1, decodes=1)
    prompt, output = 20_000, 40
    res = Simulator(fleet, _one(prompt, output)).run()
    pre, dec = fleet.cost_model(fleet.prefill), fleet.cost_model(fleet.decode)
    ttft = pre.prefill_seconds(prompt, 0, fleet.prefill.max_batched_tokens)
    transfer = fleet.fleet_params().topology.intra_domain.seconds(handoff_bytes(model(fleet.model), prompt))
    decode = sum(dec.decode_step_seconds(1, prompt + 1 + j) for j in range(output - 1))
    assert res.ttft[0] == pytest.approx(ttft, rel=1e-9)
    assert res.latency[0] == pytest.approx(ttft + transfer + decode, rel=1e-9)
    assert res.tpot[0] == pytest.approx((transfer + decode) / (output - 1), rel=1e-9)


def test_single_local_request_has_no_transfer() -> None:
    fleet = _fleet(mode=DisaggMode.NEVER, prefills=1, decodes=1)
    prompt, output = 3000, 25
    res = Simulator(fleet, _one(prompt, output)).run()
    dec = fleet.cost_model(fleet.decode)
    ttft = dec.prefill_seconds(prompt, 0, fleet.decode.max_batched_tokens)
    decode = sum(dec.decode_step_seconds(1, prompt + 1 + j) for j in range(output - 1))
    assert res.latency[0] == pytest.approx(ttft + decode, rel=1e-9)


@pytest.fixture(scope="module")
def trace_slice() -> list[TraceRequest]:
    return load_mooncake(TRACE, limit=300)


@pytest.mark.parametrize("policy", list(PolicyName))
def test_littles_law_and_conservation(trace_slice: list[TraceRequest], policy: PolicyName) -> None:
    sim = Simulator(_fleet(policy), at_rate(trace_slice, 8.0))
    res = sim.run()
    assert res.completed + res.rejected == len(trace_slice)
    done = [j for j in sim.jobs if j.t_finish >= 0]
    # L = lambda W: the time integral of requests in the system equals the sum of their latencies
    assert sim.area == pytest.approx(sum(j.t_finish - j.req.arrival_s for j in done), rel=1e-9)
    for d in sim.decodes:  # and per decode batch, from its own step clock
        joined = [j for j in done if j.decode is d and j.t_join >= 0]
        assert d.area == pytest.approx(sum(j.t_finish - j.t_join for j in joined), rel=1e-6)
    # every reservation and hold was returned; the router's index holds exactly the cached blocks
    caches = [p.engine.cache for p in sim.prefills] + [d.cache for d in sim.decodes]
    for c in caches:
        assert c.reserved == 0 and c.held() == 0
        assert c.cached == len(c.present) <= c.capacity
        # resumable and held-only views: exactly the cache's two kinds (held-only: received, not computed)
        assert sim.index.held_only(c.worker) == frozenset(c.pulled) <= c.present.keys()
        assert sim.index.blocks_of(c.worker) == len(c.present) - len(c.pulled)
    assert len(sim.index) == len(set().union(*(c.present.keys() for c in caches)))
    assert all(j.t_first <= j.t_finish for j in done)


def test_deterministic_for_a_seed() -> None:
    lengths = Lengths(3000, 60, jitter=0.5)

    def run(seed: int):  # noqa: ANN202
        return Simulator(_fleet(), poisson(200, 20.0, lengths, seed=seed)).run()

    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert a.ttft != c.ttft


def test_kv_policy_beats_round_robin_on_hit_rate(trace_slice: list[TraceRequest]) -> None:
    fleet = _fleet(prefills=4, decodes=2)
    kv = Simulator(fleet, trace_slice).run()
    rr = Simulator(fleet.with_policy(PolicyName.ROUND_ROBIN), trace_slice).run()
    assert kv.hit_rate > rr.hit_rate + 0.02


def test_shared_prefix_hits_are_counted() -> None:
    reqs = shared_prefix(groups=4, per_group=8, system_tokens=2048, question_tokens=128, output_tokens=16,
                         rate_rps=5.0, seed=0)
    res = Simulator(_fleet(prefills=1, decodes=1, mode=DisaggMode.ALWAYS), reqs).run()
    # one prefill worker: every group's system prompt is computed once, then found cached
    # (block 8 of 2176 tokens is partial, so 2048 tokens of each later prompt hit)
    expected = 4 * 7 * 2048 / (32 * 2176)
    assert res.hit_rate == pytest.approx(expected)


def test_goodput_is_the_highest_rate_meeting_the_target() -> None:
    reqs = poisson(150, 10.0, Lengths(6000, 80, jitter=0.3), seed=2)
    fleet = _fleet(prefills=1, decodes=1)
    slo = Slo(ttft_s=1.0, tpot_s=0.02)
    g = goodput(fleet, reqs, slo, bisections=5)
    assert g.rate_rps > 0 and g.result is not None
    assert g.result.attainment(slo.ttft_s, slo.tpot_s) >= 0.9
    over = Simulator(fleet, at_rate(reqs, 2 * g.rate_rps)).run()
    assert over.attainment(slo.ttft_s, slo.tpot_s) < 0.9


def test_refusals_count_against_attainment() -> None:
    fleet = dataclasses.replace(_fleet(prefills=1, decodes=1, mode=DisaggMode.ALWAYS), queue_limit=1)
    reqs = [TraceRequest(f"r{i}", 0.0, 8000, 10, tuple(range(100 * i, 100 * i + 31))) for i in range(6)]
    res = Simulator(fleet, reqs).run()
    assert res.rejected > 0
    assert res.completed + res.rejected == 6
    assert res.attainment(1e9, 1e9) == pytest.approx(res.completed / 6)


def test_a_request_that_can_never_fit_is_an_error_not_a_stall() -> None:
    base = _fleet(prefills=1, decodes=1)
    fleet = dataclasses.replace(base, decode=dataclasses.replace(base.decode, kv_blocks=20))
    with pytest.raises(ValueError, match=r"request 'only' \(20000 prompt \+ 5 output tokens\) needs \d+ KV blocks"):
        Simulator(fleet, _one(20_000, 5)).run()


class _CheckedStates(Simulator):
    """Compares the incrementally maintained worker states with ones read afresh at every decision."""

    checked = 0

    def _states(self):  # noqa: ANN202
        got = list(super()._states())
        for p, s in zip(self.prefills, got, strict=False):
            e = p.engine
            assert (s.queued_prefill_tokens, s.kv_blocks_used, s.running_requests, s.queue_length) == (
                max(e.queued_tokens, 0), e.cache.reserved, len(e.running), len(e.queue) - len(e.running))
        for d, s in zip(self.decodes, got[len(self.prefills):], strict=True):
            assert (s.queued_prefill_tokens, s.kv_blocks_used, s.running_requests, s.queue_length) == (
                max(d.local.queued_tokens, 0), d.cache.reserved + d.promised[1],
                d.batch + d.incoming + d.promised[0], len(d.waiting) + len(d.local.queue))
        _CheckedStates.checked += 1
        return got


def test_incremental_worker_states_equal_fresh_ones(trace_slice: list[TraceRequest]) -> None:
    reqs = at_rate(trace_slice[:150], 30.0) + shared_prefix(2, 20, 1024, 64, 3, 40.0, seed=1)
    reqs = [dataclasses.replace(r, request_id=f"m{i}") for i, r in enumerate(reqs)]
    _CheckedStates(_fleet(), reqs).run()
    assert _CheckedStates.checked == len(reqs)


def test_early_stopping_verdict_equals_the_full_runs_attainment() -> None:
    reqs = poisson(120, 10.0, Lengths(6000, 40, jitter=0.5), seed=4)
    fleet = _fleet(prefills=1, decodes=1)
    verdicts = set()
    for rate in (2.0, 6.0, 12.0, 20.0, 40.0):
        scaled = at_rate(reqs, rate)
        full = Simulator(fleet, scaled).run().attainment(1.0, 0.02) >= 0.9
        assert Simulator(fleet, scaled).meets(1.0, 0.02, 0.9) is full
        verdicts.add(full)
    assert verdicts == {True, False}  # the rates straddle the threshold


def test_transfers_across_nvlink_domains_go_over_rdma() -> None:
    # 4-GPU domains (like HGX nodes cut in half): the prefill and the decode land in different ones
    fleet = dataclasses.replace(_fleet(mode=DisaggMode.ALWAYS, prefills=1, decodes=1), domain_gpus=4)
    prompt, output = 20_000, 40
    res = Simulator(fleet, _one(prompt, output)).run()
    pre, dec = fleet.cost_model(fleet.prefill), fleet.cost_model(fleet.decode)
    links = fleet.fleet_params().topology
    nbytes = handoff_bytes(model(fleet.model), prompt)
    ttft = pre.prefill_seconds(prompt, 0, fleet.prefill.max_batched_tokens)
    decode = sum(dec.decode_step_seconds(1, prompt + 1 + j) for j in range(output - 1))
    assert res.latency[0] == pytest.approx(ttft + links.cross_domain.seconds(nbytes) + decode, rel=1e-9)
    assert links.cross_domain.seconds(nbytes) > 5 * links.intra_domain.seconds(nbytes)
