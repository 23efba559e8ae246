"""Router gateways for tests of what the router decides before any worker is involved."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from orchestrator.router.admission import Limits
from orchestrator.router.frontend import Frontend
from orchestrator.router.inputs import FleetParams, Link, Role, Topology, WorkerId, WorkerState
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.metrics import RouterMetrics
from orchestrator.router.policy import PolicyName
from orchestrator.router.router import Router
from tandem.request import GenerationRequest
from tandem.stream import PrefillResult, TokenDelta
from tandem.tokenizer import ByteTokenizer


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

    def resume(self, worker: WorkerId, request: GenerationRequest,
               generated: Sequence[int]) -> AsyncIterator[TokenDelta]:
        raise AssertionError("a refused request reached a decode worker")

    async def cancel(self, worker: WorkerId, request_id: str) -> None:
        raise AssertionError("nothing to cancel")


FLEET = FleetParams(kv_bytes_per_block=256 * 3584, topology=Topology(Link(8e9, 1e-5), Link(8e9, 1e-5)))


def full_worker(instance: str, role: Role) -> WorkerState:
    """A worker at its queue limit: admits nothing."""
    return WorkerState(WorkerId(instance), role, "local", prefill_rate_tps=1000.0, queue_length=4,
                       queue_limit=4, running_requests=8, max_running_requests=8)


def refusing_frontend(reports: Sequence[WorkerState], registry: CollectorRegistry) -> Frontend:
    """A byte-tokenizer frontend (context 1024, max_tokens 512, default 16) over a ReportsOnly gateway."""
    return Frontend(tokenizer=ByteTokenizer(), limits=Limits(max_context=1024, default_max_tokens=16, max_tokens=512),
                    router=Router.named(PolicyName.KV, FLEET), index=KvIndex(), gateway=ReportsOnly(reports),
                    metrics=RouterMetrics(registry))
