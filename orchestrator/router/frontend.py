"""One Generate request from arrival to its last chunk: admit, route, prefill, hand off, stream.

`Frontend.generate` is the router's request path, shared by the gRPC server and the HTTP API:
1. admit: validate and tokenise (`admission.admit`), or INVALID_ARGUMENT naming the field;
2. route: match the prompt's block hashes in the `KvIndex`, let the `Router` choose and book a
   (prefill, decode) pair, or answer RESOURCE_EXHAUSTED / UNAVAILABLE at once;
3. serve: a remote prefill returns the first token (streamed at once) and the handoff; the decode
   pulls the KV and streams the rest; with local prefill the decode does both;
4. release: the booking is released when the first token is back (prefill part) and when the
   stream ends however it ends; a request that ends early (client gone, deadline) is cancelled on
   the workers that hold it.
A worker that fails after it took the request (WorkerLost, or an ABORTED delta: its process died,
its stream broke, it was removed) does not end the request: it migrates. It is routed again
without the lost workers; when tokens were already streamed the new decode re-prefills prompt +
those tokens (`Gateway.resume`) and continues after them, so the client sees the tokens a
fault-free run gives, none twice, none missing. Past `max_migrations` losses: UNAVAILABLE.
The `Gateway` is the router's hands on the workers (Ray actors in a deployment).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.router.admission import Limits, admit
from orchestrator.router.chat.stream import split_chat_output
from orchestrator.router.decision import Refusal, RefusalReason, RouteDecision
from orchestrator.router.inputs import RouteRequest, WorkerId, WorkerState
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.logprobs import logprobs_to_proto
from orchestrator.router.metrics import RouterMetrics
from orchestrator.router.quotas import QuotaExceeded, RequestLimits, StreamSlots, check_request
from orchestrator.router.readiness import Readiness, readiness
from orchestrator.router.router import Router
from orchestrator.router.tenancy import ANONYMOUS, Caller
from tandem.request import GenerationRequest, RequestError
from tandem.stream import Finish, PrefillResult, TokenDelta
from tandem.tokenizer import Tokenizer
from tandem.tracing import RequestTracer, Stage
from tandem.v1 import generate_pb2


class ErrorCode(enum.Enum):
    """The statuses Generate ends with besides OK (gRPC names; the HTTP API maps them too)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


