"""The router's load book: what it booked that the workers have not reported yet.

Workers report their load every so often; between reports the router must still see its own
decisions, or a burst would all land on the worker that looked idle at the last report. The book
keeps each routed request's load from booking until release, and `fold` adds to each worker's
reported state the bookings that report cannot contain yet.

Contract with reports: a `WorkerState` stamped `reported_at_s = t` includes every booking made
strictly before t. So a booking made at time b counts on top of a report at t iff b >= t, and it
stops counting once released (`prefill_done` for the prefill part, `finish` for all of it).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.router.decision import RouteDecision
from orchestrator.router.inputs import WorkerId, WorkerState
from orchestrator.router.view import WorkerPair


@dataclass(frozen=True)
class Booking:
    """One routed request's load: prefill tokens on the prefilling worker, KV blocks on the decode."""

    request_id: str
    pair: WorkerPair
    prefill_tokens: int
    decode_blocks: int
    booked_at_s: float

    @property
    def prefiller(self) -> WorkerId:
        """The worker that runs the prefill: the prefill worker, or the decode when local."""
        return self.pair.prefill if self.pair.prefill is not None else self.pair.decode


@dataclass
class _Open:
    booking: Booking
    prefill_open: bool = True


class LoadBook:
    """Open bookings, the session -> last pair map, and the decision counter. Not thread-safe:
    one router event loop owns it."""

    def __init__(self, max_sessions: int = 65_536) -> None:
        if max_sessions < 1:
            raise ValueError(f"LoadBook.max_sessions = {max_sessions}: must be >= 1")
        self._open: dict[str, _Open] = {}
        self._sessions: OrderedDict[str, WorkerPair] = OrderedDict()
        self._max_sessions = max_sessions
        self.decisions_made = 0

    @property
    def max_sessions(self) -> int:
        """How many sessions' last pairs are remembered (the least recently routed goes first)."""
        return self._max_sessions

    def __len__(self) -> int:
        """Open bookings."""
        return len(self._open)

    def affinity(self, session_id: str | None) -> WorkerPair | None:
        """The pair this session was last booked on, None for no session or an unknown one."""
        return None if session_id is None else self._sessions.get(session_id)

    def book(self, decision: RouteDecision, session_id: str | None, now_s: float) -> Booking:
        """Record a decision's load (uncached tokens on the prefiller, newly allocated blocks on the
        decode) and the session's pair. A request id may be booked once until finished."""
        if decision.request_id in self._open:
            raise ValueError(f"request_id {decision.request_id!r} is already booked")
        pair = WorkerPair(decision.prefill, decision.decode)
        booking = Booking(
            decision.request_id, pair, decision.uncached_tokens, decision.decode_alloc_blocks, now_s
        )
        self._open[decision.request_id] = _Open(booking)
        self.decisions_made += 1
        if session_id is not None:
            self._sessions[session_id] = pair
            self._sessions.move_to_end(session_id)
            if len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)  # least recently routed session
        return booking

    def prefill_done(self, request_id: str) -> None:
        """The first token came back: the prefiller's queued work for it is done. A request no
        longer tracked (finished, or already in every report and dropped) is left as it is."""
        entry = self._open.get(request_id)
        if entry is not None:
            entry.prefill_open = False

    def finish(self, request_id: str) -> None:
        """The request ended (done, cancelled, failed): release all its load; unknown ids: nothing to do."""
        self._open.pop(request_id, None)

    def fold(self, workers: Iterable[WorkerState]) -> tuple[WorkerState, ...]:
        """The workers (sorted by id) with the open bookings their reports cannot contain added.

        Bookings that every touched worker has already reported are dropped as a side effect:
        from then on the reports carry their load.
        """
        by_id = {w.worker: w for w in workers}
        extra: dict[WorkerId, list[int]] = {}  # worker -> [prefill tokens, queued, blocks, running]
        stale: list[str] = []
        for rid, entry in self._open.items():
            b = entry.booking
            pending = False
            if entry.prefill_open:
                pre = by_id.get(b.prefiller)
                if pre is not None and b.booked_at_s >= pre.reported_at_s:
                    acc = extra.setdefault(b.prefiller, [0, 0, 0, 0])
                    acc[0] += b.prefill_tokens
                    acc[1] += 1
                    pending = True
            dec = by_id.get(b.pair.decode)
            if dec is not None and b.booked_at_s >= dec.reported_at_s:
                acc = extra.setdefault(b.pair.decode, [0, 0, 0, 0])
                acc[2] += b.decode_blocks
                acc[3] += 1
                pending = True
            if not pending and b.prefiller in by_id and b.pair.decode in by_id:
                stale.append(rid)
        for rid in stale:
            del self._open[rid]
        out = []
        for wid in sorted(by_id):
            w = by_id[wid]
            acc = extra.get(wid)
            if acc is not None:
                w = dataclasses.replace(
                    w,
                    queued_prefill_tokens=w.queued_prefill_tokens + acc[0],
                    queue_length=w.queue_length + acc[1],
                    kv_blocks_used=w.kv_blocks_used + acc[2],
                    running_requests=w.running_requests + acc[3],
                )
            out.append(w)
        return tuple(out)
