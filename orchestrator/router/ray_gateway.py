"""The router's gateway to worker actors on Ray: calls, one token stream per rank, load reports.

Per registered rank the gateway keeps two Ray streams open:
- `stream()`: every StepBatch the rank emits (one message per engine step); the gateway fans the
  deltas out to the requests waiting on them. Decode ranks only: prefill ranks answer `prefill`.
- `reports(interval)`: the rank's WorkerStats and its KV events since the last report; stats become
  the `WorkerState` the policies see, events feed the `KvIndex`.
Draining a rank takes it out of the reports (no new routes) and out of the index, but keeps its
streams open until the controller removes it, so its running requests finish normally.
A rank whose streams fail is dropped (its index entries too) and its waiting requests end with
Finish.ABORTED, so a client never hangs on a dead worker; a call to a dead rank raises WorkerLost.
Both tell the frontend to migrate the request. A rank added with its `kv_snapshot` starts in the
index from that snapshot (a new or restarted router) and reads only the events after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import ray

from orchestrator.router.frontend import WorkerGone, WorkerLost
from orchestrator.router.inputs import Role, WorkerId, WorkerState
from orchestrator.router.kv_index import ApplyResult, KvEvent, KvEventKind, KvIndex
from orchestrator.router.load import RankLoad
from orchestrator.router.metrics import RouterMetrics
from orchestrator.router.worker_metrics import RankReport
from tandem.request import GenerationRequest
from tandem.stream import Finish, PrefillResult, RequestSummary, StepBatch, TokenDelta
from tandem.v1 import worker_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankLimits:
    """What the router assumes about a rank until and beyond its reports."""

    max_running: int
    queue_limit: int
    initial_prefill_rate_tps: float  # before the rank has measured its own


def _worker_state(wid: WorkerId, role: Role, stats: worker_pb2.WorkerStats, limits: RankLimits,
                  now: float) -> WorkerState:
    rate = stats.prefill_tok_s if stats.prefill_tok_s > 0 else limits.initial_prefill_rate_tps
    return WorkerState(
        worker=wid, role=role, nvlink_domain=stats.nvlink_domain or "local", prefill_rate_tps=rate,
        queued_prefill_tokens=stats.queued_prefill_tokens,
        kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_total=max(stats.kv_blocks_used + stats.kv_blocks_free, 1),
        running_requests=stats.running_requests, max_running_requests=limits.max_running,
        queue_length=stats.queued_requests, queue_limit=limits.queue_limit, reported_at_s=now,
    )


def _kv_event(ev: worker_pb2.KvEvent) -> KvEvent:
    kind = ev.WhichOneof("kind")
    if kind == "stored":
        parent = ev.stored.parent_hash if ev.stored.HasField("parent_hash") else None
        return KvEvent(ev.seq, KvEventKind.STORED, tuple(ev.stored.block_hashes), parent, ev.stored.held_only)
    if kind == "removed":
        return KvEvent(ev.seq, KvEventKind.REMOVED, tuple(ev.removed.block_hashes))
    if kind == "cleared":
        return KvEvent(ev.seq, KvEventKind.CLEARED)
    raise ValueError(f"KV event seq {ev.seq} has no kind")


class _Rank:
    def __init__(self, wid: WorkerId, role: Role, handle: object) -> None:
        self.wid, self.role, self.handle = wid, role, handle
        self.state: WorkerState | None = None
        self.stats: worker_pb2.WorkerStats | None = None  # the last report as sent (for `loads`)
        self.draining = False
        self.waiting: dict[str, asyncio.Queue[TokenDelta]] = {}
        self.tasks: list[asyncio.Task] = []


class RayGateway:
    """Implements orchestrator.router.frontend.Gateway over PrefillWorker / DecodeWorker actors."""

    def __init__(self, index: KvIndex, limits: RankLimits, *, report_interval_s: float = 0.25,
                 clock: Callable[[], float] | None = None, metrics: RouterMetrics | None = None) -> None:
        self.index = index
        self.metrics = metrics
        self.limits = limits
        self.report_interval_s = report_interval_s
        self._ranks: dict[WorkerId, _Rank] = {}
        self._clock = clock or time.monotonic

    def _resync(self, wid: WorkerId, snap: worker_pb2.KvSnapshot) -> None:
        """Replace wid's index entries (both kinds) with its snapshot, and count the resync."""
        self.index.resync(wid, tuple(snap.block_hashes), snap.seq, tuple(snap.held_only_hashes))
        if self.metrics is not None:
            self.metrics.kv_resyncs.inc()

    # --- membership ----------------------------------------------------------------------------
    def add(self, wid: WorkerId, role: Role, handle: object, stats: worker_pb2.WorkerStats,
            snapshot: worker_pb2.KvSnapshot | None = None) -> None:
        """Start serving through a ready rank actor, from its first stats (so it is routable at once)
        and, when given, its KV snapshot (its index entries; later events follow from there)."""
        if wid in self._ranks:
            raise ValueError(f"worker {wid} is already registered")
        after_seq = -1
        if snapshot is not None:
            self._resync(wid, snapshot)
            after_seq = snapshot.seq
        rank = _Rank(wid, role, handle)
        rank.state = _worker_state(wid, role, stats, self.limits, self._clock())
        rank.stats = stats
        self._ranks[wid] = rank
        if role is Role.DECODE:
            rank.tasks.append(asyncio.ensure_future(self._pump_tokens(rank)))
        rank.tasks.append(asyncio.ensure_future(self._pump_reports(rank, after_seq)))

    def drain(self, wid: WorkerId) -> None:
        """No new requests for this rank; the ones it runs go on. Unknown ranks are ignored."""
        rank = self._ranks.get(wid)
        if rank is not None:
            rank.draining = True
            self.index.remove_worker(wid)

    def remove(self, wid: WorkerId, why: str = "removed") -> None:
        """Stop routing to a rank; its waiting requests end ABORTED."""
        rank = self._ranks.pop(wid, None)
        if rank is None:
            return
        for t in rank.tasks:
            t.cancel()
        self.index.remove_worker(wid)
        if self.metrics is not None:  # a removed rank's gauges go too: no stale series on /metrics
            for gauge in (self.metrics.worker_queue, self.metrics.worker_queued_tokens):
                with contextlib.suppress(KeyError):  # KeyError: no report was recorded for it
                    gauge.remove(str(wid))
        for rid, q in rank.waiting.items():
            q.put_nowait(TokenDelta(rid, (), "", Finish.ABORTED, RequestSummary(0, 0, error=f"{wid} {why}")))

    def loads(self) -> tuple[RankLoad, ...]:
        """Every registered rank's last report, draining ones included (flagged), for the controller."""
        out = []
        for r in self._ranks.values():
            s = r.stats
            if s is not None:
                out.append(RankLoad(r.wid.instance, r.wid.dp_rank, r.role, r.draining, s.queued_requests,
                                    s.queued_prefill_tokens, s.running_requests, s.prefill_tok_s,
                                    s.decode_tok_s))
        return tuple(out)

    # --- Gateway -------------------------------------------------------------------------------
    def rank_reports(self) -> list[RankReport]:
        """Every registered rank's last WorkerStats (draining ones too), for the workers' /metrics."""
        return [RankReport(r.wid, r.role, r.stats) for r in self._ranks.values() if r.stats is not None]

    def reports(self) -> Sequence[WorkerState]:
        return [r.state for r in self._ranks.values() if r.state is not None and not r.draining]

    async def prefill(self, worker: WorkerId, decode: WorkerId, request: GenerationRequest) -> PrefillResult:
        handle = self._rank(worker).handle
        try:
            return await handle.prefill.remote(request)
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(worker, f"prefill worker {worker} lost request {request.request_id}: "
                                     f"{type(exc).__name__}") from None

    def decode(self, worker: WorkerId, request: GenerationRequest,
               prefilled: PrefillResult | None) -> AsyncIterator[TokenDelta]:
        return self._deltas(worker, request, lambda h: h.submit.remote(request, prefilled))

    def resume(self, worker: WorkerId, request: GenerationRequest,
               generated: Sequence[int]) -> AsyncIterator[TokenDelta]:
        return self._deltas(worker, request, lambda h: h.resume.remote(request, list(generated)))

    async def _deltas(self, worker: WorkerId, request: GenerationRequest,
                      send: Callable[[object], Awaitable[None]]) -> AsyncIterator[TokenDelta]:
        """Send the request with `send(handle)`, then yield its deltas until the finished one."""
        rank = self._rank(worker)
        q: asyncio.Queue[TokenDelta] = asyncio.Queue()
        rank.waiting[request.request_id] = q  # before submit: no delta can be missed
        try:
            try:
                await send(rank.handle)
            except ray.exceptions.RayActorError as exc:
                raise WorkerLost(worker, f"decode worker {worker} failed taking request "
                                         f"{request.request_id}: {type(exc).__name__}") from None
            while True:
                delta = await q.get()
                yield delta
                if delta.finish is not None:
                    return
        finally:
            rank.waiting.pop(request.request_id, None)

    async def cancel(self, worker: WorkerId, request_id: str) -> None:
        rank = self._ranks.get(worker)
        if rank is not None:
            try:
                await rank.handle.cancel.remote(request_id)
            except Exception as exc:  # noqa: BLE001 - a dead worker has nothing left to cancel
                log.warning("cancel %s on %s failed: %s", request_id, worker, exc)

    # --- pumps ---------------------------------------------------------------------------------
    def _rank(self, wid: WorkerId) -> _Rank:
        rank = self._ranks.get(wid)
        if rank is None:
            raise WorkerGone(f"worker {wid} is not registered with the router")
        return rank

    async def _pump_tokens(self, rank: _Rank) -> None:
        try:
            async for ref in rank.handle.stream.remote():
                batch: StepBatch = await ref
                for delta in batch.deltas:
                    q = rank.waiting.get(delta.request_id)
                    if q is not None:
                        q.put_nowait(delta)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the stream means the rank is gone
            log.error("token stream of %s failed: %s", rank.wid, exc)
            self.remove(rank.wid, f"token stream failed: {exc}")

    async def _pump_reports(self, rank: _Rank, after_seq: int) -> None:
        try:
            async for ref in rank.handle.reports.remote(self.report_interval_s, after_seq):
                stats, events = await ref
                rank.state = _worker_state(rank.wid, rank.role, stats, self.limits, self._clock())
                rank.stats = stats
                if self.metrics is not None:
                    self.metrics.worker_queue.labels(str(rank.wid)).set(stats.queued_requests)
                    self.metrics.worker_queued_tokens.labels(str(rank.wid)).set(stats.queued_prefill_tokens)
                if rank.draining:
                    continue
                for ev in events.events:
                    if self.index.apply(rank.wid, _kv_event(ev)) is ApplyResult.GAP:
                        log.warning("KV events of %s have a gap at seq %d: resyncing from its snapshot",
                                    rank.wid, ev.seq)
                newest = events.last_seq if events.HasField("last_seq") else None
                if newest is not None and self.index.check_newest(rank.wid, newest) is ApplyResult.GAP:
                    log.warning("KV events of %s up to seq %d were lost: resyncing from its snapshot",
                                rank.wid, newest)
                if rank.wid in self.index.needs_resync():
                    snap = await rank.handle.kv_snapshot.remote()
                    self._resync(rank.wid, snap)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.error("reports of %s failed: %s", rank.wid, exc)
            self.remove(rank.wid, f"reports failed: {exc}")
