"""Simulated worker instances: prefill engines with chunked batching, decode engines whose batch
advances analytically (no per-token events), both with finite KV.

Mutable simulation state (slotted classes, owned by one `Simulator`). Times are seconds.

Decode advancement: between membership changes a decode batch of B requests runs identical steps;
`steps` counts steps executed so far (fractional between events). A request joining at step s0
with context L + 1 finishes at step s0 + (output_tokens - 1). The total context of the batch at
step s is `ctx_base + B * s`, so the time of the k steps up to the next finish is k times the step
time at the midpoint context: exact whenever step time is affine in context over those steps.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from orchestrator.planner.cache import PrefixCache
from orchestrator.planner.cost import CostModel
from orchestrator.planner.trace import TraceRequest
from orchestrator.router.inputs import WorkerId


class Job:
    """One request's progress through the simulated fleet."""

    __slots__ = ("answer", "cached_blocks", "cached_tokens", "decode", "decode_reserve", "decoded_from",
                 "hashes", "local", "missed", "pos", "prefill", "prefill_reserve", "req", "reused_blocks",
                 "seq", "t_finish", "t_first", "t_join")

    def __init__(self, req: TraceRequest, seq: int) -> None:
        self.req = req
        self.seq = seq  # arrival order: the deterministic tie-break between equal finish steps
        self.hashes = req.block_hashes
        self.answer: tuple[int, ...] = ()  # hashes of the blocks its answer fills (`answer_blocks`)
        self.prefill: PrefillEngine | None = None
        self.decode: DecodeInstance | None = None
        self.local = False
        self.missed = False  # known to miss an SLO (set only when the simulator counts misses)
        self.pos = 0  # prompt tokens computed (or found cached) so far
        self.cached_tokens = 0
        self.cached_blocks = 0  # leading blocks found on the prefilling worker
        self.reused_blocks = 0  # leading blocks the decode already held
        self.prefill_reserve = 0
        self.decode_reserve = 0
        self.decoded_from = 0.0  # decode step count when it joined the batch
        self.t_first = -1.0
        self.t_join = -1.0
        self.t_finish = -1.0


class PrefillEngine:
    """FCFS chunked prefill on one instance: each iteration takes up to `max_batched_tokens`
    tokens of at most `max_batch` requests from the queue head; a request is admitted (KV
    reserved, cached prefix found) when its first chunk is scheduled."""

    __slots__ = ("busy", "busy_time", "cache", "cost", "max_batch", "max_tokens", "queue", "queued_tokens",
                 "reserve_of", "running", "slot")

    def __init__(self, slot: int, cost: CostModel, cache: PrefixCache, max_batch: int, max_tokens: int,
                 reserve_of: Callable[[Job], int]) -> None:
        self.slot = slot  # the router worker whose state this engine's numbers feed
        self.cost = cost
        self.cache = cache
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.reserve_of = reserve_of
        self.queue: deque[Job] = deque()
        self.running: list[tuple[Job, int]] = []  # (job, chunk end) of the iteration in flight
        self.busy = False
        self.busy_time = 0.0
        self.queued_tokens = 0

    def add(self, job: Job, uncached_estimate: int) -> None:
        self.queue.append(job)
        self.queued_tokens += uncached_estimate

    def _admit(self, job: Job) -> bool:
        need = self.reserve_of(job)
        if not self.cache.reserve(need):
            return False
        job.prefill_reserve = need
        hashes = job.hashes
        n = self.cache.acquire_leading(hashes)
        job.cached_blocks = n
        job.cached_tokens = min(n * 256, job.req.prompt_tokens - 1)
        job.pos = job.cached_tokens
        return True

    def start(self) -> float | None:
        """Start the next iteration; its duration, or None when nothing can run."""
        budget = self.max_tokens
        segments: list[tuple[int, int]] = []
        running: list[tuple[Job, int]] = []
        sampled = 0
        for job in self.queue:
            if budget <= 0 or len(running) >= self.max_batch:
                break
            if job.prefill_reserve == 0 and not self._admit(job):
                break  # FCFS: a head that does not fit blocks the queue
            end = min(job.pos + budget, job.req.prompt_tokens)
            segments.append((job.pos, end))
            running.append((job, end))
            budget -= end - job.pos
            sampled += end == job.req.prompt_tokens
        if not running:
            return None
        self.running = running
        self.busy = True
        dt = self.cost.prefill_chunk_seconds(tuple(segments), sampled)
        self.busy_time += dt
        return dt

    def finish_iteration(self) -> list[Job]:
        """Apply the iteration in flight; the jobs whose prompt is now complete (queue order)."""
        done = []
        for job, end in self.running:
            self.queued_tokens -= end - job.pos
            job.pos = end
            if end == job.req.prompt_tokens:
                done.append(job)
        for _ in done:
            self.queue.popleft()  # completed jobs are always the queue's head, in order
        self.running = []
        self.busy = False
        return done


