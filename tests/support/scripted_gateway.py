"""An in-memory gateway that answers every request with a scripted token stream.

For tests of what the router and the HTTP API make of workers' deltas (formats, streaming), with
no model behind them: each request gets the same `Step`s (their logprobs only when it asked, cut
to its top_logprobs); the last one ends it (with `finish`: LENGTH unless told). With `split` the
router always disaggregates (a prefill worker must be reported): the prefill answers with the
first step, the decode streams the rest after it; without, decode workers do it all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from orchestrator.router.admission import Limits
from orchestrator.router.frontend import Frontend
from orchestrator.router.inputs import DisaggMode, Role, WorkerId, WorkerState
from support.gateways import SMALL, byte_frontend
from tandem.request import GenerationRequest
from tandem.stream import Finish, PrefillResult, RequestSummary, TokenDelta, TokenLogprob


@dataclass(frozen=True)
class Step:
    """One engine step of the script: its tokens, the text they release, their logprobs."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


def idle_worker(instance: str, role: Role) -> WorkerState:
    """A worker with room for anything."""
    return WorkerState(WorkerId(instance), role, "local", prefill_rate_tps=1000.0, kv_blocks_total=1000,
                       max_running_requests=64, queue_limit=64)


class ScriptedGateway:
    """Serves every request with `steps` (see the module docstring); records what it was asked."""

    def __init__(self, steps: Sequence[Step], reports: Sequence[WorkerState],
                 finish: Finish = Finish.LENGTH) -> None:
        if not steps:
            raise ValueError("ScriptedGateway: the script needs at least one step")
        self.steps = tuple(steps)
        self.finish = finish
        self._reports = tuple(reports)
        self.requests: list[GenerationRequest] = []
        self.prefills = 0

    def reports(self) -> Sequence[WorkerState]:
        return self._reports

    def _delta(self, request: GenerationRequest, i: int) -> TokenDelta:
        s = self.steps[i]
        # As a worker does: logprobs only when asked, and at most the alternatives asked for.
        n = request.sampling.top_logprobs
        lps = tuple(TokenLogprob(lp.token_id, lp.logprob, lp.top[:n]) for lp in s.logprobs
                    ) if request.sampling.logprobs else ()
        if i < len(self.steps) - 1:
            return TokenDelta(request.request_id, s.token_ids, s.text, logprobs=lps)
        total = sum(len(x.token_ids) for x in self.steps)
        summary = RequestSummary(prompt_tokens=len(request.prompt_ids), completion_tokens=total)
        return TokenDelta(request.request_id, s.token_ids, s.text, self.finish, summary, lps)

    async def prefill(self, worker: WorkerId, decode: WorkerId, request: GenerationRequest) -> PrefillResult:
        self.requests.append(request)
        self.prefills += 1
        first = self._delta(request, 0)
        handoff = None if first.finish is not None else b"scripted"
        return PrefillResult(request.request_id, first, handoff, 0.0, 0.0, 0)

    async def decode(self, worker: WorkerId, request: GenerationRequest,
                     prefilled: PrefillResult | None) -> AsyncIterator[TokenDelta]:
        if prefilled is None:
            self.requests.append(request)
        for i in range(0 if prefilled is None else 1, len(self.steps)):
            yield self._delta(request, i)

    async def cancel(self, worker: WorkerId, request_id: str) -> None:
        return None


def scripted_frontend(gateway: ScriptedGateway, registry: CollectorRegistry, *, split: bool,
                      limits: Limits = SMALL) -> Frontend:
    """A byte-tokenizer frontend (by default context 1024, max_tokens 512, default 16) over `gateway`."""
    return byte_frontend(gateway, registry, limits=limits, mode=DisaggMode.ALWAYS if split else DisaggMode.NEVER)
