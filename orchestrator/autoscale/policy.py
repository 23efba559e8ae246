"""The autoscaling policy, pure: signals + per-instance capacity + SLOs + bounds -> pool sizes.

Per pool it computes how many instances the load needs, two ways:
- prefill: prompt tokens to compute per second, lambda x mean prompt x (1 - hit rate) x (1 - the
  fraction the decode workers prefill themselves), over what one instance computes
  (`Capacity.prefill_tok_s`). The queue adds the tokens waiting now, which
  must be computed within the TTFT SLO: need = (demand + queued tokens / TTFT SLO) / capacity.
- decode: streams (running + waiting requests) over the streams one instance holds within the
  TPOT SLO (`Capacity.decode_slots`), for the window's mean (load) and for now (queue).
Every instance is sized to UTILISATION of its capacity, so a pool at its need has headroom.
A measured TTFT above its SLO while prompts wait, or a TPOT above its SLO while an instance runs
several streams, asks for one instance more.

A queue that grew over the window (and is not empty) asks for one instance more at least.
Growing happens at once, to the whole need: a burst that builds queues is met in one step.
Shrinking happens one instance at a time, only when the need is below the current size and the
pool has not changed for `cooldown_s`. The result is always within [min, max] of the pool.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from orchestrator.autoscale.signals import Signals

# Each instance is planned to run at this fraction of its capacity (headroom for noise and bursts).
UTILISATION = 0.8


class CapacitySource(enum.Enum):
    """Where a capacity figure came from (shown with every decision)."""

    PLANNER = "planner"  # the planner's cost model for the spec's GPUs and model
    MEASURED = "measured"  # the workers' own measured rates (CPU topologies)
    ASSUMED = "assumed"  # nothing measured yet: the router's starting assumption


@dataclass(frozen=True)
class Capacity:
    """What one instance of each pool serves within the SLOs."""

    prefill_tok_s: float  # prompt tokens computed per second
    decode_slots: int  # concurrent streams with a step time within the TPOT SLO
    prefill_source: CapacitySource
    decode_source: CapacitySource

    def __post_init__(self) -> None:
        if not self.prefill_tok_s > 0:
            raise ValueError(f"Capacity.prefill_tok_s = {self.prefill_tok_s}: must be > 0")
        if self.decode_slots < 1:
            raise ValueError(f"Capacity.decode_slots = {self.decode_slots}: must be >= 1")


@dataclass(frozen=True)
class Bounds:
    min: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.max:
            raise ValueError(f"Bounds(min={self.min}, max={self.max}): need 0 <= min <= max")

    def clamp(self, n: int) -> int:
        return max(self.min, min(self.max, n))


@dataclass(frozen=True)
class PolicyConfig:
    ttft_slo_s: float
    tpot_slo_s: float
    cooldown_s: float
    prefill: Bounds
    decode: Bounds


@dataclass(frozen=True)
class PoolState:
    """A pool's size now and when it last changed (seconds on the caller's clock)."""

    current: int
    last_change_s: float


class Reason(enum.Enum):
    BURST = "burst"  # the queue alone asks for more: grown at once
    LOAD = "load"  # the window's load asks for more: grown at once
    SLO = "slo"  # measured latency above the SLO while work waits: one more
    BOUNDS = "bounds"  # the pool is outside [min, max]: moved to the nearest bound
    SHRINK = "shrink"  # the load fits fewer and the cooldown has passed: one fewer
    COOLDOWN = "cooldown"  # the load fits fewer but the pool changed too recently: held
    STEADY = "steady"  # the pool is the size the load needs
    WARMING_UP = "warming-up"  # fewer than two snapshots: no rates yet


@dataclass(frozen=True)
class PoolDecision:
    current: int
    target: int
    need: int  # before bounds and cooldown
    reason: Reason
    detail: str


@dataclass(frozen=True)
class Decision:
    at_s: float
    prefill: PoolDecision
    decode: PoolDecision

    @property
    def changes(self) -> bool:
        return self.prefill.target != self.prefill.current or self.decode.target != self.decode.current


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 2.0000000001 from float noise is 2


def prefill_need(sig: Signals, cap: Capacity, ttft_slo_s: float) -> tuple[int, int, str]:
    """(need from the window's load, need with the queue added, explanation)."""
    remote = 1.0 - sig.local_prefill_fraction
    demand = sig.arrival_rps * sig.mean_prompt_tokens * (1.0 - sig.hit_rate) * remote
    per = cap.prefill_tok_s * UTILISATION
    backlog = sig.prefill.queued_prefill_tokens / ttft_slo_s
    detail = (f"{sig.arrival_rps:.2f} req/s x {sig.mean_prompt_tokens:.0f} tokens x "
              f"(1 - hit {sig.hit_rate:.2f}) x {remote:.2f} remote = {demand:.0f} tok/s; "
              f"{sig.prefill.queued_prefill_tokens} tokens queued; "
              f"{cap.prefill_tok_s:.0f} tok/s per instance ({cap.prefill_source.value})")
    return _ceil(demand / per), _ceil((demand + backlog) / per), detail


def decode_need(sig: Signals, mean_streams: float, cap: Capacity) -> tuple[int, int, str]:
    """(need from the window's mean streams, need from the streams now, explanation)."""
    per = cap.decode_slots * UTILISATION
    detail = (f"{mean_streams:.1f} streams on average, {sig.decode.streams} now "
              f"({sig.decode.queued_requests} queued); {cap.decode_slots} per instance "
              f"({cap.decode_source.value})")
    return _ceil(mean_streams / per), _ceil(sig.decode.streams / per), detail


def _pool(state: PoolState, bounds: Bounds, load: int, now_need: int, slo_missed: bool, detail: str,
          cooldown_s: float, now_s: float) -> PoolDecision:
    cur = state.current
    need = max(load, now_need, cur + 1 if slo_missed else 0)
    if cur < bounds.min or cur > bounds.max:
        return PoolDecision(cur, bounds.clamp(cur), need, Reason.BOUNDS,
                            f"{cur} outside [{bounds.min}, {bounds.max}]; {detail}")
    target = bounds.clamp(need)
    if target > cur:
        if max(load, now_need) < need:
            reason = Reason.SLO
        else:
            reason = Reason.BURST if now_need > load else Reason.LOAD
        return PoolDecision(cur, target, need, reason, detail)
    if target < cur:
        since = now_s - state.last_change_s
        if since < cooldown_s:
            why = f"fits {target}, changed {since:.1f} s ago (cooldown {cooldown_s:g} s); {detail}"
            return PoolDecision(cur, cur, need, Reason.COOLDOWN, why)
        return PoolDecision(cur, cur - 1, need, Reason.SHRINK, detail)
    return PoolDecision(cur, cur, need, Reason.STEADY, detail)


def decide(sig: Signals, mean_streams: float, cap: Capacity, cfg: PolicyConfig, prefill: PoolState,
           decode: PoolState, now_s: float) -> Decision:
    """The pool sizes to move to now (see the module docstring). `mean_streams`: the decode pool's
    running + queued requests averaged over the window."""
    p_load, p_now, p_detail = prefill_need(sig, cap, cfg.ttft_slo_s)
    d_load, d_now, d_detail = decode_need(sig, mean_streams, cap)
    # A queue that grew over the window is arriving faster than the pool serves: one more at least.
    if sig.prefill.queued_tokens_growth > 0 and sig.prefill.queued_requests > 0:
        p_now = max(p_now, prefill.current + 1)
        p_detail += f"; queued tokens grew by {sig.prefill.queued_tokens_growth} over {sig.window_s:.1f} s"
    if sig.decode.queued_requests_growth > 0 and sig.decode.queued_requests > 0:
        d_now = max(d_now, decode.current + 1)
        d_detail += f"; queued requests grew by {sig.decode.queued_requests_growth} over {sig.window_s:.1f} s"
    ttft_missed = sig.ttft_s is not None and sig.ttft_s > cfg.ttft_slo_s and sig.prefill.queued_requests > 0
    # More instances only help TPOT when some instance runs several streams.
    tpot_missed = (sig.tpot_s is not None and sig.tpot_s > cfg.tpot_slo_s
                   and sig.decode.streams > decode.current)
    if ttft_missed:
        p_detail += f"; TTFT {sig.ttft_s:.3f} s > SLO {cfg.ttft_slo_s:g} s"
    if tpot_missed:
        d_detail += f"; TPOT {sig.tpot_s:.3f} s > SLO {cfg.tpot_slo_s:g} s"
    return Decision(
        now_s,
        _pool(prefill, cfg.prefill, p_load, p_now, ttft_missed, p_detail, cfg.cooldown_s, now_s),
        _pool(decode, cfg.decode, d_load, d_now, tpot_missed, d_detail, cfg.cooldown_s, now_s),
    )


def hold(prefill: PoolState, decode: PoolState, now_s: float, why: str) -> Decision:
    """No decision possible yet (no rates): both pools stay as they are."""
    def same(p: PoolState) -> PoolDecision:
        return PoolDecision(p.current, p.current, p.current, Reason.WARMING_UP, why)

    return Decision(now_s, same(prefill), same(decode))
