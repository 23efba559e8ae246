"""ctypes mirrors of policy.h and the glue that fills them from the router's own objects.

`policy_struct` takes a policy's knobs from the very policy object the Python `Router` runs,
`worker_struct` the worker states (sorted by WorkerId, as `RoutingView.workers` are), and
`request_view` one request's matches, held blocks, affinity and decision counter; `route` calls
`ts_route` on them. Everything policy.h assumes (one dp rank per instance, at most TS_MAX_WORKERS
workers, counts a double holds exactly) is checked here, so a situation the C core does not model
raises instead of routing differently from Python.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from functools import cache
from types import MappingProxyType

from orchestrator.router.inputs import DisaggMode, FleetParams, Role, WorkerId, WorkerState
from orchestrator.router.policy import PolicyName, RoutingPolicy
from orchestrator.router.policy_dynamo import DynamoPolicy
from orchestrator.router.policy_kv import KvPolicy
from orchestrator.router.policy_round_robin import RoundRobinPolicy
from orchestrator.router.policy_sglang import SglangPolicy
from orchestrator.router.router import Router
from orchestrator.router.view import WorkerPair

MAX_WORKERS = 256  # policy.h TS_MAX_WORKERS
_EXACT = 2**53  # every int the C core converts to double stays below this (then the conversion is exact)
_INT32_MAX = 2**31 - 1
LOCAL_PREFILL = -1  # TsRequestView.aff_prefill / TsChoice.prefill: the decode prefilled locally
GONE = -2  # TsRequestView.aff_*: the affinity pair's worker is no longer in the fleet

_ROLE = MappingProxyType({Role.PREFILL: 0, Role.DECODE: 1})
_DISAGG = MappingProxyType({DisaggMode.CONDITIONAL: 0, DisaggMode.ALWAYS: 1, DisaggMode.NEVER: 2})
# the C kind of each policy name, and the class whose knobs fill it
_KIND: Mapping[PolicyName, tuple[int, type]] = MappingProxyType({
    PolicyName.KV: (0, KvPolicy),
    PolicyName.ROUND_ROBIN: (1, RoundRobinPolicy),
    PolicyName.SGLANG: (2, SglangPolicy),
    PolicyName.DYNAMO: (3, DynamoPolicy),
})


class TsWorker(ctypes.Structure):
    """policy.h TsWorker."""

    _fields_ = [
        ("role", ctypes.c_int32),
        ("domain", ctypes.c_int32),
        ("prefill_rate", ctypes.c_double),
        ("queued_tokens", ctypes.c_int64),
        ("kv_used", ctypes.c_int64),
        ("kv_total", ctypes.c_int64),
        ("running", ctypes.c_int64),
        ("max_running", ctypes.c_int64),
        ("queue_len", ctypes.c_int64),
        ("queue_limit", ctypes.c_int64),
        ("max_queued", ctypes.c_int64),
    ]


class TsPolicy(ctypes.Structure):
    """policy.h TsPolicy."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("disagg_mode", ctypes.c_int32),
        ("block_size", ctypes.c_int64),
        ("kv_bytes_per_block", ctypes.c_int64),
        ("intra_bw", ctypes.c_double),
        ("intra_lat", ctypes.c_double),
        ("cross_bw", ctypes.c_double),
        ("cross_lat", ctypes.c_double),
        ("max_local_prefill_tokens", ctypes.c_int64),
        ("max_local_uncached_fraction", ctypes.c_double),
        ("w_kv", ctypes.c_double),
        ("w_running", ctypes.c_double),
        ("w_dp", ctypes.c_double),
        ("reuse_credit", ctypes.c_double),
        ("decode_load_weight_s", ctypes.c_double),
        ("tie_tolerance_s", ctypes.c_double),
        ("cache_threshold", ctypes.c_double),
        ("balance_abs_threshold", ctypes.c_int64),
        ("balance_rel_threshold", ctypes.c_double),
        ("overlap_weight", ctypes.c_double),
        ("prefill_load_scale", ctypes.c_double),
    ]


