"""The native simulator core replays exactly what the Python `Simulator` replays (which routes with
the router's own `Router`, `KvIndex` and policy objects): per request the same prefill and decode
worker, local or not, the same first-token and finish times and cached tokens (==, not approx),
per instance the same busy time, and the same `SimResult`; `meets` gives the same verdicts.

The situations are chosen so that every path runs, and each case asserts that its path did run:
both 72-GPU fleets of bench/planner_speed.py, the four policies, a Mooncake slice and multi-turn
sessions (affinity; follow-up turns prefilled on the decode that kept the previous answer's blocks),
shared prefixes (pulled blocks reused), tiny KV pools (eviction), queue limits (refusals), instances spread over
several NVLink domains (cross-domain transfers), single-token outputs, aggregated serving.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator.planner.cost import Parallelism
from orchestrator.planner.fleet import FleetConfig, PoolConfig, fleet_from_spec
from orchestrator.planner.generators import Lengths, multi_turn, poisson, shared_prefix
from orchestrator.planner.goodput import at_rate
from orchestrator.planner.hardware import GpuKind
from orchestrator.planner.models import ModelName, Precision
from orchestrator.planner.native.lib import NativeBuildError, build
from orchestrator.planner.native_sim import NativeSimulator
from orchestrator.planner.sim import Simulator
from orchestrator.planner.trace import TraceRequest, load_mooncake
from orchestrator.router.inputs import DisaggMode, DisaggThresholds
from orchestrator.router.policy import PolicyName
from orchestrator.spec import load_spec

pytestmark = pytest.mark.planner

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake-synthetic.jsonl"


def _flash(policy: PolicyName, prefills: int = 10, decodes: int = 8, domain_gpus: int = 72,
           kv_blocks: int | None = None, mode: DisaggMode = DisaggMode.CONDITIONAL, queue_limit: int = 256,
           decode_batch: int = 256) -> FleetConfig:
    return FleetConfig(
        model=ModelName.V4_FLASH, gpu=GpuKind.GB200, precision=Precision.FP4, domain_gpus=domain_gpus,
        prefill=PoolConfig(prefills, Parallelism(4, 1, 4), max_batch=8, max_batched_tokens=16384,
                           kv_blocks=kv_blocks),
        decode=PoolConfig(decodes, Parallelism(4, 1, 4), max_batch=decode_batch, max_batched_tokens=8192,
                          kv_blocks=kv_blocks),
        policy=policy, disagg=DisaggThresholds(mode=mode), queue_limit=queue_limit)


def _pro(policy: PolicyName) -> FleetConfig:
    return fleet_from_spec(load_spec(ROOT / "deploy" / "gb200-nvl72-v4-pro.yaml"), policy,
                           model_name=ModelName.V4_PRO)


@dataclasses.dataclass(frozen=True)
class Replayed:
    python: Simulator
    native: NativeSimulator

    @property
    def local(self) -> int:
        return sum(self.native.local)


def _replay(fleet: FleetConfig, requests: list[TraceRequest]) -> Replayed:
    """Run both; assert everything equal; both sides for the case's own checks."""
    py, nat = Simulator(fleet, requests), NativeSimulator(fleet, requests)
    res_py, res_nat = py.run(), nat.run()
    assert len(py.jobs) == len(requests)
    for i, job in enumerate(py.jobs):
        where = f"request {i} ({job.req.request_id})"
        assert (nat.t_first[i], nat.t_finish[i]) == (job.t_first, job.t_finish), where
        assert nat.cached_tokens[i] == job.cached_tokens, where
        assert bool(nat.local[i]) == job.local, where
        assert nat.prefill_slot[i] == (-1 if job.prefill is None or job.local else job.prefill.slot), where
        assert nat.decode_slot[i] == (-1 if job.decode is None else job.decode.slot), where
    n_pre = len(py.prefills)
    assert list(nat.busy_time[:n_pre]) == [p.engine.busy_time for p in py.prefills]
    assert list(nat.busy_time[n_pre:]) == [d.local.busy_time for d in py.decodes]
    assert list(nat.active_time[n_pre:]) == [d.active_time for d in py.decodes]
    assert (nat.area, nat.rejected) == (py.area, py.rejected)
    assert res_nat == res_py
    return Replayed(py, nat)


@pytest.fixture(scope="module")
def mooncake() -> list[TraceRequest]:
    return load_mooncake(TRACE, limit=250)


@pytest.fixture(scope="module")
def sessions() -> list[TraceRequest]:
    return multi_turn(sessions=60, turns=4, first_prompt_tokens=2048, turn_tokens=512, output_tokens=100,
                      rate_rps=4.0, think_time_s=5.0, seed=3)


@pytest.mark.parametrize("policy", list(PolicyName))
def test_pro_nvl72_mooncake(mooncake: list[TraceRequest], policy: PolicyName) -> None:
    r = _replay(_pro(policy), at_rate(mooncake, 6.0))
    assert sum(1 for c in r.native.cached_tokens if c > 0) > 0  # prefix hits happened


