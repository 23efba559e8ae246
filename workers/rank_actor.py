"""What every rank actor offers besides its role's own calls: start, cancel, stats, KV events,
the per-step stream and periodic reports. `PrefillWorker` and `DecodeWorker` extend it.

KV events are kept in a bounded log that every reader reads from its own position, so several
routers (replicas) can each follow the same events; a reader that falls behind the log's window
sees a sequence gap and resyncs from `kv_snapshot`.

Every rank follows its requests in `tandem.tracing` log lines (trace id, stage; never prompt text or
token ids): the role's calls log admission and their middle stages, and a watcher on the rank's
StepBatches logs each request's end (finished, cancelled, aborted)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import AsyncIterator

from tandem.stream import Finish, StepBatch
from tandem.tracing import RequestTracer, Stage
from tandem.v1 import worker_pb2
from workers.actor_common import BuiltRank, WorkerConfig, events_proto, stats_proto
from workers.faults import EventDropper
from workers.kv.events import KvEvent
from workers.kv.space import PagedKvSpace
from workers.worker_loop import EngineLoop

EVENT_LOG_LIMIT = 8192
# A step running longer than this means a wedged rank: steps take milliseconds on a GPU and a few
# seconds for a full chunk of the tiny model on a loaded CPU; a pull inside a step ends by its timeout.
STUCK_STEP_S = 300.0


class RankActor:
    """Shared actor surface of one rank; subclasses set `config` and `_built`, may override
    `_housekeeping`."""

    config: WorkerConfig
    _built: BuiltRank
    _loop: EngineLoop | None = None
    _draining: bool = False
    _event_log: deque[KvEvent] | None = None
    _dropper: EventDropper | None = None
    _newest_seq: int | None = None  # the newest KV event seq this rank produced (tests may drop some)
    _tracer: RequestTracer | None = None
    _watcher: asyncio.Task[None] | None = None

    @property
    def tracer(self) -> RequestTracer:
        """This rank's request tracer (made on first use: the role's name, the rank's name)."""
        if self._tracer is None:
            self._tracer = RequestTracer(self.config.role.value, self.config.name)
        return self._tracer

    def _housekeeping(self) -> None:
        """Runs under the engine lock once per loop iteration; nothing by default."""

    def _started(self) -> EngineLoop:
        if self._loop is None:
            self._loop = EngineLoop(self._built.engine, self._built.group, self.config.name,
                                    housekeeping=self._housekeeping)
            self._loop.start()
            self._watcher = asyncio.ensure_future(self._watch_ends(self._loop))
        return self._loop

    async def _watch_ends(self, loop: EngineLoop) -> None:
        """Log the end of every followed request as its last delta goes out (one StepBatch per step)."""
        tracer = self.tracer
        async for batch in loop.subscribe():
            for d in batch.deltas:
                if d.finish is None or d.summary is None:
                    continue
                s = d.summary
                if d.finish is Finish.ABORTED:
                    tracer.end(d.request_id, Stage.ABORTED, error=s.error)
                else:
                    tracer.end(d.request_id, Stage.FINISHED, reason=d.finish.value,
                               completion_tokens=s.completion_tokens, cached_tokens=s.cached_tokens,
                               kv_transfer_bytes=s.kv_transfer_bytes)

    async def ready(self) -> str:
        """Start the loop; returns "instance/rN"."""
        self._started()
        return self.config.name

    async def health(self) -> str:
        """Liveness for the controller's health check: the rank's name, at once, without waiting for
        the engine lock (a long step is a busy rank, not a dead one); RuntimeError naming the cause
        once the engine loop has failed or one step has run past STUCK_STEP_S (a wedged rank)."""
        loop = self._started()
        if loop.error is not None:
            raise RuntimeError(f"{self.config.name}: the engine loop failed: {loop.error!r}")
        began = loop.step_started
        if began is not None and time.monotonic() - began > STUCK_STEP_S:
            raise RuntimeError(f"{self.config.name}: one engine step has run for "
                               f"{time.monotonic() - began:.0f} s (limit STUCK_STEP_S = {STUCK_STEP_S:g} s)")
        return self.config.name

    async def drain(self) -> None:
        """Stop taking new requests; the ones already here run to the end. Stats say `draining`."""
        self._draining = True

    def _accepting(self, request_id: str) -> None:
        """Raise when this rank is draining (named, so the router picks another)."""
        if self._draining:
            raise RuntimeError(f"{self.config.name} is draining: request {request_id!r} refused")

    async def cancel(self, request_id: str) -> bool:
        """End a request now (queued, running or held); its blocks are free when this returns."""
        return await self._started().call(self._built.engine.cancel, request_id)

    async def stats(self) -> worker_pb2.WorkerStats:
        """Queue, running, KV blocks used / free, prefix hit rate, token rates."""
        loop = self._started()
        st = await loop.call(self._built.engine.stats)
        msg = stats_proto(self.config, st, *loop.rates(), draining=self._draining)
        self._add_transfer_totals(msg)
        return msg

    def _add_transfer_totals(self, msg: worker_pb2.WorkerStats) -> None:
        """Set the stats' cumulative KV-pull fields; a rank that pulls nothing leaves them 0."""

    async def kv_events(self, after_seq: int = -1) -> worker_pb2.KvEventBatch:
        """The KV events numbered after `after_seq` that the log still holds (its last
        EVENT_LOG_LIMIT); each reader passes the last seq it saw."""
        new = await self._started().call(self._built.engine.kv.flush_events)
        if new:
            self._newest_seq = new[-1].seq  # produced, whether or not the log keeps it
        if self.config.faults.drop_kv_events.enabled:  # tests only: these events are lost for good
            if self._dropper is None:
                self._dropper = EventDropper(self.config.faults.drop_kv_events)
            new = self._dropper.keep(new)
        if self._event_log is None:
            self._event_log = deque(maxlen=EVENT_LOG_LIMIT)
        self._event_log.extend(new)
        return events_proto(self.config, tuple(e for e in self._event_log if e.seq > after_seq),
                            self._newest_seq)

    async def kv_snapshot(self) -> worker_pb2.KvSnapshot:
        """Every block hash this rank can serve as a prefix hit (block_hashes) and every pulled one it
        holds but cannot resume after (held_only_hashes), as of its last KV event (for a router that
        missed events: it resyncs from this, then applies only later events)."""
        kv = self._built.engine.kv
        if not isinstance(kv, PagedKvSpace):
            raise TypeError(f"{self.config.name}: KV space {type(kv).__name__} has no prefix cache")
        snap = await self._started().call(kv.manager.snapshot)
        return worker_pb2.KvSnapshot(worker=worker_pb2.WorkerId(instance=self.config.instance,
                                                                dp_rank=self.config.rank),
                                     seq=snap.seq, block_hashes=list(snap.block_hashes),
                                     held_only_hashes=list(snap.held_only))

    async def stream(self) -> AsyncIterator[StepBatch]:
        """Every StepBatch of this rank from now on: one message per engine step."""
        async for batch in self._started().subscribe():
            yield batch

    async def reports(self, interval_s: float = 0.5, after_seq: int = -1
                      ) -> AsyncIterator[tuple[worker_pb2.WorkerStats, worker_pb2.KvEventBatch]]:
        """Stats and the KV events since this stream's last report (the first: those after
        `after_seq`, e.g. the seq of the snapshot a router started from), every `interval_s`; one
        stream per router, each with its own position in the event log."""
        last = after_seq
        while True:
            stats, events = await self.stats(), await self.kv_events(last)
            if events.events:
                last = events.events[-1].seq
            yield stats, events
            await asyncio.sleep(interval_s)

    async def pid(self) -> int:
        """This rank's process id (fault tests kill it with SIGKILL)."""
        return os.getpid()

    async def bytes_dispatched(self) -> int:
        """Expert-parallel bytes this rank sent to other ranks (0 without EP)."""
        d = self._built.dispatcher
        return 0 if d is None else d.bytes_sent
