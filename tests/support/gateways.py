"""Router gateways for tests of what the router decides before any worker is involved."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from orchestrator.router.inputs import WorkerId, WorkerState
from tandem.request import GenerationRequest
from tandem.stream import PrefillResult, TokenDelta


class ReportsOnly:
    """Reports worker states; any call to a worker fails the test (a refused request never gets there)."""

    def __init__(self, reports: Sequence[WorkerState] = ()) -> None:
        self._reports = tuple(reports)

    def reports(self) -> Sequence[WorkerState]:
        return self._reports

    async def prefill(self, worker: WorkerId, decode: WorkerId, request: GenerationRequest) -> PrefillResult:
        raise AssertionError("a refused request reached a prefill worker")

    def decode(self, worker: WorkerId, request: GenerationRequest,
               prefilled: PrefillResult | None) -> AsyncIterator[TokenDelta]:
        raise AssertionError("a refused request reached a decode worker")

    async def cancel(self, worker: WorkerId, request_id: str) -> None:
        raise AssertionError("nothing to cancel")