@pytest.mark.parametrize("policy", list(PolicyName))
def test_flash_nvl72_sessions(sessions: list[TraceRequest], policy: PolicyName) -> None:
    r = _replay(_flash(policy), sessions)
    assert sum(1 for c in r.native.cached_tokens if c > 0) > 20  # later turns hit their history
    if policy in (PolicyName.KV, PolicyName.DYNAMO):  # follow-ups prefilled on the decode that holds the
        local = [c for c, here in zip(r.native.cached_tokens, r.native.local, strict=True) if here]
        assert local and min(local) > 0  # ... previous answer's blocks, resuming after them


@pytest.mark.parametrize("policy", list(PolicyName))
def test_shared_prefixes_local_prefills_and_cross_domain(policy: PolicyName) -> None:
    """Short questions after shared system prompts mixed with long prompts, on instances over 3 NVLink
    domains of 8 GPUs (transfers within and across domains). (Conditional disaggregation never
    prefills on a decode here: a decode's pages come from handoffs, held-only, so nothing it holds
    is resumable; the local path runs in the aggregated test below.)"""
    short = shared_prefix(groups=6, per_group=30, system_tokens=1024, question_tokens=300, output_tokens=30,
                          rate_rps=30.0, seed=2)
    long = poisson(60, 5.0, Lengths(prompt_tokens=8000, output_tokens=50, jitter=0.5), seed=4)
    reqs = sorted(short + [dataclasses.replace(r, request_id=f"long-{r.request_id}") for r in long],
                  key=lambda r: r.arrival_s)
    fleet = _flash(policy, prefills=3, decodes=2, domain_gpus=8)
    r = _replay(fleet, reqs)
    pairs = {(j.prefill.slot, j.decode.slot) for j in r.python.jobs if j.prefill is not None}
    domain = {i: p.domain for i, p in enumerate(r.python.prefills)} | {d.slot: d.domain for d in r.python.decodes}
    assert len(set(domain.values())) == 3
    if policy is PolicyName.ROUND_ROBIN:  # (the others choose by cache and cost, often within a domain)
        assert {domain[p] == domain[d] for p, d in pairs} == {True, False}  # both kinds of link carried KV


@pytest.mark.parametrize("policy", list(PolicyName))
def test_tiny_pools_evict_and_queue_limits_refuse(policy: PolicyName) -> None:
    """KV pools of 100 blocks (a few requests each: eviction on most admissions) and queue limits of
    2 under a burst (refusals)."""
    reqs = poisson(250, 400.0, Lengths(prompt_tokens=6000, output_tokens=40, jitter=0.9), seed=5)
    reqs += [dataclasses.replace(r, request_id=f"again-{r.request_id}", arrival_s=r.arrival_s + 2.0)
             for r in reqs[:100]]  # repeats: hits while the pools churn
    fleet = _flash(policy, prefills=2, decodes=2, kv_blocks=100, queue_limit=2, decode_batch=8)
    r = _replay(fleet, reqs)
    assert r.python.rejected > 0
    by_id = {x.request_id: x for x in reqs}
    computed = {h for j in r.python.jobs if j.prefill is r.python.prefills[0].engine
                for h in by_id[j.req.request_id].block_hashes}
    assert len(computed) > 100 >= len(r.python.prefills[0].engine.cache.present)  # so some were evicted


def test_aggregated_serving_and_single_token_outputs(sessions: list[TraceRequest]) -> None:
    """No prefill pool, mode never: every request prefills on its decode; a third of the outputs
    are a single token (they end at their first token)."""
    reqs = [dataclasses.replace(r, output_tokens=1) if i % 3 == 0 else r for i, r in enumerate(sessions)]
    fleet = _flash(PolicyName.KV, prefills=0, decodes=3, mode=DisaggMode.NEVER)
    r = _replay(fleet, reqs)
    assert r.local == len(reqs) - r.python.rejected


@pytest.mark.parametrize("policy", [PolicyName.KV, PolicyName.SGLANG])
def test_meets_gives_the_same_verdicts(mooncake: list[TraceRequest], policy: PolicyName) -> None:
    """Early-stopping SLO replays: the same verdict at rates on both sides of the goodput."""
    fleet = _flash(policy, prefills=2, decodes=2)
    verdicts = []
    for rate in (0.5, 2.0, 8.0, 32.0):
        load = at_rate(mooncake, rate)
        py = Simulator(fleet, load).meets(2.0, 0.05, 0.9)
        nat = NativeSimulator(fleet, load).meets(2.0, 0.05, 0.9)
        assert nat is py, rate
        verdicts.append(py)
    assert True in verdicts and False in verdicts


def test_a_missing_compiler_is_an_error_that_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(NativeBuildError, match="no-such-cc"):
        build()
