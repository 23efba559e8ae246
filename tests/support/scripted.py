"""A router gateway whose one decode worker "generates" scripted text: the model's output without a
model, so the chat parser runs through the real Frontend, gRPC-free, and the real HTTP API."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from orchestrator.router.admission import Limits
from orchestrator.router.frontend import Frontend
from orchestrator.router.inputs import DisaggMode, DisaggThresholds, Role, WorkerId, WorkerState
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.metrics import RouterMetrics
from orchestrator.router.policy import PolicyName
from orchestrator.router.router import Router
from support.gateways import FLEET
from tandem.request import GenerationRequest
from tandem.stream import Finish, PrefillResult, RequestSummary, TokenDelta
from tandem.tokenizer import ByteTokenizer

DECODE = WorkerId("decode-0")
AGGREGATED = dataclasses.replace(FLEET, disagg=DisaggThresholds(mode=DisaggMode.NEVER))  # decode prefills


class ScriptedGateway:
    """One idle decode worker that prefills locally and streams `pieces` as its deltas (one delta per
    piece, token ids = the piece's bytes), then ends with `finish`. Keeps the requests it served."""

    def __init__(self, pieces: Sequence[str], finish: Finish = Finish.STOP) -> None:
        self.pieces = list(pieces)
        self.finish = finish
        self.served: list[GenerationRequest] = []

    def reports(self) -> Sequence[WorkerState]:
        return (WorkerState(DECODE, Role.DECODE, "local", prefill_rate_tps=1e6, kv_blocks_total=4096,
                            max_running_requests=64, queue_limit=64),)

    async def prefill(self, worker: WorkerId, decode: WorkerId, request: GenerationRequest) -> PrefillResult:
        raise AssertionError("the scripted fleet has no prefill worker")

    async def decode(self, worker: WorkerId, request: GenerationRequest,
                     prefilled: PrefillResult | None) -> AsyncIterator[TokenDelta]:
        self.served.append(request)
        ids = [tuple(p.encode()) for p in self.pieces]
        for piece, tok in zip(self.pieces[:-1], ids[:-1], strict=True):
            yield TokenDelta(request.request_id, tok, piece)
        last = self.pieces[-1] if self.pieces else ""
        summary = RequestSummary(prompt_tokens=len(request.prompt_ids), completion_tokens=sum(map(len, ids)))
        yield TokenDelta(request.request_id, ids[-1] if ids else (), last, self.finish, summary)

    def resume(self, worker: WorkerId, request: GenerationRequest,
               generated: Sequence[int]) -> AsyncIterator[TokenDelta]:
        raise AssertionError("nothing is lost in the scripted fleet")

    async def cancel(self, worker: WorkerId, request_id: str) -> None:
        return None


def scripted_frontend(gateway: ScriptedGateway, registry: CollectorRegistry) -> Frontend:
    """A byte-tokenizer frontend (context 65536, max_tokens 4096) over `gateway`."""
    return Frontend(tokenizer=ByteTokenizer(),
                    limits=Limits(max_context=65536, default_max_tokens=256, max_tokens=4096),
                    router=Router.named(PolicyName.KV, AGGREGATED), index=KvIndex(), gateway=gateway,
                    metrics=RouterMetrics(registry))
