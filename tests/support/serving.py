"""An in-memory gateway that serves: one decode worker with a prefix cache of block hashes.

It lets the router's request path (Frontend, gRPC server, HTTP API) run end to end without Ray or a
model: each request's tokens are 1, 2, ... max_tokens (text from the byte tokenizer), the worker
reports as cached the leading prompt blocks it already held (its cache is the set of block hashes
it has served, as a real worker's prefix cache is), and it feeds the router's KvIndex like KV events
do. With `hold` cleared, streams stop after their first token until it is set again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from orchestrator.router.admission import Limits
from orchestrator.router.frontend import Frontend, WorkerGone
from orchestrator.router.inputs import DisaggMode, Role, WorkerId, WorkerState
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.quotas import RequestLimits
from support.gateways import byte_frontend
from tandem.blocks import BLOCK_SIZE
from tandem.request import GenerationRequest
from tandem.stream import Finish, PrefillResult, RequestSummary, TokenDelta
from tandem.tokenizer import ByteTokenizer

DECODE = WorkerId("decode-0")


class ServingGateway:
    """One decode worker that prefills locally and streams 1..max_tokens."""

    def __init__(self, index: KvIndex) -> None:
        self.index = index
        self.cache: set[int] = set()
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[str] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self._tok = ByteTokenizer()

    def reports(self) -> Sequence[WorkerState]:
        return (WorkerState(DECODE, Role.DECODE, "local", prefill_rate_tps=1e6, kv_blocks_total=4096,
                            max_running_requests=1024, queue_limit=1024),)

    async def prefill(self, worker: WorkerId, decode: WorkerId, request: GenerationRequest) -> PrefillResult:
        raise WorkerGone(f"{worker}: this gateway has no prefill worker")

    async def decode(self, worker: WorkerId, request: GenerationRequest,
                     prefilled: PrefillResult | None) -> AsyncIterator[TokenDelta]:
        self.requests.append(request)
        hashes = request.block_hashes
        hit = 0
        while hit < len(hashes) and hashes[hit] in self.cache:
            hit += 1
        self.cache.update(hashes)
        self.index.stored(worker, hashes)
        n = request.sampling.max_tokens
        for i in range(1, n + 1):
            if i == 2:
                await self.hold.wait()
            await asyncio.sleep(0)
            token = (i % 200) + 32
            if i < n:
                yield TokenDelta(request.request_id, (token,), self._tok.decode([token]))
                continue
            summary = RequestSummary(len(request.prompt_ids), n, cached_tokens=hit * BLOCK_SIZE)
            yield TokenDelta(request.request_id, (token,), self._tok.decode([token]), Finish.LENGTH, summary)

    async def cancel(self, worker: WorkerId, request_id: str) -> None:
        self.cancelled.append(request_id)


def serving_frontend(registry: CollectorRegistry, quotas: RequestLimits = RequestLimits(),
                     max_context: int = 4096) -> tuple[Frontend, ServingGateway]:
    """A byte-tokenizer frontend (max_tokens 512, default 8) over a fresh ServingGateway."""
    index = KvIndex()
    gateway = ServingGateway(index)
    limits = Limits(max_context=max_context, default_max_tokens=8, max_tokens=512)
    frontend = byte_frontend(gateway, registry, limits=limits, mode=DisaggMode.NEVER, index=index, quotas=quotas)
    return frontend, gateway