class TsRequestView(ctypes.Structure):
    """policy.h TsRequestView. The matches / held arrays it points to are kept alive by the
    structure itself (ctypes keeps an assigned array referenced from the field)."""

    _fields_ = [
        ("prompt_tokens", ctypes.c_int64),
        ("matches", ctypes.POINTER(ctypes.c_int32)),
        ("held", ctypes.POINTER(ctypes.c_int32)),
        ("has_affinity", ctypes.c_int32),
        ("aff_prefill", ctypes.c_int32),
        ("aff_decode", ctypes.c_int32),
        ("decisions_made", ctypes.c_int64),
    ]


class TsChoice(ctypes.Structure):
    """policy.h TsChoice."""

    _fields_ = [
        ("refused", ctypes.c_int32),
        ("prefill", ctypes.c_int32),
        ("decode", ctypes.c_int32),
        ("uncached_tokens", ctypes.c_int64),
    ]


def _exact(value: int, where: str) -> int:
    if not 0 <= value < _EXACT:
        raise ValueError(f"{where} = {value}: the native policies need 0 <= value < 2**53")
    return value


def policy_struct(name: PolicyName, fleet: FleetParams, router: Router | RoutingPolicy) -> TsPolicy:
    """The TsPolicy for policy `name` with the knobs of router's policy (or of the policy object
    itself), which must be that policy's class and run on `fleet`."""
    if not isinstance(name, PolicyName):
        raise TypeError(f"policy_struct name = {name!r}: must be a PolicyName")
    policy = router.policy if isinstance(router, Router) else router
    kind, cls = _KIND[name]
    if type(policy) is not cls:
        raise TypeError(f"policy_struct router = {type(policy).__name__}: policy {name.value!r} is "
                        f"{cls.__name__}")
    if policy.fleet != fleet:
        raise ValueError(f"policy_struct fleet = {fleet}: the {name.value!r} policy runs on {policy.fleet}")
    top = fleet.topology
    out = TsPolicy(
        kind=kind,
        disagg_mode=_DISAGG[fleet.disagg.mode],
        block_size=_exact(fleet.block_size, "FleetParams.block_size"),
        kv_bytes_per_block=_exact(fleet.kv_bytes_per_block, "FleetParams.kv_bytes_per_block"),
        intra_bw=top.intra_domain.bandwidth_bytes_per_s,
        intra_lat=top.intra_domain.latency_s,
        cross_bw=top.cross_domain.bandwidth_bytes_per_s,
        cross_lat=top.cross_domain.latency_s,
        max_local_prefill_tokens=_exact(fleet.disagg.max_local_prefill_tokens,
                                        "DisaggThresholds.max_local_prefill_tokens"),
        max_local_uncached_fraction=fleet.disagg.max_local_uncached_fraction,
    )
    if isinstance(policy, KvPolicy):
        p = policy.params
        out.w_kv, out.w_running, out.w_dp = p.w_kv, p.w_running, p.w_dp
        out.reuse_credit, out.decode_load_weight_s, out.tie_tolerance_s = (
            p.reuse_credit, p.decode_load_weight_s, p.tie_tolerance_s)
    elif isinstance(policy, SglangPolicy):
        s = policy.params
        if not -_EXACT < s.balance_abs_threshold < _EXACT:
            raise ValueError(f"SglangParams.balance_abs_threshold = {s.balance_abs_threshold}: "
                             "must be below 2**53 in magnitude")
        out.cache_threshold, out.balance_rel_threshold = s.cache_threshold, s.balance_rel_threshold
        out.balance_abs_threshold = s.balance_abs_threshold
    elif isinstance(policy, DynamoPolicy):
        d = policy.params
        out.overlap_weight, out.prefill_load_scale = d.overlap_weight, d.prefill_load_scale
    return out


