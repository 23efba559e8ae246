"""`round-robin`: the next prefill worker and the next decode worker in turn, caches ignored.

The k-th decision (k = the router's decision counter) starts at position k mod n of each side's
workers in WorkerId order and takes the first admitting one from there, wrapping around. Always
disaggregated, like a plain round-robin proxy in front of a P/D fleet (local prefill only when
the disaggregation mode is NEVER).
"""

from __future__ import annotations

from orchestrator.router.decision import Reason, Refusal, RouteOutcome
from orchestrator.router.inputs import DisaggMode, FleetParams, Role, WorkerState
from orchestrator.router.outcome import decision, open_workers
from orchestrator.router.view import RoutingView


class RoundRobinPolicy:
    """Pure: the turn comes from view.decisions_made, so the policy holds no counter."""

    def __init__(self, fleet: FleetParams) -> None:
        self.fleet = fleet

    @staticmethod
    def _turn(view: RoutingView, role: Role) -> WorkerState:
        """The first admitting worker of role from position decisions_made mod n; the caller has
        checked (open_workers) that one exists."""
        workers = view.of_role(role)
        k = view.decisions_made
        for i in range(len(workers)):
            w = workers[(k + i) % len(workers)]
            if w.admits:
                return w
        raise RuntimeError(f"no admitting {role.value} worker although open_workers found one")

    def choose(self, view: RoutingView) -> RouteOutcome:
        """Next admitting prefill and decode in turn, or the refusal for the side that has none.
        With disaggregation mode NEVER (aggregated serving) the decode prefills locally."""
        decodes = open_workers(view, Role.DECODE)
        if isinstance(decodes, Refusal):
            return decodes
        decode = self._turn(view, Role.DECODE)
        if view.fleet.disagg.mode is DisaggMode.NEVER:
            return decision(view, None, decode, Reason.ROUND_ROBIN)
        prefills = open_workers(view, Role.PREFILL)
        if isinstance(prefills, Refusal):
            return prefills
        return decision(view, self._turn(view, Role.PREFILL), decode, Reason.ROUND_ROBIN)
