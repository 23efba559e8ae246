"""`NativeSimulator`: `Simulator`'s replay run by the compiled core (orchestrator/planner/native/).

Same constructor, `run()` and `meets()`, same results bit for bit (tests/planner/test_native_equal.py
replays both on both fleets, all four policies and several loads). This module only marshals: the
requests into flat arrays (zero-copy views for ctypes), the fleet into the C structures (the
policy's knobs read off the very `Router` the Python simulator would run, the prices off its
`CostModel`s), and the per-request times back into a `SimResult`.
"""

from __future__ import annotations

import ctypes
import math
from array import array
from collections.abc import Sequence
from itertools import accumulate, chain

from orchestrator.planner.fleet import FleetConfig
from orchestrator.planner.fleet_setup import answer_blocks, check_fits, placement, pool_capacity, pool_rate
from orchestrator.planner.kv_layout import block_bytes, handoff_base, handoff_memo, request_reserve_bytes
from orchestrator.planner.models import model
from orchestrator.planner.native.cost_params import cost_struct
from orchestrator.planner.native.lib import load
from orchestrator.planner.native.policy_params import MAX_WORKERS, policy_struct
from orchestrator.planner.native.sim_params import TsSimInput, TsSimOutput, bind
from orchestrator.planner.results import SimResult, summarize
from orchestrator.planner.trace import TraceRequest
from orchestrator.router.inputs import WorkerId, WorkerState
from orchestrator.router.router import Router
from tandem.blocks import BLOCK_SIZE


def _view(arr: array, ctype: type) -> ctypes.Array:
    """A ctypes array sharing `arr`'s buffer (no copy)."""
    return (ctype * max(len(arr), 1)).from_buffer(arr if len(arr) else array(arr.typecode, [0]))


