"""The frozen situation a policy decides on: one request against the fleet as the router sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
    - matches: worker -> leading blocks of the request it holds (`KvIndex.match`); missing = 0.
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

    def of_role(self, role: Role) -> tuple[WorkerState, ...]:
        """The workers of one role, in WorkerId order."""
        return tuple(w for w in self.workers if w.role is role)

    def matched_blocks(self, worker: WorkerId) -> int:
        """Leading blocks of the request this worker holds (0 when unknown)."""
        return self.matches.get(worker, 0)