class DecodeInstance:
    """A decode instance: remote arrivals wait for KV and a batch slot, then pull their KV; local
    prefills (conditional disaggregation) pause decoding while they run (prefill first)."""

    __slots__ = ("active_time", "area", "batch", "cache", "cost", "ctx_base", "domain", "heap", "incoming",
                 "local", "max_batch", "paused", "promised", "step_time", "steps", "slot", "t_last",
                 "version", "waiting", "worker")

    def __init__(self, worker: WorkerId, domain: str, cost: CostModel, cache: PrefixCache, max_batch: int,
                 local: PrefillEngine) -> None:
        self.worker = worker
        self.slot = local.slot
        self.domain = domain
        self.cost = cost
        self.cache = cache
        self.max_batch = max_batch
        self.local = local  # the engine for local prefills, sharing this instance's cache
        self.waiting: deque[Job] = deque()  # remote prefills done, waiting for KV / a slot
        self.incoming = 0  # admitted, KV in flight
        self.promised = [0, 0]  # routed here, not admitted yet: [requests, KV blocks they reserve]
        self.heap: list[tuple[float, int, Job]] = []  # (finish step, tie, job)
        self.batch = 0
        self.ctx_base = 0.0
        self.steps = 0.0
        self.step_time = 0.0
        self.t_last = 0.0
        self.paused = False
        self.version = 0
        self.active_time = 0.0
        self.area = 0.0  # integral of the batch size over time (Little's law checks)

    @property
    def running(self) -> int:
        return self.batch + self.incoming + len(self.local.queue)

    def advance(self, now: float) -> None:
        """Count the steps run since the last event."""
        if self.batch and not self.paused and self.step_time > 0:
            dt = now - self.t_last
            self.steps += dt / self.step_time
            self.active_time += dt
        if self.batch:
            self.area += self.batch * (now - self.t_last)
        self.t_last = now

    def join(self, job: Job, now: float) -> None:
        self.advance(now)
        job.decoded_from = self.steps
        job.t_join = now
        heapq.heappush(self.heap, (self.steps + job.req.output_tokens - 1, job.seq, job))
        self.batch += 1
        self.ctx_base += job.req.prompt_tokens + 1 - self.steps

    def pop_finished(self, now: float) -> list[Job]:
        """Jobs whose last token is out by `now` (the caller advanced to a scheduled finish)."""
        self.advance(now)
        heap, out = self.heap, []
        while heap and heap[0][0] <= self.steps + 1e-6:  # float slack of steps = elapsed / step_time
            step, _, job = heapq.heappop(heap)
            self.steps = max(self.steps, step)
            self.batch -= 1
            self.ctx_base -= job.req.prompt_tokens + 1 - job.decoded_from
            out.append(job)
        if not self.batch:
            self.ctx_base = 0.0
        return out

    def next_finish(self, now: float) -> float | None:
        """Time of the next completion under the current batch (None when idle or paused)."""
        self.advance(now)
        self.version += 1
        if not self.batch or self.paused:
            self.step_time = 0.0
            return None
        k = max(self.heap[0][0] - self.steps, 0.0)
        mid = self.ctx_base + self.batch * (self.steps + max(k - 1.0, 0.0) / 2.0)
        self.step_time = self.cost.decode_step_seconds(self.batch, max(mid, float(self.batch)))
        self.t_last = now
        return now + k * self.step_time
