"""Goodput (DistServe's definition): the highest request rate at which at least 90% of requests
meet both the TTFT and the TPOT target, found by bisection over time-scaled replays of a load.

The load's own rate is n / (last arrival - first arrival); replaying it at rate r multiplies every
arrival time by (own rate / r), keeping its shape (bursts, shared prefixes, sessions). Attainment
is treated as non-increasing in rate; the search brackets the threshold by doubling or halving,
then bisects in log space.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator.planner.engines import SimEngine, make_replay
from orchestrator.planner.fleet import FleetConfig
from orchestrator.planner.results import SimResult
from orchestrator.planner.trace import TraceRequest

ATTAINMENT_TARGET = 0.9


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Slo.{name} = {value}: must be > 0")


@dataclass(frozen=True)
class Goodput:
    rate_rps: float  # 0.0 when even the slowest tried rate misses the target
    result: SimResult | None  # the run at rate_rps (None when rate_rps is 0)
    own: SimResult  # the run at the load's own rate (the first one tried)
    runs: int


def own_rate(requests: Sequence[TraceRequest]) -> float:
    """Requests per second of the load as given."""
    if len(requests) < 2:
        raise ValueError(f"a load of {len(requests)} request(s) has no rate; need at least 2")
    times = [r.arrival_s for r in requests]
    span = max(times) - min(times)
    if span <= 0:
        raise ValueError("every request arrives at the same instant: the load has no rate")
    return len(requests) / span


def at_rate(requests: Sequence[TraceRequest], rate_rps: float) -> list[TraceRequest]:
    """The same load replayed at rate_rps (arrival times scaled from the first arrival)."""
    if not rate_rps > 0:
        raise ValueError(f"rate_rps = {rate_rps}: must be > 0")
    factor = own_rate(requests) / rate_rps
    t0 = min(r.arrival_s for r in requests)
    return [dataclasses.replace(r, arrival_s=(r.arrival_s - t0) * factor) for r in requests]


def goodput(fleet: FleetConfig, requests: Sequence[TraceRequest], slo: Slo, bisections: int = 8,
            progress: Callable[[str], None] | None = None, engine: SimEngine = SimEngine.NATIVE) -> Goodput:
    """The highest rate meeting the attainment target, within a factor 2 ** (1 / 2 ** bisections).

    The load's own rate is replayed in full (it is reported); every other rate stops as soon as
    more requests have missed than the target allows (`Simulator.meets`). `engine`: which
    simulator replays (the same results either way)."""
    base = own_rate(requests)
    results: dict[float, SimResult] = {}
    verdicts: dict[float, bool] = {}

    def ok(rate: float) -> bool:
        if rate not in verdicts:
            sim = make_replay(engine, fleet, at_rate(requests, rate))
            if rate == base:
                results[rate] = sim.run()
                verdicts[rate] = results[rate].attainment(slo.ttft_s, slo.tpot_s) >= ATTAINMENT_TARGET
            else:
                verdicts[rate] = sim.meets(slo.ttft_s, slo.tpot_s, ATTAINMENT_TARGET)
                if verdicts[rate]:
                    results[rate] = sim.result()
            if progress is not None:
                progress(f"  {fleet.policy.value}: {rate:.4g} req/s -> "
                         f"{'meets' if verdicts[rate] else 'misses'} {ATTAINMENT_TARGET:.0%} within SLO")
        return verdicts[rate]

    lo, hi = base, base
    if ok(base):
        for _ in range(12):
            hi *= 2
            if not ok(hi):
                break
            lo = hi
        else:
            return Goodput(lo, results[lo], results[base], len(verdicts))
    else:
        for _ in range(12):
            lo /= 2
            if ok(lo):
                break
            hi = lo
        else:
            return Goodput(0.0, None, results[base], len(verdicts))
    for _ in range(bisections):
        mid = (lo * hi) ** 0.5
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return Goodput(lo, results[lo], results[base], len(verdicts))
