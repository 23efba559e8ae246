"""The frozen situation a policy decides on: one request against the fleet as the router sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.router.inputs import FleetParams, Role, RouteRequest, WorkerId, WorkerState


@dataclass(frozen=True, order=True)
class WorkerPair:
    """A (prefill, decode) pair; prefill None = the decode prefills locally."""

    prefill: WorkerId | None
    decode: WorkerId


@dataclass(frozen=True)
class RoutingView:
    """Everything a policy may look at, already folded together by the `Router`.

    - workers: every live worker, with this router's not-yet-reported bookings added to its
      reported load (see `LoadBook.fold`), sorted by WorkerId.
    - matches: worker -> leading blocks of the request it holds as resumable hits (`KvIndex.match`):
      what a prefill, local or not, starts from; missing = 0.
    - held: worker -> leading blocks it holds of either kind, resumable or pulled without a boundary
      (`KvIndex.match_held`): what a handoff to it need not move. Never below `matches`; a worker
      missing here holds no more than its `matches` count (a caller without held-only blocks
      passes nothing).
    - affinity: the pair this request's session was last routed to, None if none / no session.
    - decisions_made: how many routes this router booked before (round-robin's counter).
    - now_s: the caller's clock; policies never read one.
    """

    request: RouteRequest
    workers: tuple[WorkerState, ...]
    matches: Mapping[WorkerId, int]
    fleet: FleetParams
    affinity: WorkerPair | None = None
    decisions_made: int = 0
    now_s: float = 0.0
    held: Mapping[WorkerId, int] = field(default_factory=dict)

    def of_role(self, role: Role) -> tuple[WorkerState, ...]:
        """The workers of one role, in WorkerId order."""
        return tuple(w for w in self.workers if w.role is role)

    def matched_blocks(self, worker: WorkerId) -> int:
        """Leading blocks of the request this worker holds as resumable hits (0 when unknown)."""
        return self.matches.get(worker, 0)

    def held_blocks(self, worker: WorkerId) -> int:
        """Leading blocks of the request this worker holds of either kind (>= `matched_blocks`)."""
        return max(self.held.get(worker, 0), self.matches.get(worker, 0))
