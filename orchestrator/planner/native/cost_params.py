"""The C cost model's parameters (cost.h's `struct TsCost`) filled from a `CostModel`, and typed
wrappers around its two functions.

`cost_struct(cm)` copies the doubles `CostModel.__post_init__` computed (`_bf16`, `_fp8`, ...), the
constants the Python looks up on every call (weight bytes, link latency and bandwidth per
collective), and the integers of the model and parallelism; the C code then repeats only the
per-call expressions, so its prices equal `cm.prefill_chunk_seconds` / `cm.decode_step_seconds`
bit for bit (tests/planner/test_native_cost.py compares them with ==).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from orchestrator.planner.cost import CostModel
from orchestrator.planner.hardware import (
    LAYER_LATENCY_FLOOR_S,
    LINK_LATENCY_S,
    link_bytes_per_s,
    link_for_group,
)
from orchestrator.planner.models import BF16_BYTES, WEIGHT_BYTES, AttentionGeometry, Precision

MAX_ATTN_KINDS = 8  # cost.h TS_MAX_ATTN_KINDS
_I64 = ctypes.c_int64
_F64 = ctypes.c_double


class TsAttnGeo(ctypes.Structure):
    """cost.h `TsAttnGeo`: one attention layer kind."""

    _fields_ = [(name, _I64) for name in ("layers", "window", "ratio", "topk", "indexer", "entry_bytes",
                                          "index_key_bytes", "params")]


class TsCost(ctypes.Structure):
    """cost.h `struct TsCost`, field for field (same names, same order, same types)."""

    _fields_ = [
        *((name, _F64) for name in ("bf16", "fp8", "routed", "bw", "attn_rate", "index_rate", "kv_rate",
                                    "fp8_weight_bytes", "routed_weight_bytes", "layer_floor_s",
                                    "tp_link_latency_s", "tp_link_bytes_per_s",
                                    "ep_link_latency_s", "ep_link_bytes_per_s")),
        *((name, _I64) for name in ("gpus", "tp", "ep", "dp", "hidden", "vocab", "layers", "bf16_bytes",
                                    "experts", "moe_topk", "expert_params", "shared_params", "moe_layers",
                                    "dense_layers", "dense_params")),
        ("n_attn", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("attn", TsAttnGeo * MAX_ATTN_KINDS),
    ]


def _geo(g: AttentionGeometry) -> TsAttnGeo:
    return TsAttnGeo(layers=g.layers, window=g.window, ratio=g.ratio, topk=g.topk, indexer=int(g.indexer),
                     entry_bytes=g.entry_bytes, index_key_bytes=g.index_key_bytes, params=g.params)


def cost_struct(cm: CostModel) -> TsCost:
    """`cm`'s parameters for the C cost model. Raises ValueError when the model has more attention
    kinds than cost.h's TS_MAX_ATTN_KINDS."""
    a, p, g = cm.arch, cm.par, cm.gpu
    if not 1 <= len(a.attention) <= MAX_ATTN_KINDS:
        raise ValueError(f"{a.name.value}: {len(a.attention)} attention kinds; the C cost model takes 1.."
                         f"{MAX_ATTN_KINDS} (cost.h TS_MAX_ATTN_KINDS)")
    tp_link, ep_link = link_for_group(g, p.tp), link_for_group(g, p.ep)
    m = a.moe
    out = TsCost(
        # the doubles CostModel.__post_init__ stored (object.__setattr__ on a frozen dataclass)
        bf16=cm._bf16, fp8=cm._fp8, routed=cm._routed, bw=cm._bw,
        attn_rate=cm._attn_rate, index_rate=cm._index_rate, kv_rate=cm._kv_rate,
        fp8_weight_bytes=WEIGHT_BYTES[Precision.FP8], routed_weight_bytes=WEIGHT_BYTES[cm.precision],
        layer_floor_s=LAYER_LATENCY_FLOOR_S,
        tp_link_latency_s=LINK_LATENCY_S[tp_link], tp_link_bytes_per_s=link_bytes_per_s(g, tp_link),
        ep_link_latency_s=LINK_LATENCY_S[ep_link], ep_link_bytes_per_s=link_bytes_per_s(g, ep_link),
        gpus=p.gpus, tp=p.tp, ep=p.ep, dp=p.dp, hidden=a.hidden, vocab=a.vocab, layers=a.layers,
        bf16_bytes=BF16_BYTES, experts=m.experts, moe_topk=m.topk, expert_params=m.expert_params,
        shared_params=m.shared_params, moe_layers=m.moe_layers, dense_layers=m.dense_layers,
        dense_params=m.dense_params, n_attn=len(a.attention), reserved=0,
    )
    for i, geo in enumerate(a.attention):
        out.attn[i] = _geo(geo)
    return out


def _bind(lib: ctypes.CDLL) -> None:
    """Declare the two functions' C types on `lib` once (a CDLL keeps one function object per name,
    whose argtypes start as None)."""
    if lib.ts_decode_step_seconds.argtypes is not None:
        return
    lib.ts_prefill_chunk_seconds.argtypes = [ctypes.POINTER(TsCost), ctypes.POINTER(_I64),
                                             ctypes.POINTER(_I64), ctypes.c_int32, _I64]
    lib.ts_prefill_chunk_seconds.restype = _F64
    lib.ts_decode_step_seconds.argtypes = [ctypes.POINTER(TsCost), _I64, _F64]
    lib.ts_decode_step_seconds.restype = _F64


def prefill_chunk_seconds(lib: ctypes.CDLL, cs: TsCost, segments: Sequence[tuple[int, int]],
                          sampled: int) -> float:
    """`ts_prefill_chunk_seconds` over `segments` = ((start, end), ...): equals
    `CostModel.prefill_chunk_seconds(tuple(segments), sampled)`. Raises ValueError for a segment that
    is not 0 <= start < end (as work.prefill_work does)."""
    for start, end in segments:
        if not 0 <= start < end:
            raise ValueError(f"prefill segment (start={start}, end={end}): need 0 <= start < end")
    _bind(lib)
    n = len(segments)
    starts = (_I64 * n)(*(s for s, _ in segments))
    ends = (_I64 * n)(*(e for _, e in segments))
    return lib.ts_prefill_chunk_seconds(ctypes.byref(cs), starts, ends, n, sampled)


def decode_step_seconds(lib: ctypes.CDLL, cs: TsCost, batch: int, ctx: float) -> float:
    """`ts_decode_step_seconds`: equals `CostModel.decode_step_seconds(batch, ctx)`. Raises ValueError
    unless batch >= 1 and ctx >= batch (as the Python does)."""
    if batch < 1 or ctx < batch:
        raise ValueError(f"decode batch={batch}, context_tokens={ctx}: need batch >= 1 and "
                         "context_tokens >= batch")
    _bind(lib)
    return lib.ts_decode_step_seconds(ctypes.byref(cs), batch, ctx)