class NativeSimulator:
    """One replay of `requests` on `fleet` by the C core. Call `run()` or `meets()` once."""

    def __init__(self, fleet: FleetConfig, requests: Sequence[TraceRequest]) -> None:
        self.fleet = fleet
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        if BLOCK_SIZE != 256:
            raise RuntimeError(f"the native simulator assumes 256-token blocks; tandem.blocks has "
                               f"{BLOCK_SIZE}")
        self.arch = model(fleet.model)
        self.block_bytes = block_bytes(self.arch)
        n_pre, n_dec = fleet.prefill.instances, fleet.decode.instances
        if n_pre + n_dec > MAX_WORKERS:
            raise ValueError(f"fleet of {n_pre} prefill + {n_dec} decode instances: the native simulator "
                             f"takes at most {MAX_WORKERS} workers")
        self._caps = [pool_capacity(fleet, fleet.prefill, self.block_bytes)] * n_pre
        self._caps += [pool_capacity(fleet, fleet.decode, self.block_bytes)] * n_dec
        check_fits(self.requests, self.arch, self.block_bytes, decode_capacity=self._caps[-1],
                   prefill_capacity=self._caps[0] if n_pre else None)
        self._used = False
        self._in_system = 0

    # ---- the replay --------------------------------------------------------------------------------
    def run(self) -> SimResult:
        """Replay every request to completion (or refusal); the collected metrics. Once."""
        self._replay(math.inf, math.inf, len(self.requests))
        return self.result()

    def result(self) -> SimResult:
        """The metrics of a replay that ran to the end (`run`, or `meets` that returned True)."""
        if not self._used:
            raise RuntimeError("NativeSimulator.result() before run() or meets()")
        if self._in_system:
            raise RuntimeError(f"simulation ended with {self._in_system} requests still in the system")
        n_pre = self.fleet.prefill.instances
        active, busy = self.active_time[n_pre:], self.busy_time[n_pre:]
        return summarize(
            self.fleet, self.requests, t_first=self.t_first, t_finish=self.t_finish,
            cached_tokens=self.cached_tokens, routed=self.routed, prefill_busy_s=self.busy_time[:n_pre],
            decode_busy_s=[a + b for a, b in zip(active, busy, strict=True)],
            area=self.area, rejected=self.rejected)

    def meets(self, ttft_slo_s: float, tpot_slo_s: float, attainment: float) -> bool:
        """As `Simulator.meets`: whether at least `attainment` of the requests meet both SLOs,
        stopping as soon as too many have missed. Once, instead of `run`."""
        n = len(self.requests)
        return self._replay(ttft_slo_s, tpot_slo_s, n - math.ceil(attainment * n - 1e-9))

    def _replay(self, slo_ttft: float, slo_tpot: float, budget: int) -> bool:
        """Run the C core; keep its per-request and per-slot arrays on self; whether the misses
        stayed within `budget`."""
        if self._used:
            raise RuntimeError("a NativeSimulator replays once; build a new one per run")
        self._used = True
        fleet, reqs = self.fleet, self.requests
        n, n_pre, n_dec = len(reqs), fleet.prefill.instances, fleet.decode.instances
        slots = n_pre + n_dec
        # requests
        arrival = array("d", [r.arrival_s for r in reqs])
        prompt = array("q", [r.prompt_tokens for r in reqs])
        output = array("q", [r.output_tokens for r in reqs])
        lengths = [len(r.block_hashes) for r in reqs]
        for r, k in zip(reqs, lengths, strict=True):
            if k != r.prompt_tokens // BLOCK_SIZE:
                raise ValueError(f"request {r.request_id!r}: {k} block hashes for {r.prompt_tokens} prompt "
                                 f"tokens (need {r.prompt_tokens // BLOCK_SIZE}, one per full block)")
        offsets = array("q", accumulate(lengths, initial=0))
        answers = answer_blocks(reqs)
        answer_offsets = array("q", accumulate(map(len, answers), initial=0))
        try:
            hashes = array("Q", chain.from_iterable(r.block_hashes for r in reqs))
            answer_hashes = array("Q", chain.from_iterable(answers))
        except OverflowError as exc:
            raise ValueError(f"a block hash is not an unsigned 64-bit int: {exc}") from exc
        sessions: dict[str, int] = {}
        session = array("i", [-1 if r.session_id is None else sessions.setdefault(r.session_id, len(sessions))
                              for r in reqs])
        arch, memo = self.arch, handoff_memo(self.arch)
        handoff = array("q", [handoff_base(arch, memo, p) for p in prompt])
        # instances: slots are prefill0.., decode0..; ranks are their places in WorkerId order
        ids = [WorkerId(f"prefill{i}") for i in range(n_pre)] + [WorkerId(f"decode{i}") for i in range(n_dec)]
        order = {w: k for k, w in enumerate(sorted(ids))}
        pdom, ddom = placement(fleet)
        names: dict[str, int] = {}
        domain = array("i", [names.setdefault(d, len(names)) for d in [*pdom, *ddom]])
        params = fleet.fleet_params()
        router = Router.named(fleet.policy, params)
        dcost = cost_struct(fleet.cost_model(fleet.decode))
        pcost = cost_struct(fleet.cost_model(fleet.prefill)) if n_pre else dcost  # no prefill: never priced
        policy = policy_struct(fleet.policy, params, router)
        fixed = request_reserve_bytes(arch, 0)
        inp = TsSimInput(
            n_requests=n, arrival=_view(arrival, ctypes.c_double), prompt=_view(prompt, ctypes.c_int64),
            output=_view(output, ctypes.c_int64), block_off=_view(offsets, ctypes.c_int64),
            block_hashes=_view(hashes, ctypes.c_uint64), answer_off=_view(answer_offsets, ctypes.c_int64),
            answer_hashes=_view(answer_hashes, ctypes.c_uint64), session=_view(session, ctypes.c_int32),
            n_sessions=len(sessions), max_sessions=router.book.max_sessions,
            handoff_base=_view(handoff, ctypes.c_int64),
            block_bytes=self.block_bytes, reserve_fixed_blocks=-(-fixed // self.block_bytes),
            n_prefill=n_pre, n_decode=n_dec, domain=_view(domain, ctypes.c_int32),
            capacity=_view(array("q", self._caps), ctypes.c_int64),
            rank=_view(array("i", [order[w] for w in ids]), ctypes.c_int32),
            p_max_batch=fleet.prefill.max_batch, p_max_tokens=fleet.prefill.max_batched_tokens,
            d_max_batch=fleet.decode.max_batch, d_max_tokens=fleet.decode.max_batched_tokens,
            prefill_rate=pool_rate(fleet, fleet.prefill) if n_pre else 1.0,
            decode_rate=pool_rate(fleet, fleet.decode), queue_limit=fleet.queue_limit,
            max_queued=WorkerState.__dataclass_fields__["max_queued_prefill_tokens"].default,
            prefill_cost=ctypes.pointer(pcost), decode_cost=ctypes.pointer(dcost),
            policy=ctypes.pointer(policy),
            slo_ttft=slo_ttft, slo_tpot=slo_tpot, miss_budget=budget)
        t_first, t_finish = array("d", bytes(8 * n)), array("d", bytes(8 * n))
        cached, routed = array("q", bytes(8 * n)), array("b", bytes(n))
        local, pslot, dslot = array("b", bytes(n)), array("i", bytes(4 * n)), array("i", bytes(4 * n))
        busy, active = array("d", bytes(8 * slots)), array("d", bytes(8 * slots))
        out = TsSimOutput(
            t_first=_view(t_first, ctypes.c_double), t_finish=_view(t_finish, ctypes.c_double),
            cached_tokens=_view(cached, ctypes.c_int64), routed=_view(routed, ctypes.c_int8),
            local=_view(local, ctypes.c_int8), prefill_slot=_view(pslot, ctypes.c_int32),
            decode_slot=_view(dslot, ctypes.c_int32), busy_time=_view(busy, ctypes.c_double),
            active_time=_view(active, ctypes.c_double))
        rc = bind(load())(ctypes.byref(inp), ctypes.byref(out))
        if rc != 0:
            raise RuntimeError(f"the native simulator failed (code {rc}: "
                               f"{'out of memory' if rc == -1 else 'too many workers'})")
        # per request (arrival order) and per slot (prefill0.., decode0..): tests compare them
        # with the Python simulator's jobs and instances
        self.t_first, self.t_finish, self.cached_tokens, self.routed = t_first, t_finish, cached, routed
        self.local, self.prefill_slot, self.decode_slot = local, pslot, dslot
        self.busy_time, self.active_time = busy, active
        self.rejected, self.misses, self.area = out.rejected, out.misses, out.area
        self._in_system = out.in_system
        return bool(out.within_budget)
