"""Router gateways for tests of what the router decides before any worker is involved."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from orchestrator.router.admission import Limits
from orchestrator.router.frontend import Frontend, Gateway
from orchestrator.router.inputs import (
    DisaggMode,
    DisaggThresholds,
    FleetParams,
    Link,
    Role,
    Topology,
    WorkerId,
    WorkerState,
)
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


SMALL = Limits(max_context=1024, default_max_tokens=16, max_tokens=512)


def byte_frontend(gateway: Gateway, registry: CollectorRegistry, *, limits: Limits = SMALL,
                  mode: DisaggMode | None = None, index: KvIndex | None = None, **kwargs) -> Frontend:
    """A byte-tokenizer frontend (by default context 1024, max_tokens 512, default 16) over `gateway`,
    routing with the KV policy on FLEET (its disaggregation `mode` when given); `kwargs` go to Frontend."""
    fleet = FLEET if mode is None else dataclasses.replace(FLEET, disagg=DisaggThresholds(mode))
    return Frontend(tokenizer=ByteTokenizer(), limits=limits, router=Router.named(PolicyName.KV, fleet),
                    index=KvIndex() if index is None else index, gateway=gateway, metrics=RouterMetrics(registry),
                    **kwargs)


def refusing_frontend(reports: Sequence[WorkerState], registry: CollectorRegistry) -> Frontend:
    """A byte-tokenizer frontend (context 1024, max_tokens 512, default 16) over a ReportsOnly gateway."""
    return byte_frontend(ReportsOnly(reports), registry)