class RouterError(Exception):
    """A request that ends with a status other than OK."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")


class WorkerGone(LookupError):
    """The chosen worker left (drained, removed, dead) before it took the request."""


class WorkerLost(RuntimeError):
    """A worker failed while it held the request (its process died or its call broke)."""

    def __init__(self, worker: WorkerId, message: str) -> None:
        self.worker = worker
        super().__init__(message)


MAX_ROUTE_ATTEMPTS = 3  # routes to workers that left before taking the request
DEFAULT_MAX_MIGRATIONS = 2


class Gateway(Protocol):
    """How the router reaches workers. Implementations must not block the event loop."""

    def reports(self) -> Sequence[WorkerState]:
        """The latest load report of every live worker."""
        ...

    async def prefill(self, worker: WorkerId, decode: WorkerId, request: GenerationRequest) -> PrefillResult:
        """Prefill on `worker` for a decode on `decode`; returns the first token and the handoff.

        Raises WorkerGone when `worker` no longer takes requests, WorkerLost when it failed."""
        ...

    def decode(
        self, worker: WorkerId, request: GenerationRequest, prefilled: PrefillResult | None
    ) -> AsyncIterator[TokenDelta]:
        """The request's deltas from `worker`, ending with the one whose finish is set.

        With `prefilled` the worker pulls the KV by its handoff and continues after its first token;
        without it the worker prefills the prompt itself. Raises WorkerGone (before any delta) when
        `worker` no longer takes requests, WorkerLost when it failed taking it; a worker lost later
        ends the stream with a Finish.ABORTED delta.
        """
        ...

    def resume(self, worker: WorkerId, request: GenerationRequest,
               generated: Sequence[int]) -> AsyncIterator[TokenDelta]:
        """Like `decode` for a request migrated after `generated` tokens were streamed: `worker`
        prefills prompt + generated and yields only the deltas after them."""
        ...

    async def cancel(self, worker: WorkerId, request_id: str) -> None:
        """Stop the request on `worker` and free what it holds there (no-op when unknown)."""
        ...


_FINISH = {
    Finish.STOP: generate_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
}


@dataclass
class _Progress:
    """What the stream has sent so far; the final chunk is built from it."""

    arrival: float
    first_token_at: float | None = None
    streamed: list[int] = field(default_factory=list)  # token ids sent to the client, in order
    prefilled: PrefillResult | None = None  # kept across a re-route of the decode
    prefill_worker: WorkerId | None = None
    done: bool = False  # the request ended normally: nothing to cancel
    holders: list[WorkerId] = field(default_factory=list)
    migrations: int = 0
    resume: bool = False  # a worker was lost after tokens were streamed: the next decode resumes
    lost: set[WorkerId] = field(default_factory=set)

    @property
    def tokens(self) -> int:
        return len(self.streamed)


class Frontend:
    """The request path. One per router process; runs on one asyncio loop."""

    def __init__(self, *, tokenizer: Tokenizer, limits: Limits, router: Router, index: KvIndex,
                 gateway: Gateway, metrics: RouterMetrics,
                 clock: Callable[[], float] = time.monotonic,
                 max_migrations: int = DEFAULT_MAX_MIGRATIONS,
                 quotas: RequestLimits = RequestLimits()) -> None:
        if max_migrations < 0:
            raise ValueError(f"Frontend.max_migrations must be >= 0, got {max_migrations}")
        self.max_migrations = max_migrations
        self.tokenizer = tokenizer
        self.limits = limits
        self.router = router
        self.index = index
        self.gateway = gateway
        self.metrics = metrics
        self.clock = clock
        self.quotas = quotas
        self.slots = StreamSlots(quotas)
        # Per-request stage lines under the request's trace id (tandem.tracing), spans if OpenTelemetry.
        self.tracer = RequestTracer("router", "router")

    def readiness(self) -> Readiness:
        """Whether a request can be routed now (`orchestrator.router.readiness`)."""
        return readiness(self.gateway.reports(), self.router.fleet.disagg)

    async def generate(self, msg: generate_pb2.GenerateRequest,
                       caller: Caller = ANONYMOUS) -> AsyncIterator[generate_pb2.GenerateChunk]:
        """The chunks of one request; raises RouterError for a non-OK ending.

        `caller` is the authenticated tenant and client (the servers pass it; ANONYMOUS when auth is
        off): its tenant salts the prefix cache, and the stream holds one of its slots until it ends."""
        arrival = self.clock()
        try:
            req = admit(msg, self.tokenizer, self.limits, tenant=caller.tenant.name)
            check_request(req, self.quotas)
        except RequestError as exc:
            raise RouterError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            slot = self.slots.take(caller)
        except QuotaExceeded as exc:
            raise RouterError(ErrorCode.RESOURCE_EXHAUSTED, str(exc)) from None
        self.metrics.arrivals.inc()
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self.metrics.in_flight.inc()
        self.tracer.begin(req.trace_id, req.request_id, prompt_tokens=len(req.prompt_ids),
                          max_tokens=req.sampling.max_tokens)
        try:
            stream = self._attempts(req, _Progress(arrival))
            if msg.deadline_ms:
                stream = _with_deadline(stream, msg.deadline_ms / 1000.0)
            if msg.messages:  # chat: the model's text split into answer, reasoning and tool calls
                stream = split_chat_output(stream, thinking=msg.chat.thinking, tools=bool(msg.chat.tools))
            async for chunk in stream:
                yield chunk
        except RouterError as exc:
            self.tracer.end(req.request_id, Stage.ABORTED, error=exc.code.value)
            raise
        finally:
            slot.release()
            self.metrics.in_flight.dec()
            self.tracer.end(req.request_id, Stage.FINISHED, reason="cancelled")  # no-op once ended

    async def _attempts(self, req: GenerationRequest,
                        progress: _Progress) -> AsyncIterator[generate_pb2.GenerateChunk]:
        """Route and serve. A worker that left before taking the request is routed around (a prefill
        again from scratch, a decode again with the prefill's handoff, which is still held); a
        worker lost while holding it is a migration (see the module docstring)."""
        gone = 0
        try:
            while True:
                decision = self._route(req, self.clock(), progress.lost)
                try:
                    async for chunk in self._serve(req, decision, progress):
                        yield chunk
                    return
                except WorkerGone as exc:
                    gone += 1
                    if gone >= MAX_ROUTE_ATTEMPTS:
                        raise RouterError(ErrorCode.UNAVAILABLE, f"{exc}; none took over") from None
                except WorkerLost as exc:
                    self._migrate(req, progress, exc)
                finally:
                    self.router.finish(req.request_id)
        finally:
            if not progress.done:
                for w in progress.holders:
                    if w not in progress.lost:
                        await asyncio.shield(self.gateway.cancel(w, req.request_id))

    def _migrate(self, req: GenerationRequest, progress: _Progress, exc: WorkerLost) -> None:
        """Count a lost worker; UNAVAILABLE past the limit, else the next route takes over."""
        progress.migrations += 1
        progress.lost.add(exc.worker)
        if progress.migrations > self.max_migrations:
            raise RouterError(ErrorCode.UNAVAILABLE, f"request {req.request_id} lost its worker "
                                                     f"{progress.migrations} times: {exc}") from None
        self.metrics.migrations.inc()
        if progress.streamed:
            progress.resume = True
        elif progress.prefilled is None:
            progress.prefill_worker = None

    def _route(self, req: GenerationRequest, now: float, lost: set[WorkerId]) -> RouteDecision:
        route_req = RouteRequest(req.request_id, len(req.prompt_ids), req.block_hashes, req.session_id)
        # resumable hits decide where the prompt is computed; held pulled pages only spare a handoff
        matches, held = self.index.match_views(req.block_hashes)
        reports = [w for w in self.gateway.reports() if w.worker not in lost]
        outcome = self.router.route(route_req, reports, matches, now, held)
        if isinstance(outcome, Refusal):
            code = (ErrorCode.RESOURCE_EXHAUSTED if outcome.reason is RefusalReason.QUEUES_FULL
                    else ErrorCode.UNAVAILABLE)
            raise RouterError(code, outcome.detail)
        self.metrics.decisions.labels(outcome.reason.value).inc()
        self.tracer.stage(req.request_id, Stage.ROUTED, reason=outcome.reason.value,
                          decode=_name(outcome.decode),
                          prefill=_name(outcome.prefill) if outcome.prefill is not None else "local")
        self.metrics.prompt_blocks.inc(len(req.block_hashes))
        prefiller = outcome.prefill if outcome.prefill is not None else outcome.decode
        self.metrics.cached_blocks.inc(min(matches.get(prefiller, 0), len(req.block_hashes)))
        return outcome

    async def _serve(self, req: GenerationRequest, d: RouteDecision,
                     progress: _Progress) -> AsyncIterator[generate_pb2.GenerateChunk]:
        if progress.resume:  # the decode re-prefills prompt + streamed tokens; any prefill is skipped
            stream = self.gateway.resume(d.decode, req, tuple(progress.streamed))
        else:
            if progress.prefilled is None and d.prefill is not None:
                progress.holders.append(d.prefill)
                progress.prefill_worker = d.prefill
                progress.prefilled = await self.gateway.prefill(d.prefill, d.decode, req)
                self.router.prefill_done(req.request_id)
                first = progress.prefilled.first
                if first.finish is not None:
                    progress.done = True
                    yield self._last(req, d, progress, first)
                    return
                yield self._chunk(progress, first)
            stream = self.gateway.decode(d.decode, req, progress.prefilled)
        took = False
        async for delta in stream:
            if not took:
                took = True
                progress.holders.append(d.decode)
                self.router.prefill_done(req.request_id)
            if delta.finish is None:
                yield self._chunk(progress, delta)
                continue
            if delta.finish is Finish.ABORTED:
                assert delta.summary is not None
                raise WorkerLost(d.decode, f"worker {d.decode} aborted the request: {delta.summary.error}")
            progress.done = True
            yield self._last(req, d, progress, delta)
            return
        raise RouterError(ErrorCode.INTERNAL, f"worker {d.decode} ended the stream without a finish")

    def _chunk(self, progress: _Progress, delta: TokenDelta) -> generate_pb2.GenerateChunk:
        now = self.clock()
        if progress.first_token_at is None and delta.token_ids:
            progress.first_token_at = now
            self.metrics.ttft.observe(now - progress.arrival)
        progress.streamed.extend(delta.token_ids)
        self.metrics.output_tokens.inc(len(delta.token_ids))
        return generate_pb2.GenerateChunk(token_ids=delta.token_ids, text=delta.text,
                                          logprobs=logprobs_to_proto(delta.logprobs))

    def _last(self, req: GenerationRequest, d: RouteDecision, progress: _Progress,
              delta: TokenDelta) -> generate_pb2.GenerateChunk:
        prefilled = progress.prefilled
        chunk = self._chunk(progress, delta)
        s = delta.summary
        assert s is not None and delta.finish is not None
        now = self.clock()
        first = progress.first_token_at if progress.first_token_at is not None else now
        ttft, total = first - progress.arrival, now - progress.arrival
        tpot = (now - first) / (progress.tokens - 1) if progress.tokens > 1 else 0.0
        if progress.tokens > 1:
            self.metrics.tpot.observe(tpot)
        self.metrics.e2e.observe(total)
        self.metrics.kv_transfer_bytes.inc(s.kv_transfer_bytes)
        cached = prefilled.cached_tokens if prefilled is not None else s.cached_tokens
        chunk.finish_reason = _FINISH[delta.finish]
        chunk.usage.CopyFrom(generate_pb2.Usage(prompt_tokens=len(req.prompt_ids),
                                                completion_tokens=progress.tokens, cached_tokens=cached))
        chunk.timing.CopyFrom(generate_pb2.Timing(
            ttft_s=ttft, queue_s=prefilled.queue_s if prefilled else s.queue_s,
            prefill_s=prefilled.prefill_s if prefilled else s.prefill_s, transfer_s=s.transfer_s,
            tpot_s=tpot, total_s=total))
        chunk.prefill_worker = _name(progress.prefill_worker or d.decode)
        chunk.decode_worker = _name(d.decode)
        chunk.kv_transfer_bytes = s.kv_transfer_bytes
        if s.drafted_tokens:
            chunk.speculation.CopyFrom(generate_pb2.Speculation(drafted_tokens=s.drafted_tokens,
                                                                accepted_tokens=s.accepted_tokens))
            self.metrics.drafted_tokens.inc(s.drafted_tokens)
            self.metrics.accepted_tokens.inc(s.accepted_tokens)
        chunk.request_id = req.request_id
        chunk.trace_id = req.trace_id
        self.tracer.end(req.request_id, Stage.FINISHED, reason=delta.finish.value, total_s=total,
                        completion_tokens=progress.tokens, kv_transfer_bytes=s.kv_transfer_bytes)
        return chunk


def _name(w: WorkerId) -> str:
    """The wire name of a worker, e.g. "prefill-0/r0"."""
    return f"{w.instance}/r{w.dp_rank}"


async def _with_deadline(stream: AsyncIterator[generate_pb2.GenerateChunk],
                         seconds: float) -> AsyncIterator[generate_pb2.GenerateChunk]:
    """Re-yield stream until `seconds` after now; then DEADLINE_EXCEEDED (the stream is closed)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    try:
        while True:
            left = end - loop.time()
            if left <= 0:
                raise RouterError(ErrorCode.DEADLINE_EXCEEDED, f"deadline of {seconds:g} s passed")
            try:
                chunk = await asyncio.wait_for(anext(stream), left)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RouterError(ErrorCode.DEADLINE_EXCEEDED, f"deadline of {seconds:g} s passed") from None
            yield chunk
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


__all__ = ["ErrorCode", "Frontend", "Gateway", "RouterError", "WorkerGone", "WorkerLost"]
