"""Live load as the autoscaler sees it: rates over a recent window, queues as they are now.

The router hands out `LoadSnapshot`s (cumulative counters + each rank's last report). A
`SignalWindow` keeps the snapshots of the last `window_s` seconds and turns the oldest and newest
into `Signals`: arrival rate, mean prompt and output lengths, prefix hit rate and measured TTFT /
TPOT over the window, and per pool the queues of the newest snapshot and how much they grew since
the oldest (a burst shows in the queues before it shows in any average).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from orchestrator.router.inputs import Role
from orchestrator.router.load import LoadSnapshot, RankLoad, RequestCounters


@dataclass(frozen=True)
class PoolLoad:
    """One pool at the newest snapshot. Draining ranks are left out: they take no new work."""

    instances: int  # instances the router routes to
    queued_requests: int
    queued_prefill_tokens: int
    running_requests: int
    queued_requests_growth: int  # queued_requests now minus at the window's start
    queued_tokens_growth: int  # the same for queued prefill tokens

    @property
    def streams(self) -> int:
        """Requests this pool holds: running or waiting for a slot."""
        return self.running_requests + self.queued_requests


@dataclass(frozen=True)
class Signals:
    """What the policy decides from. Rates are per second over `window_s`; means are per request.

    ttft_s / tpot_s are the means of what the router measured over the window, None when no request
    reached that point in it. mean_output_tokens is None when no request finished in the window.
    """

    window_s: float
    arrival_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float | None
    output_tok_s: float  # tokens streamed to clients per second
    hit_rate: float  # cached / routed full prompt blocks (0 when none was routed)
    ttft_s: float | None
    tpot_s: float | None
    prefill: PoolLoad
    decode: PoolLoad
    local_prefill_fraction: float = 0.0  # of routing decisions, those the decode prefills itself


def _pool(ranks: tuple[RankLoad, ...], earlier: tuple[RankLoad, ...], role: Role) -> PoolLoad:
    live = [r for r in ranks if r.role is role and not r.draining]
    before = [r for r in earlier if r.role is role and not r.draining]
    queued = sum(r.queued_requests for r in live)
    tokens = sum(r.queued_prefill_tokens for r in live)
    return PoolLoad(
        instances=len({r.instance for r in live}), queued_requests=queued, queued_prefill_tokens=tokens,
        running_requests=sum(r.running_requests for r in live),
        queued_requests_growth=queued - sum(r.queued_requests for r in before),
        queued_tokens_growth=tokens - sum(r.queued_prefill_tokens for r in before),
    )


def signals_between(first: LoadSnapshot, last: LoadSnapshot) -> Signals:
    """Signals over (first, last]. ValueError when last is not later than first or a counter went
    down (the router restarted between them)."""
    span = last.at_s - first.at_s
    if span <= 0:
        raise ValueError(f"snapshots at {first.at_s} and {last.at_s}: the second must be later")
    d: RequestCounters = last.counters.minus(first.counters)
    return Signals(
        window_s=span,
        arrival_rps=d.arrivals / span,
        mean_prompt_tokens=d.prompt_tokens / d.arrivals if d.arrivals else 0.0,
        mean_output_tokens=d.output_tokens / d.finished if d.finished else None,
        output_tok_s=d.output_tokens / span,
        hit_rate=d.cached_blocks / d.prompt_blocks if d.prompt_blocks else 0.0,
        ttft_s=d.ttft_sum_s / d.ttft_count if d.ttft_count else None,
        tpot_s=d.tpot_sum_s / d.tpot_count if d.tpot_count else None,
        prefill=_pool(last.ranks, first.ranks, Role.PREFILL),
        decode=_pool(last.ranks, first.ranks, Role.DECODE),
        local_prefill_fraction=d.local_prefills / d.routed if d.routed else 0.0,
    )


class SignalWindow:
    """The snapshots of the last `window_s` seconds (and the one just before, so the window is
    covered). A snapshot whose counters are below the previous one's (a restarted router) starts
    the window afresh."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"SignalWindow.window_s = {window_s}: must be > 0")
        self.window_s = window_s
        self._snaps: deque[LoadSnapshot] = deque()

    def push(self, snap: LoadSnapshot) -> None:
        """Add the newest snapshot (taken after every one pushed before)."""
        if self._snaps:
            last = self._snaps[-1]
            if snap.at_s <= last.at_s:
                raise ValueError(f"snapshot at {snap.at_s} is not after the previous one at {last.at_s}")
            try:
                snap.counters.minus(last.counters)
            except ValueError:
                self._snaps.clear()
        self._snaps.append(snap)
        while len(self._snaps) > 2 and self._snaps[1].at_s <= snap.at_s - self.window_s:
            self._snaps.popleft()

    @property
    def ready(self) -> bool:
        """Two snapshots at least: rates can be computed."""
        return len(self._snaps) >= 2

    def latest(self) -> LoadSnapshot:
        if not self._snaps:
            raise LookupError("SignalWindow: no snapshot yet")
        return self._snaps[-1]

    def signals(self) -> Signals:
        """Signals over the window; LookupError before two snapshots were pushed."""
        if not self.ready:
            raise LookupError(f"SignalWindow: {len(self._snaps)} snapshot(s); rates need two")
        return signals_between(self._snaps[0], self._snaps[-1])
