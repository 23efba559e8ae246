"""Route and book: the one place a policy's choice becomes load the next decision sees.

`Router.route` folds the book's pending load into the reported worker states, asks the policy,
and books the answer. The gRPC server (and the planner's simulator) call `route` once per
request, `prefill_done` when the first token is back, and `finish` when the request ends.
Matches come from the caller (normally `KvIndex.match(request.block_hashes)`), so this stays
free of the index's events and of any clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from orchestrator.router.booking import LoadBook
from orchestrator.router.decision import RouteDecision, RouteOutcome
from orchestrator.router.inputs import FleetParams, RouteRequest, WorkerId, WorkerState
from orchestrator.router.policy import PolicyName, RoutingPolicy, make_policy
from orchestrator.router.view import RoutingView


class Router:
    """A policy plus its load book. Deterministic: same calls in the same order, same answers."""

    def __init__(self, policy: RoutingPolicy, fleet: FleetParams, book: LoadBook | None = None) -> None:
        self.policy = policy
        self.fleet = fleet
        self.book = book if book is not None else LoadBook()

    @classmethod
    def named(cls, name: PolicyName, fleet: FleetParams) -> Router:
        """A router running the registered policy `name` at its defaults."""
        return cls(make_policy(name, fleet), fleet)

    def route(
        self,
        request: RouteRequest,
        workers: Sequence[WorkerState],
        matches: Mapping[WorkerId, int],
        now_s: float,
        held: Mapping[WorkerId, int] | None = None,
    ) -> RouteOutcome:
        """Choose a pair for request and, if one is chosen, book it at now_s.

        workers are the live workers' latest reports; matches maps worker -> leading blocks of
        request.block_hashes it holds as resumable hits (`KvIndex.match`), held -> leading blocks it
        holds of either kind (`KvIndex.match_held`; None: no worker holds held-only blocks). Raises
        ValueError when the request's block hashes do not cover exactly its full blocks, a match
        exceeds them, or a held count is below the worker's match.
        """
        full = request.prompt_tokens // self.fleet.block_size
        if len(request.block_hashes) != full:
            raise ValueError(
                f"RouteRequest({request.request_id!r}).block_hashes has {len(request.block_hashes)} hashes; "
                f"{request.prompt_tokens} prompt tokens make {full} full blocks of {self.fleet.block_size}"
            )
        for wid, n in matches.items():
            if not 0 <= n <= full:
                raise ValueError(
                    f"matches[{wid}] = {n}: must be in [0, {full}] for request {request.request_id!r}"
                )
        for wid, n in (held.items() if held is not None and held is not matches else ()):
            if not matches.get(wid, 0) <= n <= full:
                raise ValueError(
                    f"held[{wid}] = {n}: must be in [matches[{wid}] = {matches.get(wid, 0)}, {full}] "
                    f"for request {request.request_id!r}"
                )
        view = RoutingView(
            request=request,
            workers=self.book.fold(workers),
            matches=matches,
            fleet=self.fleet,
            affinity=self.book.affinity(request.session_id),
            decisions_made=self.book.decisions_made,
            now_s=now_s,
            held=held if held is not None else {},
        )
        outcome = self.policy.choose(view)
        if isinstance(outcome, RouteDecision):
            self.book.book(outcome, request.session_id, now_s)
        return outcome

    def prefill_done(self, request_id: str) -> None:
        """The request's first token is back: release its prefill load."""
        self.book.prefill_done(request_id)

    def finish(self, request_id: str) -> None:
        """The request ended: release all its load."""
        self.book.finish(request_id)
