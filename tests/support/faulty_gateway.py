"""An in-memory gateway whose workers fail as a test scripts: the frontend's migration tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from orchestrator.router.frontend import Frontend, WorkerLost
from orchestrator.router.inputs import DisaggMode, Role, WorkerId, WorkerState
from support.gateways import byte_frontend
from tandem.request import GenerationRequest
from tandem.stream import Finish, PrefillResult, RequestSummary, TokenDelta


def script_token(prompt_ids: Sequence[int], position: int) -> int:
    """The token a FaultyWorkers worker produces at `position` (0 = first output token): a
    function of the prompt and the position only, as the workers' greedy / seeded tokens are."""
    return (sum(prompt_ids) * 31 + position * 17) % 251 + 1


def scripted_tokens(prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
    """What a fault-free FaultyWorkers run streams for a prompt (it never stops early)."""
    return [script_token(prompt_ids, p) for p in range(max_tokens)]


class FaultyWorkers:
    """In-memory prefill and decode workers whose faults a test scripts (see `script_token`).

    lose_after[w] = n: decode worker `w` streams n tokens (over all its requests), then is lost:
    its open stream ends with Finish.ABORTED and it leaves the reports, as a dead rank does.
    fail_take: decode workers that raise WorkerLost when handed a request (the call broke).
    fail_prefill: prefill workers that raise WorkerLost (died mid-prefill).
    `calls` records (kind, worker, tokens given) for "prefill", "decode", "resume" and "cancel".
    """

    def __init__(self, prefills: int = 2, decodes: int = 2) -> None:
        self.workers = [WorkerState(WorkerId(f"prefill-{i}"), Role.PREFILL, "local", prefill_rate_tps=1000.0,
                                    kv_blocks_total=64) for i in range(prefills)]
        self.workers += [WorkerState(WorkerId(f"decode-{i}"), Role.DECODE, "local", prefill_rate_tps=1000.0,
                                     kv_blocks_total=64) for i in range(decodes)]
        self.lose_after: dict[WorkerId, int] = {}
        self.fail_take: set[WorkerId] = set()
        self.fail_prefill: set[WorkerId] = set()
        self.calls: list[tuple[str, WorkerId, tuple[int, ...]]] = []
        self._gone: set[WorkerId] = set()

    def reports(self) -> Sequence[WorkerState]:
        return [w for w in self.workers if w.worker not in self._gone]

    async def prefill(self, worker: WorkerId, decode: WorkerId, request: GenerationRequest) -> PrefillResult:
        self.calls.append(("prefill", worker, ()))
        if worker in self.fail_prefill:
            self._gone.add(worker)
            raise WorkerLost(worker, f"prefill worker {worker} died")
        tok = script_token(request.prompt_ids, 0)
        done = request.sampling.max_tokens == 1
        first = (TokenDelta(request.request_id, (tok,), "", Finish.LENGTH, RequestSummary(len(request.prompt_ids), 1))
                 if done else TokenDelta(request.request_id, (tok,), ""))
        return PrefillResult(request.request_id, first, None if done else b"handoff", 0.0, 0.0, 0)

    def decode(self, worker: WorkerId, request: GenerationRequest,
               prefilled: PrefillResult | None) -> AsyncIterator[TokenDelta]:
        self.calls.append(("decode", worker, ()))
        return self._run(worker, request, 1 if prefilled is not None else 0)

    def resume(self, worker: WorkerId, request: GenerationRequest,
               generated: Sequence[int]) -> AsyncIterator[TokenDelta]:
        self.calls.append(("resume", worker, tuple(generated)))
        return self._run(worker, request, len(generated))

    async def _run(self, worker: WorkerId, request: GenerationRequest, start: int) -> AsyncIterator[TokenDelta]:
        rid, n = request.request_id, request.sampling.max_tokens
        if worker in self.fail_take:
            self._gone.add(worker)
            raise WorkerLost(worker, f"decode worker {worker} died taking {rid}")
        for pos in range(start, n):
            left = self.lose_after.get(worker)
            if left is not None and left <= 0:
                self._gone.add(worker)
                yield TokenDelta(rid, (), "", Finish.ABORTED, RequestSummary(0, 0, error=f"{worker} died"))
                return
            if left is not None:
                self.lose_after[worker] = left - 1
            tok = script_token(request.prompt_ids, pos)
            await asyncio.sleep(0)
            if pos == n - 1:
                yield TokenDelta(rid, (tok,), "", Finish.LENGTH, RequestSummary(len(request.prompt_ids), n))
                return
            yield TokenDelta(rid, (tok,), "")

    async def cancel(self, worker: WorkerId, request_id: str) -> None:
        self.calls.append(("cancel", worker, ()))


def faulty_frontend(gateway: FaultyWorkers, registry: CollectorRegistry, *, max_migrations: int = 2,
                      mode: DisaggMode = DisaggMode.ALWAYS) -> Frontend:
    """A byte-tokenizer frontend over a FaultyWorkers; every request disaggregated by default."""
    return byte_frontend(gateway, registry, mode=mode, max_migrations=max_migrations)
