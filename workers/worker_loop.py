"""The actor loop of one rank: receive, schedule, run, postprocess -- and publish one batch per step.

`EngineLoop` owns a rank's `Engine`. Actor methods (on the asyncio loop) change the engine only
through `call`, which runs under the same lock as a step, in a thread, so a step never sees a
half-applied change and the event loop never blocks on compute. The loop body:
    out = step()            # under the lock: the queued adds / cancels are already in the engine
    publish(out)            # ONE StepBatch to every subscriber; first-token waiters resolved
Without expert parallelism an idle engine sleeps until woken; under EP every rank votes each
iteration and, if any rank has work, all step together (idle ranks run empty batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from tandem.stream import Finish, RequestSummary, StepBatch, TokenDelta
from workers.engine.engine import Engine, StepOutput
from workers.ep.group import EpGroup
from workers.ep.runner import lockstep_step

T = TypeVar("T")


class EngineLoop:
    """The background loop of one rank (see the module docstring)."""

    def __init__(self, engine: Engine, group: EpGroup | None, worker: str, *, idle_poll_s: float = 0.002,
                 housekeeping: Callable[[], None] | None = None) -> None:
        self.engine, self.group, self.worker = engine, group, worker
        self._idle_poll_s = idle_poll_s
        self._housekeeping = housekeeping  # run under the lock once per iteration (e.g. lease expiry)
        self._lock = threading.Lock()
        self._subscribers: list[asyncio.Queue[StepBatch]] = []
        self._first: dict[str, asyncio.Future[TokenDelta]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._rates = _Rates()
        self.error: BaseException | None = None
        self.step_started: float | None = None  # monotonic start of the step running now (health checks)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) against the engine between steps; wakes the loop afterwards."""
        if self.error is not None:
            raise RuntimeError(f"{self.worker}: the engine loop failed") from self.error

        def locked() -> T:
            with self._lock:
                return fn(*args)

        result = await asyncio.to_thread(locked)
        self._wake.set()
        return result

    def first_token(self, request_id: str) -> asyncio.Future[TokenDelta]:
        """A future for the request's first delta with tokens (register BEFORE submitting)."""
        fut: asyncio.Future[TokenDelta] = asyncio.get_running_loop().create_future()
        self._first[request_id] = fut
        return fut

    def subscribe(self) -> Subscription:
        """Every StepBatch from this call on, in step order (registered at once)."""
        q: asyncio.Queue[StepBatch] = asyncio.Queue()
        self._subscribers.append(q)
        return Subscription(q, self._subscribers)

    def rates(self) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s) over the last few seconds."""
        return self._rates.per_second(self.engine)

    def _step(self) -> StepOutput | None:
        with self._lock:
            if self._housekeeping is not None:
                self._housekeeping()
            if self.group is None:
                return self.engine.step() if self.engine.has_work else None
            return lockstep_step(self.engine, self.group)

    async def _run(self) -> None:
        try:
            while not self._stopped:
                self.step_started = time.monotonic()
                out = await asyncio.to_thread(self._step)
                self.step_started = None
                if out is None:
                    await self._idle()
                    continue
                self._publish(out)
        except Exception as exc:  # the rank cannot go on: end every request it holds, loudly
            self.error = exc
            self._abort_all(exc)

    def _abort_all(self, exc: Exception) -> None:
        """Every request of the engine ends ABORTED (naming the error); later calls raise."""
        why = f"{self.worker}: engine loop failed: {exc!r}"
        for fut in self._first.values():
            if not fut.done():
                fut.set_exception(RuntimeError(why))
        self._first.clear()
        summary = RequestSummary(0, 0, error=why)
        deltas = tuple(TokenDelta(rid, (), "", Finish.ABORTED, summary) for rid in self.engine.request_ids())
        if deltas:
            batch = StepBatch(self.worker, -1, deltas)
            for q in self._subscribers:
                q.put_nowait(batch)

    async def _idle(self) -> None:
        if self.group is not None:  # keep voting: another rank may have work
            await asyncio.sleep(self._idle_poll_s)
            return
        self._wake.clear()
        if not self.engine.has_work:
            # Wake at least twice a second so housekeeping (handoff leases) runs while idle.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)

    def _publish(self, out: StepOutput) -> None:
        for d in out.deltas:
            fut = self._first.get(d.request_id)
            if fut is not None and (d.token_ids or d.finish is not None):
                del self._first[d.request_id]
                if not fut.done():
                    fut.set_result(d)
        if out.deltas:
            batch = StepBatch(self.worker, out.step, out.deltas)
            for q in self._subscribers:
                q.put_nowait(batch)


class Subscription:
    """A subscriber's queue of StepBatches; iterate it, and close it when done."""

    def __init__(self, queue: asyncio.Queue[StepBatch], registry: list[asyncio.Queue[StepBatch]]) -> None:
        self._queue, self._registry = queue, registry

    def __aiter__(self) -> AsyncIterator[StepBatch]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StepBatch]:
        try:
            while True:
                yield await self._queue.get()
        finally:
            self.close()

    async def get(self) -> StepBatch:
        return await self._queue.get()

    def close(self) -> None:
        if self._queue in self._registry:
            self._registry.remove(self._queue)


class _Rates:
    """Token rates from the engine's cumulative counters, sampled at most every 0.5 s."""

    def __init__(self) -> None:
        self._t = time.monotonic()
        self._prefill = self._decode = 0
        self._last = (0.0, 0.0)

    def per_second(self, engine: Engine) -> tuple[float, float]:
        now = time.monotonic()
        if now - self._t >= 0.5:
            st = engine.stats()
            dt = now - self._t
            self._last = ((st.prefill_tokens - self._prefill) / dt, (st.decode_tokens - self._decode) / dt)
            self._t, self._prefill, self._decode = now, st.prefill_tokens, st.decode_tokens
        return self._last
