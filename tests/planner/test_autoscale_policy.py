"""The autoscaling policy against hand-computed expectations, and the window and task around it.

Capacity in these tests: a prefill instance computes 1000 prompt tokens/s, a decode instance holds
4 streams within the TPOT SLO; every instance is planned at UTILISATION = 0.8 of that, so one
prefill instance takes 800 tok/s and one decode instance 3.2 streams.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from orchestrator.api.admin import DeploymentStatus
from orchestrator.autoscale.capacity import MeasuredCapacity
from orchestrator.autoscale.loop import Autoscaler, AutoscaleTask, ScaleHooks
from orchestrator.autoscale.policy import (
    UTILISATION,
    Bounds,
    Capacity,
    CapacitySource,
    PolicyConfig,
    PoolState,
    Reason,
    decide,
)
from orchestrator.autoscale.signals import PoolLoad, Signals, SignalWindow, signals_between
from orchestrator.router.inputs import Role
from orchestrator.router.load import LoadSnapshot, RankLoad, RequestCounters

pytestmark = pytest.mark.planner

CAP = Capacity(prefill_tok_s=1000.0, decode_slots=4, prefill_source=CapacitySource.MEASURED,
               decode_source=CapacitySource.MEASURED)
CFG = PolicyConfig(ttft_slo_s=1.0, tpot_slo_s=0.1, cooldown_s=10.0, prefill=Bounds(1, 4), decode=Bounds(1, 4))
IDLE = PoolLoad(instances=1, queued_requests=0, queued_prefill_tokens=0, running_requests=0,
                queued_requests_growth=0, queued_tokens_growth=0)


def _sig(*, rps: float = 0.0, prompt: float = 200.0, hit: float = 0.0, prefill: PoolLoad = IDLE,
         decode: PoolLoad = IDLE, ttft: float | None = None, tpot: float | None = None) -> Signals:
    return Signals(window_s=10.0, arrival_rps=rps, mean_prompt_tokens=prompt, mean_output_tokens=20.0,
                   output_tok_s=rps * 20.0, hit_rate=hit, ttft_s=ttft, tpot_s=tpot, prefill=prefill, decode=decode)


def _queue(queued: int, tokens: int = 0, running: int = 0) -> PoolLoad:
    return PoolLoad(instances=1, queued_requests=queued, queued_prefill_tokens=tokens, running_requests=running,
                    queued_requests_growth=queued, queued_tokens_growth=tokens)


def test_utilisation_is_what_the_expectations_assume() -> None:
    assert UTILISATION == 0.8


def test_a_queue_grows_both_pools_at_once_to_their_whole_need() -> None:
    # prefill: 2 req/s x 200 tokens = 400 tok/s -> 400 / 800 = 0.5 -> 1 from load alone; with 2000
    # queued tokens to clear within the 1 s TTFT SLO: (400 + 2000) / 800 = 3.
    # decode: 2 streams on average -> 1; now 4 running + 6 queued = 10 streams / 3.2 = 3.125 -> 4.
    sig = _sig(rps=2.0, prefill=_queue(queued=10, tokens=2000), decode=_queue(queued=6, running=4))
    d = decide(sig, mean_streams=2.0, cap=CAP, cfg=CFG, prefill=PoolState(1, 0.0), decode=PoolState(1, 0.0),
               now_s=1.0)
    assert (d.prefill.target, d.prefill.need, d.prefill.reason) == (3, 3, Reason.BURST)
    assert (d.decode.target, d.decode.need, d.decode.reason) == (4, 4, Reason.BURST)
    assert d.changes


def test_prompts_the_decode_workers_prefill_themselves_are_not_prefill_demand() -> None:
    # 8 req/s x 200 tokens = 1600 tok/s -> 2 instances; with 3 in 4 prefilled on the decode
    # workers (conditional disaggregation) 400 tok/s reach the prefill pool -> 1.
    sig = dataclasses.replace(_sig(rps=8.0), local_prefill_fraction=0.75)
    d = decide(sig, 0.0, CAP, CFG, PoolState(1, 0.0), PoolState(1, 0.0), 1.0)
    assert (d.prefill.need, d.prefill.target, d.prefill.reason) == (1, 1, Reason.STEADY)
    assert decide(_sig(rps=8.0), 0.0, CAP, CFG, PoolState(1, 0.0), PoolState(1, 0.0), 1.0).prefill.target == 2


def test_a_queue_that_grew_over_the_window_asks_for_one_more_even_when_small() -> None:
    # 1 req/s x 200 tokens = 200 tok/s and 300 queued tokens: (200 + 300) / 800 -> 1 by size alone,
    # but the queue grew from 100 to 300 tokens over the window: 2. Decode: 2 streams -> 1 by size,
    # 1 queued where there was none: 2.
    grew = PoolLoad(instances=1, queued_requests=2, queued_prefill_tokens=300, running_requests=0,
                    queued_requests_growth=1, queued_tokens_growth=200)
    dgrew = PoolLoad(instances=1, queued_requests=1, queued_prefill_tokens=0, running_requests=1,
                     queued_requests_growth=1, queued_tokens_growth=0)
    d = decide(_sig(rps=1.0, prefill=grew, decode=dgrew), 1.0, CAP, CFG, PoolState(1, 0.0), PoolState(1, 0.0), 1.0)
    assert (d.prefill.target, d.prefill.reason) == (2, Reason.BURST)
    assert (d.decode.target, d.decode.reason) == (2, Reason.BURST)
    shrinking = dataclasses.replace(grew, queued_tokens_growth=-200)  # the same queue, draining: no change
    d = decide(_sig(rps=1.0, prefill=shrinking), 1.0, CAP, CFG, PoolState(1, 0.0), PoolState(1, 0.0), 1.0)
    assert (d.prefill.target, d.prefill.reason) == (1, Reason.STEADY)


def test_steady_load_above_one_instance_grows_the_pool_by_load() -> None:
    # 6 req/s x 200 tokens x (1 - 0.25 hit) = 900 tok/s -> 900 / 800 = 1.125 -> 2; no queue.
    # decode: 5 streams on average -> 5 / 3.2 = 1.56 -> 2.
    sig = _sig(rps=6.0, hit=0.25, decode=_queue(queued=0, running=3))
    d = decide(sig, 5.0, CAP, CFG, PoolState(1, 0.0), PoolState(1, 0.0), 1.0)
    assert (d.prefill.target, d.prefill.reason) == (2, Reason.LOAD)
    assert (d.decode.target, d.decode.reason) == (2, Reason.LOAD)


def test_a_pool_that_fits_fewer_holds_within_the_cooldown_then_steps_down_one() -> None:
    sig = _sig(rps=0.0)  # no load: need 0, clamped to min 1
    held = decide(sig, 0.0, CAP, CFG, PoolState(3, 100.0), PoolState(2, 100.0), now_s=105.0)
    assert (held.prefill.target, held.prefill.reason) == (3, Reason.COOLDOWN)
    assert (held.decode.target, held.decode.reason) == (2, Reason.COOLDOWN)
    assert not held.changes
    after = decide(sig, 0.0, CAP, CFG, PoolState(3, 100.0), PoolState(2, 100.0), now_s=110.0)
    assert (after.prefill.target, after.prefill.reason) == (2, Reason.SHRINK)  # one step, not to 1
    assert (after.decode.target, after.decode.reason) == (1, Reason.SHRINK)


def test_a_pool_whose_load_fits_exactly_stays() -> None:
    # 8 req/s x 200 = 1600 tok/s = exactly 2 x 800; 6.4 streams = exactly 2 x 3.2.
    d = decide(_sig(rps=8.0), 6.4, CAP, CFG, PoolState(2, 0.0), PoolState(2, 0.0), 100.0)
    assert (d.prefill.target, d.prefill.reason) == (2, Reason.STEADY)
    assert (d.decode.target, d.decode.reason) == (2, Reason.STEADY)


def test_bounds_cap_the_need_and_pull_a_pool_back_inside_at_once() -> None:
    # 40 req/s x 200 = 8000 tok/s -> 10 instances, capped at max 4; 100 streams -> 32, capped at 4.
    big = decide(_sig(rps=40.0), 100.0, CAP, CFG, PoolState(1, 0.0), PoolState(2, 0.0), 1.0)
    assert (big.prefill.need, big.prefill.target) == (10, 4)
    assert (big.decode.need, big.decode.target) == (32, 4)
    # Outside the bounds (an operator scaled by hand): back to the nearest bound, cooldown or not.
    out = decide(_sig(rps=0.0), 0.0, CAP, CFG, PoolState(0, 0.5), PoolState(6, 0.5), 1.0)
    assert (out.prefill.target, out.prefill.reason) == (1, Reason.BOUNDS)
    assert (out.decode.target, out.decode.reason) == (4, Reason.BOUNDS)


def test_measured_latency_above_the_slo_asks_for_one_more_only_where_it_helps() -> None:
    # 100 queued tokens: (400 + 100) / 800 -> 1, but TTFT 2 s > 1 s with prompts waiting: 2.
    steady_queue = dataclasses.replace(_queue(queued=1, tokens=100), queued_requests_growth=0, queued_tokens_growth=0)
    sig = _sig(rps=2.0, prefill=steady_queue, ttft=2.0, tpot=0.3, decode=_queue(queued=0, running=1))
    d = decide(sig, 1.0, CAP, CFG, PoolState(1, 0.0), PoolState(1, 0.0), 1.0)
    assert (d.prefill.target, d.prefill.reason) == (2, Reason.SLO)
    # TPOT 0.3 s > 0.1 s, but the one decode instance runs a single stream: another would not help.
    assert (d.decode.target, d.decode.reason) == (1, Reason.STEADY)
    busy = dataclasses.replace(sig, decode=_queue(queued=0, running=2))
    assert decide(busy, 1.0, CAP, CFG, PoolState(1, 0.0), PoolState(1, 0.0), 1.0).decode.reason is Reason.SLO


# --- signals ------------------------------------------------------------------------------------
def _counters(**kw: float) -> RequestCounters:
    base = dict(arrivals=0, prompt_tokens=0, finished=0, output_tokens=0, prompt_blocks=0, cached_blocks=0,
                ttft_sum_s=0.0, ttft_count=0, tpot_sum_s=0.0, tpot_count=0, routed=0, local_prefills=0)
    return RequestCounters(**(base | kw))


def _rank(instance: str, role: Role, *, queued: int = 0, tokens: int = 0, running: int = 0,
          prefill_tok_s: float = 0.0, decode_tok_s: float = 0.0, draining: bool = False) -> RankLoad:
    return RankLoad(instance, 0, role, draining, queued, tokens, running, prefill_tok_s, decode_tok_s)


def test_signals_are_the_counter_differences_over_the_window() -> None:
    first = LoadSnapshot(10.0, _counters(arrivals=5, prompt_tokens=500, finished=5, output_tokens=50,
                                         prompt_blocks=4, cached_blocks=1, ttft_sum_s=1.0, ttft_count=5),
                         (_rank("decode-0", Role.DECODE, queued=1),))
    last = LoadSnapshot(14.0, _counters(arrivals=13, prompt_tokens=2100, finished=9, output_tokens=130,
                                        prompt_blocks=12, cached_blocks=5, ttft_sum_s=3.0, ttft_count=9,
                                        tpot_sum_s=0.2, tpot_count=4, routed=10, local_prefills=4),
                        (_rank("prefill-0", Role.PREFILL, queued=2, tokens=900),
                         _rank("decode-0", Role.DECODE, queued=3, running=2),
                         _rank("decode-1", Role.DECODE, queued=7, running=2, draining=True)))
    s = signals_between(first, last)
    assert (s.window_s, s.arrival_rps, s.mean_prompt_tokens) == (4.0, 2.0, 200.0)  # 8 in 4 s, 1600 / 8
    assert (s.mean_output_tokens, s.output_tok_s, s.hit_rate) == (20.0, 20.0, 0.5)  # 80 / 4; 80 / 4 s; 4 / 8
    assert (s.ttft_s, s.tpot_s, s.local_prefill_fraction) == (0.5, 0.05, 0.4)  # 2 / 4; 0.2 / 4; 4 / 10
    assert s.prefill == PoolLoad(1, 2, 900, 0, 2, 900)
    assert s.decode == PoolLoad(1, 3, 0, 2, 2, 0)  # the draining rank is not counted
    assert s.decode.streams == 5


def test_the_window_keeps_recent_snapshots_and_restarts_after_a_router_restart() -> None:
    w = SignalWindow(window_s=3.0)
    for t, n in ((0.0, 0), (1.0, 2), (2.0, 4), (3.0, 6), (4.0, 8), (5.0, 10)):
        w.push(LoadSnapshot(t, _counters(arrivals=n), ()))
    assert w.signals().window_s == 3.0 and w.signals().arrival_rps == 2.0  # 2.0 .. 5.0
    w.push(LoadSnapshot(6.0, _counters(arrivals=1), ()))  # counters went down: a new router
    assert not w.ready
    with pytest.raises(LookupError, match="rates need two"):
        w.signals()
    with pytest.raises(ValueError, match="not after"):
        w.push(LoadSnapshot(6.0, _counters(arrivals=1), ()))


# --- measured capacity (CPU) --------------------------------------------------------------------
def test_measured_capacity_reads_busy_ranks_and_says_when_it_assumes() -> None:
    m = MeasuredCapacity(window_s=5.0, tpot_slo_s=0.1, decode_max_batch=4, decode_ranks=1,
                         assumed_prefill_tok_s=2000.0)
    assumed = m.capacity(_sig())
    assert (assumed.prefill_tok_s, assumed.decode_slots) == (2000.0, 4)
    assert assumed.prefill_source is assumed.decode_source is CapacitySource.ASSUMED
    m.observe(LoadSnapshot(1.0, _counters(), (
        _rank("prefill-0", Role.PREFILL, tokens=300, prefill_tok_s=3000.0),
        _rank("prefill-1", Role.PREFILL, prefill_tok_s=9000.0),  # no work waiting: not a capacity reading
        _rank("decode-0", Role.DECODE, running=2, decode_tok_s=25.0))))  # step 80 ms at 2 -> 2.5 -> 2 slots
    got = m.capacity(_sig())
    assert (got.prefill_tok_s, got.decode_slots) == (3000.0, 2)
    assert got.prefill_source is got.decode_source is CapacitySource.MEASURED
    m.observe(LoadSnapshot(2.0, _counters(), (_rank("decode-0", Role.DECODE, running=1, decode_tok_s=90.0),)))
    assert m.capacity(_sig()).decode_slots == 4  # 9 streams fit the SLO; max_batch caps at 4
    m.observe(LoadSnapshot(20.0, _counters(), ()))  # readings out of the window: the last ones stay
    assert (m.capacity(_sig()).prefill_tok_s, m.capacity(_sig()).decode_slots) == (3000.0, 4)


# --- the task through its hooks -----------------------------------------------------------------
def test_the_task_scales_through_the_hooks_and_restarts_the_cooldown() -> None:
    clock = [0.0]
    sizes = [1, 1]
    calls: list[tuple[int, int]] = []
    snaps = iter([
        LoadSnapshot(0.0, _counters(), (_rank("prefill-0", Role.PREFILL), _rank("decode-0", Role.DECODE))),
        LoadSnapshot(1.0, _counters(arrivals=2, prompt_tokens=400), (
            _rank("prefill-0", Role.PREFILL, queued=5, tokens=2000),
            _rank("decode-0", Role.DECODE, queued=6, running=4))),
        LoadSnapshot(2.0, _counters(arrivals=2, prompt_tokens=400), ()),
        LoadSnapshot(20.0, _counters(arrivals=2, prompt_tokens=400), ()),
    ])

    async def snapshot() -> LoadSnapshot:
        return next(snaps)

    async def scale(p: int, d: int) -> None:
        calls.append((p, d))
        sizes[:] = [p, d]

    scaler = Autoscaler(CFG, SignalWindow(30.0), _Fixed(CAP), clock=lambda: clock[0])
    task = AutoscaleTask(scaler, ScaleHooks(snapshot, lambda: (sizes[0], sizes[1]), scale), interval_s=1.0)

    async def rounds() -> list:
        out = []
        for t in (0.0, 1.0, 2.0, 20.0):
            clock[0] = t
            out.append(await task.round())
        return out

    first, burst, held, down = asyncio.run(rounds())
    assert first.prefill.reason is Reason.WARMING_UP
    # 2 arrivals x 200 tokens in 1 s = 400 tok/s; 2000 queued / 1 s: (400 + 2000) / 800 = 3;
    # decode: mean streams (0 + 10) / 2 = 5 -> 2, now 10 -> 4.
    assert (burst.prefill.target, burst.decode.target) == (3, 4) and burst.prefill.reason is Reason.BURST
    assert held.prefill.reason is Reason.COOLDOWN and held.decode.reason is Reason.COOLDOWN
    assert (down.prefill.target, down.decode.target) == (2, 3)  # 18 s later: one step each
    assert calls == [(3, 4), (2, 3)]
    st = task.status()
    assert [c["prefill"]["reason"] for c in st["changes"]] == ["burst", "shrink"]
    assert st["last"]["decode"]["reason"] == "shrink"
    # The HTTP admin status (what `tandem status --json` prints) keeps every field of it.
    http = DeploymentStatus.model_validate({"name": "x", "ready": True, "router_address": "", "http_address": "",
                                            "instances": [], "generation": 2, "autoscale": st})
    assert http.generation == 2 and http.autoscale.model_dump() == st


class _Fixed:
    """A capacity model that does not learn (like the planner's)."""

    def __init__(self, cap: Capacity) -> None:
        self.cap = cap

    def observe(self, snap: LoadSnapshot) -> None:
        return None

    def capacity(self, sig: Signals) -> Capacity:
        return self.cap


def test_the_running_task_keeps_observing_while_a_scale_is_in_flight_and_decides_after() -> None:
    sizes = [1, 1]
    calls: list[tuple[int, int]] = []
    taken = [0]
    gate = asyncio.Event()

    async def snapshot() -> LoadSnapshot:  # a constant burst: 2000 tokens and 10 streams waiting
        taken[0] += 1
        return LoadSnapshot(float(taken[0]), _counters(), (
            _rank("prefill-0", Role.PREFILL, queued=5, tokens=2000),
            _rank("decode-0", Role.DECODE, queued=6, running=4)))

    async def scale(p: int, d: int) -> None:
        calls.append((p, d))
        await gate.wait()  # instances starting
        sizes[:] = [p, d]

    scaler = Autoscaler(CFG, SignalWindow(30.0), _Fixed(CAP), clock=lambda: float(taken[0]))
    task = AutoscaleTask(scaler, ScaleHooks(snapshot, lambda: (sizes[0], sizes[1]), scale), interval_s=0.005)

    async def run() -> tuple[int, int]:
        task.start()
        while not calls:
            await asyncio.sleep(0.005)
        during = taken[0]
        await asyncio.sleep(0.1)
        observed_while_scaling = taken[0] - during
        gate.set()
        while scaler.last is None or scaler.last.prefill.current != 3:
            await asyncio.sleep(0.005)
        task.stop()
        return observed_while_scaling, len(calls)

    observed, n_calls = asyncio.run(run())
    assert observed >= 3 and n_calls == 1  # snapshots kept coming; no second decision meanwhile
    assert calls == [(3, 4)]  # (0 + 2000 / 1 s) / 800 -> 3 prefill; 10 streams / 3.2 -> 4 decode
    assert (scaler.last.prefill.reason, scaler.last.decode.reason) == (Reason.STEADY, Reason.STEADY)
    assert task.errors == 0
