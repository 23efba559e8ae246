"""The discrete-event fleet simulator: requests flow through the router's own `Router` (policy +
load book) and `KvIndex`, simulated prefill and decode instances, and KV transfers over the
topology's links.

Events are per request and per prefill iteration, never per token (decode batches advance
analytically, see `instances`). Every routing decision sees the fleet's exact state: worker
reports are rebuilt at each decision and stamped just after the decision time, so the router's
load book adds nothing twice, and the index is fed by the instances' caches with the same stored /
removed calls a real worker's KV events make (blocks a decode pulled are held-only: `cache`). Placement:
instances fill NVLink domains in order, prefill and decode interleaved in proportion, never split.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Sequence

from orchestrator.planner.cache import PrefixCache
from orchestrator.planner.fleet import FleetConfig
from orchestrator.planner.fleet_setup import answer_blocks, check_fits, placement, pool_capacity, pool_rate
from orchestrator.planner.instances import DecodeInstance, Job, PrefillEngine
from orchestrator.planner.kv_layout import block_bytes, handoff_base, handoff_memo, request_reserve_bytes
from orchestrator.planner.models import model
from orchestrator.planner.results import SimResult, collect
from orchestrator.planner.trace import TraceRequest
from orchestrator.router.decision import Refusal
from orchestrator.router.inputs import Role, RouteRequest, WorkerId, WorkerState
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.router import Router


class Ev(enum.IntEnum):
    ARRIVE = 0
    PREFILL_DONE = 1
    LOCAL_DONE = 2
    TRANSFER_DONE = 3
    DECODE_FINISH = 4


class _Prefill:
    __slots__ = ("domain", "engine", "worker")

    def __init__(self, worker: WorkerId, domain: str, engine: PrefillEngine) -> None:
        self.worker, self.domain, self.engine = worker, domain, engine


class Simulator:
    """One run of `requests` (sorted by arrival) on `fleet`. Call `run()` once."""

    def __init__(self, fleet: FleetConfig, requests: Sequence[TraceRequest]) -> None:
        self.fleet = fleet
        self.arch = model(fleet.model)
        self.block_bytes = block_bytes(self.arch)
        self._reserve_memo: dict[int, int] = {}  # tokens -> blocks reserved
        self._handoff_memo = handoff_memo(self.arch)  # prompt -> bytes pulled when nothing is reused
        self.params = fleet.fleet_params()
        self.router = Router.named(fleet.policy, self.params)
        self.index = KvIndex()
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self._answers = answer_blocks(self.requests)
        self.events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self.now = 0.0
        self.in_system = 0
        self.area = 0.0  # integral of requests in the system over time
        self._t_area = 0.0
        pdom, ddom = placement(fleet)
        pcost, dcost = fleet.cost_model(fleet.prefill), fleet.cost_model(fleet.decode)
        self.prefill_rate = pool_rate(fleet, fleet.prefill)
        self.decode_rate = pool_rate(fleet, fleet.decode)
        self.prefills = []
        for i, dom in enumerate(pdom):
            w = WorkerId(f"prefill{i}")
            cache = PrefixCache(w, pool_capacity(fleet, fleet.prefill, self.block_bytes), self.index)
            eng = PrefillEngine(i, pcost, cache, fleet.prefill.max_batch, fleet.prefill.max_batched_tokens,
                                self._prefill_reserve)
            self.prefills.append(_Prefill(w, dom, eng))
        self.decodes = []
        for i, dom in enumerate(ddom):
            w = WorkerId(f"decode{i}")
            cache = PrefixCache(w, pool_capacity(fleet, fleet.decode, self.block_bytes), self.index)
            local = PrefillEngine(len(pdom) + i, dcost, cache, fleet.decode.max_batch,
                                  fleet.decode.max_batched_tokens, self._decode_reserve)
            self.decodes.append(DecodeInstance(w, dom, dcost, cache, fleet.decode.max_batch, local))
        self._prefill_by_id = {p.worker: p for p in self.prefills}
        self._domain_of_engine = {id(p.engine): p.domain for p in self.prefills}
        self._decode_by_id = {d.worker: d for d in self.decodes}
        self._slot = {w.worker: i for i, w in enumerate([*self.prefills, *self.decodes])}
        self.jobs: list[Job] = []
        self.rejected = 0
        self.misses = 0  # requests known to miss an SLO (only counted by `meets`)
        self._slo_ttft = self._slo_tpot = math.inf
        # per worker slot: (the numbers it was built from, the state)
        self._state_cache: list[tuple[tuple[int, ...], WorkerState] | None] = [None] * len(self._slot)
        self._state_list: list[WorkerState] = [None] * len(self._slot)  # type: ignore[list-item]  # built below
        self._dirty = set(range(len(self._slot)))  # workers whose state must be looked at again
        self._handlers = (self._arrive, self._prefill_done, self._local_done, self._transfer_done,
                          self._decode_finish)

    # ---- set-up helpers --------------------------------------------------------------------------
    def _blocks(self, nbytes: int) -> int:
        return -(-nbytes // self.block_bytes)

    def _reserve_blocks(self, tokens: int) -> int:
        """Blocks reserved for a request that may grow to `tokens` (memoised: lengths recur)."""
        if (hit := self._reserve_memo.get(tokens)) is None:
            hit = self._reserve_memo[tokens] = self._blocks(request_reserve_bytes(self.arch, tokens))
        return hit

    def _prefill_reserve(self, job: Job) -> int:
        return self._reserve_blocks(job.req.prompt_tokens)

    def _decode_reserve(self, job: Job) -> int:
        return self._reserve_blocks(job.req.prompt_tokens + job.req.output_tokens)

    def _handoff_bytes(self, prompt_tokens: int, reused_blocks: int) -> int:
        """`handoff_bytes(arch, prompt, reused)`: the blocks a decode holds are not pulled."""
        return handoff_base(self.arch, self._handoff_memo, prompt_tokens) - reused_blocks * self.block_bytes

    def _push(self, t: float, kind: Ev, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, payload))

    def _check_fits(self) -> None:
        check_fits(self.requests, self.arch, self.block_bytes,
                   decode_capacity=min(d.cache.capacity for d in self.decodes),
                   prefill_capacity=min((p.engine.cache.capacity for p in self.prefills), default=None))

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> SimResult:
        """Replay every request to completion (or refusal); the collected metrics. Once."""
        self._replay(None)
        return collect(self)

    def result(self) -> SimResult:
        """The metrics of a replay that ran to the end (`run`, or `meets` that returned True)."""
        return collect(self)

    def meets(self, ttft_slo_s: float, tpot_slo_s: float, attainment: float) -> bool:
        """Whether at least `attainment` of the requests meet both SLOs (refused ones miss), as
        `run().attainment(...) >= attainment` would say; stops as soon as too many have missed.
        Once, instead of `run`."""
        self._slo_ttft, self._slo_tpot = ttft_slo_s, tpot_slo_s
        n = len(self.requests)
        return self._replay(n - math.ceil(attainment * n - 1e-9))

    def _replay(self, miss_budget: int | None) -> bool:
        if self.jobs:
            raise RuntimeError("a Simulator replays once; build a new one per run")
        self._check_fits()
        for req in self.requests:
            self._push(req.arrival_s, Ev.ARRIVE, req)
        events, handlers = self.events, self._handlers
        budget = len(self.requests) if miss_budget is None else miss_budget
        while events:
            t, _, kind, payload = heapq.heappop(events)
            self.now = t
            handlers[kind](payload)
            if self.misses > budget:
                return False
        return True

    def _count(self, delta: int) -> None:
        self.area += self.in_system * (self.now - self._t_area)
        self._t_area = self.now
        self.in_system += delta

    def _states(self) -> list[WorkerState]:
        """Every worker's exact state now. Handlers mark the workers they change dirty; only those
        are looked at again, and a state whose numbers did not change is kept (its stamp is older,
        but no booking touched the worker since: a booking drops the chosen workers' states)."""
        stamp = math.nextafter(self.now, math.inf)
        limit, cache, states = self.fleet.queue_limit, self._state_cache, self._state_list
        n_pre = len(self.prefills)
        for slot in self._dirty:
            if slot < n_pre:
                p = self.prefills[slot]
                e = p.engine
                sig = (max(e.queued_tokens, 0), e.cache.reserved, len(e.running),
                       len(e.queue) - len(e.running))
                hit = cache[slot]
                if hit is None or hit[0] != sig:
                    hit = (sig, WorkerState(
                        worker=p.worker, role=Role.PREFILL, nvlink_domain=p.domain,
                        prefill_rate_tps=self.prefill_rate,
                        queued_prefill_tokens=sig[0], kv_blocks_used=sig[1], kv_blocks_total=e.cache.capacity,
                        running_requests=sig[2], max_running_requests=e.max_batch, queue_length=sig[3],
                        queue_limit=limit, reported_at_s=stamp))
            else:
                d = self.decodes[slot - n_pre]
                n, blocks = d.promised
                sig = (max(d.local.queued_tokens, 0), d.cache.reserved + blocks, d.batch + d.incoming + n,
                       len(d.waiting) + len(d.local.queue))
                hit = cache[slot]
                if hit is None or hit[0] != sig:
                    hit = (sig, WorkerState(
                        worker=d.worker, role=Role.DECODE, nvlink_domain=d.domain,
                        prefill_rate_tps=self.decode_rate,
                        queued_prefill_tokens=sig[0], kv_blocks_used=sig[1], kv_blocks_total=d.cache.capacity,
                        running_requests=sig[2], max_running_requests=d.max_batch, queue_length=sig[3],
                        queue_limit=limit, reported_at_s=stamp))
            cache[slot] = hit
            states[slot] = hit[1]
        self._dirty.clear()
        return states

    # ---- handlers --------------------------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        job = Job(req, len(self.jobs))
        job.answer = self._answers[job.seq]
        self.jobs.append(job)
        rreq = RouteRequest(request_id=req.request_id, prompt_tokens=req.prompt_tokens,
                            block_hashes=req.block_hashes, session_id=req.session_id)
        matches, held = self.index.match_views(req.block_hashes)  # resumable; either kind (handoffs)
        outcome = self.router.route(rreq, self._states(), matches, self.now, held=held)
        if isinstance(outcome, Refusal):
            self.rejected += 1
            self.misses += 1
            return
        self._count(+1)
        for chosen in (outcome.decode, outcome.prefill):
            if chosen is not None:
                slot = self._slot[chosen]
                self._state_cache[slot] = None
                self._dirty.add(slot)
        decode = self._decode_by_id[outcome.decode]
        job.decode = decode
        job.decode_reserve = self._decode_reserve(job)
        promised = decode.promised
        promised[0] += 1
        promised[1] += job.decode_reserve
        if outcome.prefill is None:
            job.local = True
            decode.local.add(job, outcome.uncached_tokens)
            self._kick_local(decode)
        else:
            pf = self._prefill_by_id[outcome.prefill]
            job.prefill = pf.engine
            pf.engine.add(job, outcome.uncached_tokens)
            self._kick_prefill(pf.engine)

    def _kick_prefill(self, engine: PrefillEngine) -> None:
        self._dirty.add(engine.slot)
        if not engine.busy:
            dt = engine.start()
            if dt is not None:
                self._push(self.now + dt, Ev.PREFILL_DONE, engine)

    def _prefill_done(self, engine: PrefillEngine) -> None:
        for job in engine.finish_iteration():
            self._prefilled(job, engine.cache)
            decode = job.decode
            promised = decode.promised
            if job.req.output_tokens == 1:  # ended with its first token: nothing to hand off
                self._dirty.add(decode.slot)
                promised[0] -= 1
                promised[1] -= job.decode_reserve
                self._release_prefill(job)
                self._end(job)
            else:
                decode.waiting.append(job)
                self._admit(decode)
        self._kick_prefill(engine)

    def _prefilled(self, job: Job, cache: PrefixCache) -> None:
        """The job's prompt is computed (its first token is out now): count a missed TTFT, release
        its prefill booking, and keep its computed blocks in the cache that computed them."""
        job.t_first = self.now
        if self.now - job.req.arrival_s > self._slo_ttft:
            job.missed = True
            self.misses += 1
        self.router.prefill_done(job.req.request_id)
        cache.complete(job.hashes, job.cached_blocks)

    def _admit(self, decode: DecodeInstance) -> None:
        """Admit waiting remote jobs while KV and batch slots allow; start their KV pulls."""
        self._dirty.add(decode.slot)
        promised = decode.promised
        while decode.waiting and decode.batch + decode.incoming + len(decode.local.queue) < decode.max_batch:
            job = decode.waiting[0]
            if not decode.cache.reserve(job.decode_reserve):
                break
            decode.waiting.popleft()
            promised[0] -= 1
            promised[1] -= job.decode_reserve
            job.reused_blocks = n = decode.cache.acquire_kept(job.hashes)  # held-only pages spare a pull too
            same = self._domain_of_engine[id(job.prefill)] == decode.domain
            link = self.params.topology.intra_domain if same else self.params.topology.cross_domain
            decode.incoming += 1
            self._push(self.now + link.seconds(self._handoff_bytes(job.req.prompt_tokens, n)),
                       Ev.TRANSFER_DONE, job)

    def _release_prefill(self, job: Job) -> None:
        engine = job.prefill
        engine.cache.unreserve(job.prefill_reserve)
        engine.cache.release(job.hashes)
        self._kick_prefill(engine)

    def _transfer_done(self, job: Job) -> None:
        self._release_prefill(job)
        decode = job.decode
        self._dirty.add(decode.slot)
        decode.incoming -= 1
        decode.cache.complete(job.hashes, job.reused_blocks, held_only=True)  # pulled: no boundary here
        decode.join(job, self.now)
        self._reschedule(decode)

    def _reschedule(self, decode: DecodeInstance) -> None:
        t = decode.next_finish(self.now)
        if t is not None:
            self._push(t, Ev.DECODE_FINISH, (decode, decode.version))

    def _decode_finish(self, payload: tuple[DecodeInstance, int]) -> None:
        decode, version = payload
        if version != decode.version:
            return
        self._dirty.add(decode.slot)
        for job in decode.pop_finished(self.now):
            hashes = job.hashes
            if job.answer:  # the answer's blocks were computed here: kept, resumable
                hashes = hashes + job.answer
                decode.cache.complete(hashes, len(job.hashes))
            decode.cache.unreserve(job.prefill_reserve if job.local else job.decode_reserve)
            decode.cache.release(hashes)
            self._end(job)
        self._admit(decode)
        self._kick_local(decode)
        if not decode.paused:
            self._reschedule(decode)

    def _end(self, job: Job) -> None:
        job.t_finish = self.now
        out = job.req.output_tokens
        if not job.missed and out > 1 and (self.now - job.t_first) / (out - 1) > self._slo_tpot:
            self.misses += 1
        self.router.finish(job.req.request_id)
        self._count(-1)

    def _kick_local(self, decode: DecodeInstance) -> None:
        self._dirty.add(decode.slot)
        local = decode.local
        if local.busy or not local.queue:
            return
        decode.advance(self.now)
        dt = local.start()
        if dt is None:
            return
        decode.paused = True
        decode.version += 1  # its pending finish is void: decoding stalls while the prefill runs
        self._push(self.now + dt, Ev.LOCAL_DONE, decode)

    def _local_done(self, decode: DecodeInstance) -> None:
        self._dirty.add(decode.slot)
        promised = decode.promised
        for job in decode.local.finish_iteration():
            self._prefilled(job, decode.cache)
            promised[0] -= 1
            promised[1] -= job.decode_reserve
            if job.req.output_tokens == 1:
                decode.cache.unreserve(job.prefill_reserve)
                decode.cache.release(job.hashes)
                self._end(job)
            else:
                decode.join(job, self.now)
        decode.advance(self.now)
        decode.paused = False
        self._admit(decode)
        self._kick_local(decode)
        if not decode.paused:
            self._reschedule(decode)