def worker_struct(states: Sequence[WorkerState]) -> ctypes.Array[TsWorker]:
    """The workers as a TsWorker array in the given order, which must be strictly increasing
    WorkerId order with every worker its own instance (dp_rank 0). NVLink domains become small
    ints, equal exactly when the names are."""
    if len(states) > MAX_WORKERS:
        raise ValueError(f"worker_struct states: {len(states)} workers; the native policies take at most "
                         f"{MAX_WORKERS}")
    domains: dict[str, int] = {}
    out = (TsWorker * len(states))()
    prev: WorkerId | None = None
    for i, w in enumerate(states):
        where = f"worker_struct states[{i}] ({w.worker})"
        if w.worker.dp_rank != 0:
            raise ValueError(f"{where}.worker.dp_rank = {w.worker.dp_rank}: the native policies take one "
                             "rank per instance (dp_rank 0)")
        if prev is not None and not prev < w.worker:
            raise ValueError(f"{where}.worker: not after {prev}; states must be sorted by WorkerId, "
                             "no repeats")
        prev = w.worker
        t = out[i]
        t.role = _ROLE[w.role]
        t.domain = domains.setdefault(w.nvlink_domain, len(domains))
        t.prefill_rate = w.prefill_rate_tps
        for field, name in (("queued_tokens", "queued_prefill_tokens"), ("kv_used", "kv_blocks_used"),
                            ("kv_total", "kv_blocks_total"), ("running", "running_requests"),
                            ("max_running", "max_running_requests"), ("queue_len", "queue_length"),
                            ("queue_limit", "queue_limit"), ("max_queued", "max_queued_prefill_tokens")):
            setattr(t, field, _exact(getattr(w, name), f"{where}.{name}"))
    return out


def _index(wid: WorkerId | None, index: Mapping[WorkerId, int], none: int) -> int:
    if wid is None:
        return none
    return index.get(wid, GONE)


def request_view(
    states: Sequence[WorkerState],
    prompt_tokens: int,
    block_size: int,
    matches: Mapping[WorkerId, int],
    held: Mapping[WorkerId, int] | None,
    affinity: WorkerPair | None,
    decisions_made: int,
) -> TsRequestView:
    """One request against `states` (worker_struct's order) as `Router.route` builds its view: per
    worker its matches and max(held, matches); the affinity pair as indexes (GONE for a worker
    not in states); decisions_made before this request. Checks what Router.route checks (matches
    in [0, full blocks], held in [matches, full blocks]) and raises ValueError naming the entry."""
    full = prompt_tokens // block_size
    if not 1 <= prompt_tokens < _EXACT or full > _INT32_MAX:
        raise ValueError(f"request_view prompt_tokens = {prompt_tokens}: must be >= 1 with at most 2**31 - 1 "
                         f"full blocks of {block_size}")
    n = len(states)
    m_arr, h_arr = (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)()
    held = held if held is not None else {}
    index = {}
    for i, w in enumerate(states):
        index[w.worker] = i
        m, h = matches.get(w.worker, 0), held.get(w.worker, 0)
        if not 0 <= m <= full:
            raise ValueError(f"request_view matches[{w.worker}] = {m}: must be in [0, {full}]")
        if w.worker in held and not m <= h <= full:
            raise ValueError(f"request_view held[{w.worker}] = {h}: must be in [matches = {m}, {full}]")
        m_arr[i], h_arr[i] = m, max(h, m)
    return TsRequestView(
        prompt_tokens=prompt_tokens,
        matches=m_arr,
        held=h_arr,
        has_affinity=affinity is not None,
        aff_prefill=GONE if affinity is None else _index(affinity.prefill, index, LOCAL_PREFILL),
        aff_decode=GONE if affinity is None else _index(affinity.decode, index, GONE),
        decisions_made=_exact(decisions_made, "request_view decisions_made"),
    )


@cache
def _ts_route(lib: ctypes.CDLL) -> ctypes._CFuncPtr:
    """lib's ts_route with its argument and result types set (once per library)."""
    fn = lib.ts_route
    fn.argtypes = [ctypes.POINTER(TsPolicy), ctypes.POINTER(TsWorker), ctypes.c_int32,
                   ctypes.POINTER(TsRequestView), ctypes.POINTER(TsChoice)]
    fn.restype = None
    return fn


def route(
    lib: ctypes.CDLL, policy: TsPolicy, workers: ctypes.Array[TsWorker], view: TsRequestView
) -> TsChoice:
    """ts_route on the given structures: the chosen (prefill, decode) indexes into workers
    (prefill LOCAL_PREFILL when the decode prefills) and uncached tokens, or refused = 1."""
    out = TsChoice()
    _ts_route(lib)(ctypes.byref(policy), workers, len(workers), ctypes.byref(view), ctypes.byref(out))
    return out
