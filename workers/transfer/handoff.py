"""The prefill side's handoff table: which finished prefills hold blocks for which decode, until when.

A handoff goes OPEN (blocks held under a lease of `lease_s`) -> CLAIMED (pinned for `pin_s` while
the decode READs) -> gone, freed exactly once by one of:
  - release by the decode (the normal end),
  - lease expiry (no claim within `lease_s`; a later claim answers EXPIRED and the decode recomputes),
  - pin expiry (claimed but never released within `pin_s`: the decode died or hung),
  - `finish` at the prefill (the request ended there: max_tokens 1, EOS or stop as first token;
    such a request never opens a handoff at all).
Epochs: every `open` gets a fresh epoch from a counter that never repeats, so a claim or release
naming a handoff that no longer exists, or an earlier attempt of the same request, can be told
apart from the live one. The decode only trusts bytes it finished reading before the pin deadline
it was granted: the prefill never frees a pinned handoff earlier, so a READ that ends in time can
not have seen reused pages.
The clock is passed in (tests use a fake one); all times are in its seconds.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from workers.kv.geometry import PoolKind
from workers.transfer.metrics import TransferMetrics


@dataclass(frozen=True)
class HandoffPages:
    """Page ids per pool: the request's block pages in block order, the window pages covering its
    last `window` tokens in position order, its compressor-state page."""

    block: tuple[int, ...]
    window: tuple[int, ...]
    state: tuple[int, ...]

    def of(self, pool: PoolKind) -> tuple[int, ...]:
        return {PoolKind.BLOCK: self.block, PoolKind.WINDOW: self.window, PoolKind.STATE: self.state}[pool]

    def shape(self) -> tuple[int, int, int]:
        return len(self.block), len(self.window), len(self.state)


@dataclass(frozen=True)
class HandoffDescriptor:
    """What the prefill returns with the first token, for the decode that will pull.

    `num_tokens` prompt tokens hold KV (the first sampled token does not yet); `window_start` is the
    first token position of window page 0. `lease_s` is informational: the prefill enforces it.
    """

    request_id: str
    agent: str
    epoch: int
    pages: HandoffPages
    num_tokens: int
    window_start: int
    lease_s: float


class ClaimOutcome(enum.Enum):
    GRANTED = "granted"
    EXPIRED = "expired"  # freed already (lease or pin ran out, or released): recompute
    ALREADY_CLAIMED = "already_claimed"  # a second claim of a pinned handoff
    EPOCH_MISMATCH = "epoch_mismatch"  # the request's live handoff has another epoch
    UNKNOWN = "unknown"  # no such request or epoch was ever opened here


@dataclass(frozen=True)
class ClaimAnswer:
    """`pin_s`: seconds from the answer the blocks stay pinned (0 unless GRANTED)."""

    request_id: str
    epoch: int
    outcome: ClaimOutcome
    pin_s: float


class ReleaseOutcome(enum.Enum):
    RELEASED = "released"
    NOT_CLAIMED = "not_claimed"  # open but never claimed: refused, the lease keeps running
    GONE = "gone"  # already freed (pin expiry): the decode's bytes may be stale
    EPOCH_MISMATCH = "epoch_mismatch"
    UNKNOWN = "unknown"


class _State(enum.Enum):
    OPEN = "open"
    CLAIMED = "claimed"


@dataclass
class _Entry:
    descriptor: HandoffDescriptor
    state: _State
    deadline: float


FreePages = Callable[[str, HandoffPages], None]


class HandoffTable:
    """Open handoffs of one prefill rank. `free(request_id, pages)` gives pages back to the pool;
    it is called exactly once per handoff. Not thread-safe: the rank's loop owns it."""

    def __init__(
        self,
        agent: str,
        lease_s: float,
        pin_s: float,
        free: FreePages,
        clock: Callable[[], float],
        metrics: TransferMetrics | None = None,
    ) -> None:
        if lease_s <= 0 or pin_s <= 0:
            raise ValueError(f"HandoffTable: lease_s ({lease_s}) and pin_s ({pin_s}) must be positive")
        self.agent, self.lease_s, self.pin_s = agent, lease_s, pin_s
        self._free, self._clock, self._metrics = free, clock, metrics
        self._live: dict[str, _Entry] = {}
        self._next_epoch = 1

    def __len__(self) -> int:
        return len(self._live)

    def is_live(self, request_id: str) -> bool:
        return request_id in self._live

    def live(self) -> tuple[str, ...]:
        """Request ids of the open and claimed handoffs, in opening order."""
        return tuple(self._live)

    def open(
        self, request_id: str, pages: HandoffPages, num_tokens: int, window_start: int
    ) -> HandoffDescriptor:
        """Hold `pages` for a decode under a fresh epoch and lease."""
        if request_id in self._live:
            raise ValueError(
                f"handoff for request {request_id!r} is already open "
                f"(epoch {self._live[request_id].descriptor.epoch})"
            )
        if num_tokens <= 0 or not pages.block and not pages.window:
            raise ValueError(
                f"handoff for {request_id!r}: num_tokens {num_tokens}, pages {pages.shape()}: "
                "nothing to hand off"
            )
        desc = HandoffDescriptor(
            request_id, self.agent, self._next_epoch, pages, num_tokens, window_start, self.lease_s
        )
        self._next_epoch += 1
        self._live[request_id] = _Entry(desc, _State.OPEN, self._clock() + self.lease_s)
        return desc

    def finish(self, request_id: str, pages: HandoffPages) -> None:
        """The request ended at the prefill: free its pages now; no handoff is ever opened."""
        if request_id in self._live:
            raise ValueError(
                f"finish({request_id!r}): a handoff is open for it; it ends by release or expiry"
            )
        self._free(request_id, pages)

    def _count(self, outcome: ClaimOutcome) -> None:
        if self._metrics is not None:
            self._metrics.claims.labels(outcome=outcome.value).inc()

    def claim(self, request_id: str, epoch: int) -> ClaimAnswer:
        """Pin the handoff for `pin_s` if it is open with this epoch (expiring overdue ones first)."""
        self.expire()
        entry = self._live.get(request_id)
        if entry is None or entry.descriptor.epoch != epoch:
            if entry is not None and epoch < self._next_epoch:
                outcome = ClaimOutcome.EPOCH_MISMATCH
            else:
                outcome = ClaimOutcome.EXPIRED if 0 < epoch < self._next_epoch else ClaimOutcome.UNKNOWN
        elif entry.state is _State.CLAIMED:
            outcome = ClaimOutcome.ALREADY_CLAIMED
        else:
            entry.state, entry.deadline = _State.CLAIMED, self._clock() + self.pin_s
            self._count(ClaimOutcome.GRANTED)
            return ClaimAnswer(request_id, epoch, ClaimOutcome.GRANTED, self.pin_s)
        self._count(outcome)
        return ClaimAnswer(request_id, epoch, outcome, 0.0)

    def release(self, request_id: str, epoch: int) -> ReleaseOutcome:
        """The decode finished reading: free the pages."""
        entry = self._live.get(request_id)
        if entry is None or entry.descriptor.epoch != epoch:
            if entry is not None and epoch < self._next_epoch:
                return ReleaseOutcome.EPOCH_MISMATCH
            return ReleaseOutcome.GONE if 0 < epoch < self._next_epoch else ReleaseOutcome.UNKNOWN
        if entry.state is not _State.CLAIMED:
            return ReleaseOutcome.NOT_CLAIMED
        del self._live[request_id]
        self._free(request_id, entry.descriptor.pages)
        return ReleaseOutcome.RELEASED

    def expire(self) -> tuple[str, ...]:
        """Free every handoff whose lease or pin has run out; returns their request ids."""
        now = self._clock()
        gone = tuple(rid for rid, e in self._live.items() if now >= e.deadline)
        for rid in gone:
            entry = self._live.pop(rid)
            self._free(rid, entry.descriptor.pages)
            if self._metrics is not None:
                self._metrics.lease_expiries.inc()
        return gone

    def next_deadline(self) -> float | None:
        """The earliest lease or pin deadline, None when nothing is open."""
        return min((e.deadline for e in self._live.values()), default=None)
