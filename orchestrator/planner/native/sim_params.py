"""ctypes mirrors of sim.h: the native simulator's input and output structures, field for field."""

from __future__ import annotations

import ctypes

from orchestrator.planner.native.cost_params import TsCost
from orchestrator.planner.native.policy_params import TsPolicy

_I8, _I32, _I64, _U64, _F64 = ctypes.c_int8, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64, ctypes.c_double
_P = ctypes.POINTER


class TsSimInput(ctypes.Structure):
    """sim.h TsSimInput."""

    _fields_ = [
        ("n_requests", _I32),
        ("arrival", _P(_F64)),
        ("prompt", _P(_I64)),
        ("output", _P(_I64)),
        ("block_off", _P(_I64)),
        ("block_hashes", _P(_U64)),
        ("answer_off", _P(_I64)),
        ("answer_hashes", _P(_U64)),
        ("session", _P(_I32)),
        ("n_sessions", _I32),
        ("max_sessions", _I64),
        ("handoff_base", _P(_I64)),
        ("block_bytes", _I64),
        ("reserve_fixed_blocks", _I64),
        ("n_prefill", _I32),
        ("n_decode", _I32),
        ("domain", _P(_I32)),
        ("capacity", _P(_I64)),
        ("rank", _P(_I32)),
        ("p_max_batch", _I64),
        ("p_max_tokens", _I64),
        ("d_max_batch", _I64),
        ("d_max_tokens", _I64),
        ("prefill_rate", _F64),
        ("decode_rate", _F64),
        ("queue_limit", _I64),
        ("max_queued", _I64),
        ("prefill_cost", _P(TsCost)),
        ("decode_cost", _P(TsCost)),
        ("policy", _P(TsPolicy)),
        ("slo_ttft", _F64),
        ("slo_tpot", _F64),
        ("miss_budget", _I64),
    ]


class TsSimOutput(ctypes.Structure):
    """sim.h TsSimOutput."""

    _fields_ = [
        ("t_first", _P(_F64)),
        ("t_finish", _P(_F64)),
        ("cached_tokens", _P(_I64)),
        ("routed", _P(_I8)),
        ("local", _P(_I8)),
        ("prefill_slot", _P(_I32)),
        ("decode_slot", _P(_I32)),
        ("busy_time", _P(_F64)),
        ("active_time", _P(_F64)),
        ("area", _F64),
        ("rejected", _I64),
        ("misses", _I64),
        ("in_system", _I64),
        ("within_budget", _I32),
    ]


def bind(lib: ctypes.CDLL) -> ctypes._CFuncPtr:
    """ts_simulate with its C types declared."""
    fn = lib.ts_simulate
    if fn.argtypes is None:
        fn.argtypes = [_P(TsSimInput), _P(TsSimOutput)]
        fn.restype = _I32
    return fn
