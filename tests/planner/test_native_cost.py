"""The C cost model (orchestrator/planner/native/cost.c) against the Python CostModel, compared with ==:
random prefill chunks and decode steps over every model x GPU kind x parallelism x precision, the
window / ratio / top-k boundaries, the struct layout against cost.h's own offsetof, and every TsCost
field proven read (a perturbed field changes a price)."""

from __future__ import annotations

import ctypes
import math
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.planner.cost import CostModel, Parallelism
from orchestrator.planner.hardware import GpuKind, gpu
from orchestrator.planner.models import (
    AttentionGeometry,
    AttnKind,
    ModelArch,
    ModelName,
    MoeShape,
    Precision,
    model,
)
from orchestrator.planner.native import lib as native_lib
from orchestrator.planner.native.cost_params import (
    TsAttnGeo,
    TsCost,
    cost_struct,
    decode_step_seconds,
    prefill_chunk_seconds,
)

pytestmark = pytest.mark.planner

GPUS = (GpuKind.H100, GpuKind.B200, GpuKind.GB200, GpuKind.B300)
# (gpus, tp, ep): no collective; EP only; TP only; both over RDMA on 8-GPU nodes; both on one NVL72 domain
PARS = (Parallelism(1, 1, 1), Parallelism(4, 1, 4), Parallelism(8, 8, 1), Parallelism(16, 2, 16),
        Parallelism(72, 4, 72))
MAX_END = 2_000_000
PER_MODEL = 300  # random prefill chunks and as many decode steps per cost model

# cost.h's layout as the compiler sees it, one offsetof per ctypes field (the names are generated)
_PROBE = """#include <stddef.h>
#include "cost.h"
void ts_probe_layout(int64_t *out) {{
{lines}
}}
"""


def _compile(out_dir: Path, sources: list[Path]) -> ctypes.CDLL:
    """cost.c (plus `sources`) alone, with the flags lib.py uses: independent of the folder's other C files."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "no C compiler (set CC or install gcc): the native cost model cannot be tested"
    out = out_dir / "cost_alone.so"
    cmd = [cc, *native_lib.CFLAGS, "-I", str(native_lib.SOURCE_DIR), "-o", str(out),
           str(native_lib.SOURCE_DIR / "cost.c"), *map(str, sources), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(out))


def _probe_lines() -> tuple[list[str], str]:
    names = [name for name, _ in TsCost._fields_]
    geo = [name for name, _ in TsAttnGeo._fields_]
    lines = [f"out[{i}] = offsetof(struct TsCost, {n});" for i, n in enumerate(names)]
    lines += [f"out[{len(names) + i}] = offsetof(TsAttnGeo, {n});" for i, n in enumerate(geo)]
    lines += [f"out[{len(names) + len(geo)}] = sizeof(struct TsCost);",
              f"out[{len(names) + len(geo) + 1}] = sizeof(TsAttnGeo);",
              f"out[{len(names) + len(geo) + 2}] = TS_MAX_ATTN_KINDS;"]
    return lines, "\n".join(f"    {line}" for line in lines)


@pytest.fixture(scope="module")
def clib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    tmp = tmp_path_factory.mktemp("native_cost")
    probe = tmp / "probe.c"
    probe.write_text(_PROBE.format(lines=_probe_lines()[1]))
    return _compile(tmp, [probe])


def _random_segments(rng: random.Random, boundaries: list[int]) -> tuple[tuple[int, int], ...]:
    """1..8 segments; starts uniform in 0..200k, small, or next to a window / ratio / top-k knee."""
    segs = []
    for _ in range(rng.randint(1, 8)):
        pick = rng.random()
        if pick < 0.4:
            start = rng.randint(0, 200_000)
        elif pick < 0.7:
            start = rng.randint(0, 600)
        else:
            start = max(0, rng.choice(boundaries) + rng.randint(-2, 2))
        length = rng.randint(1, 16384) if rng.random() < 0.6 else rng.randint(1, 300)
        segs.append((start, start + length))
    return tuple(segs)


def _boundaries(name: ModelName) -> list[int]:
    """Positions where a sum's branch changes: window, ratio multiples, top-k knees (topk * ratio)."""
    out = {0, 1}
    for g in model(name).attention:
        out |= {g.window, g.window + 1}
        if g.ratio:
            out |= {g.ratio * k for k in (1, 2, 3, 100)}
            if g.topk:
                out |= {g.topk * g.ratio, g.topk * g.ratio - 1, g.topk * g.ratio + 1}
    return sorted(out)


def _random_context(rng: random.Random, batch: int, name: ModelName) -> float:
    """A decode batch's context: uniform (non-integer) up to 2M, an integer, exactly batch, or where
    the mean equals a window or the visible entries equal topk * batch (min's ties)."""
    pick = rng.random()
    geo = rng.choice(model(name).attention)
    if pick < 0.3:
        return rng.uniform(batch, MAX_END)
    if pick < 0.45:
        return float(rng.randint(batch, MAX_END))
    if pick < 0.65:  # means around the 128-token windows
        return rng.uniform(batch, 300.0 * batch)
    if pick < 0.7:
        return float(batch)
    if pick < 0.85 and geo.window:
        return float(geo.window * batch) + rng.choice((-1e-9, 0.0, 1e-9)) * batch
    if geo.topk:
        return math.nextafter(float(geo.topk * batch * geo.ratio), rng.choice((0.0, math.inf, MAX_END)))
    return rng.uniform(batch, batch + 1.0)


@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("name", list(ModelName))
def test_random_prices_equal_python_bit_for_bit(clib: ctypes.CDLL, name: ModelName, precision: Precision) -> None:
    rng = random.Random(f"{name.value}-{precision.value}")
    bounds = _boundaries(name)
    compared = 0
    for kind in GPUS:
        for par in PARS:
            cm = CostModel(gpu(kind), model(name), par, precision)
            cs = cost_struct(cm)
            for _ in range(PER_MODEL):
                segs = _random_segments(rng, bounds)
                sampled = rng.randint(0, len(segs))
                want = cm.prefill_chunk_seconds(segs, sampled)
                got = prefill_chunk_seconds(clib, cs, segs, sampled)
                assert got == want, (kind, par, segs, sampled, got, want)
                batch = rng.choice((1, 2, 3, rng.randint(1, 512), 512))
                ctx = _random_context(rng, batch, name)
                want = cm.decode_step_seconds(batch, ctx)
                got = decode_step_seconds(clib, cs, batch, ctx)
                assert got == want, (kind, par, batch, ctx, got, want)
                compared += 2
    assert compared == len(GPUS) * len(PARS) * 2 * PER_MODEL


@pytest.mark.parametrize("name", list(ModelName))
def test_boundary_prices_equal_python(clib: ctypes.CDLL, name: ModelName) -> None:
    """Segments starting or ending on every boundary (at 0 included), the widest 2M context, batch ==
    context, and contexts whose mean sits at a window exactly and one ulp either side."""
    arch = model(name)
    for precision in Precision:
        cm = CostModel(gpu(GpuKind.GB200), arch, Parallelism(16, 2, 16), precision)
        cs = cost_struct(cm)
        points = sorted({p + d for p in _boundaries(name) for d in (-1, 0, 1) if p + d >= 0} | {MAX_END})
        for a in points:
            for b in points:
                if a < b:
                    for sampled in (0, 1):
                        assert prefill_chunk_seconds(clib, cs, [(a, b)], sampled) == \
                            cm.prefill_chunk_seconds(((a, b),), sampled), (a, b, sampled)
        many = tuple((k * 4096, k * 4096 + 2048) for k in range(8))
        assert prefill_chunk_seconds(clib, cs, many, 8) == cm.prefill_chunk_seconds(many, 8)
        for batch in (1, 2, 7, 128, 511, 512):
            ctxs = {float(batch), float(batch + 1), float(MAX_END), batch + 0.5}
            for g in arch.attention:
                at = float(g.window * batch)
                ctxs |= {at, math.nextafter(at, 0.0), math.nextafter(at, math.inf)}
                if g.topk:
                    knee = float(g.topk * batch * g.ratio)
                    ctxs |= {knee, math.nextafter(knee, 0.0), math.nextafter(knee, math.inf)}
            for ctx in sorted(c for c in ctxs if c >= batch):
                assert decode_step_seconds(clib, cs, batch, ctx) == cm.decode_step_seconds(batch, ctx), \
                    (batch, ctx)


def _attention_heavy_arch() -> ModelArch:
    """A made-up model whose price is almost all attention core (no MoE or projection weights, one
    layer each, a huge per-key cost): a last-bit slip in the window / selected / visible / KV sums
    shows in the total instead of vanishing under the fixed part. Odd windows, ratios and top-k."""
    def geo(kind: AttnKind, window: int, ratio: int, topk: int, indexer: bool, entry: int,
            key: int) -> AttentionGeometry:
        return AttentionGeometry(kind=kind, layers=1, window=window, ratio=ratio, topk=topk, indexer=indexer,
                                 entry_bytes=entry, index_key_bytes=key, params=0, state_bytes_per_token=0,
                                 state_tokens_max=0)
    # entry sizes from tiny to huge, so both sides of each kind's max(compute, KV read) win somewhere
    kinds = (geo(AttnKind.SWA, 100, 0, 0, False, 120_000, 0), geo(AttnKind.CSA, 37, 3, 7, True, 150_000, 40_000),
             geo(AttnKind.HCA, 0, 5, 0, False, 1_000_000, 7), geo(AttnKind.DSA, 0, 1, 50, True, 60_000, 90_000))
    moe = MoeShape(experts=1, topk=1, expert_params=0, shared_params=0, moe_layers=0)
    return ModelArch(name=ModelName.V4_FLASH, hidden=1, vocab=1, attention=kinds, heads=1000, qk_dim=999,
                     v_dim=1001, index_heads=333, index_dim=77, moe=moe, routed_precision=Precision.FP8)


def test_attention_dominated_prices_equal_python(clib: ctypes.CDLL) -> None:
    """Where the attention core is nearly the whole price, random chunks and decode steps are equal."""
    arch = _attention_heavy_arch()
    rng = random.Random("attention-heavy")
    for par in (Parallelism(1, 1, 1), Parallelism(6, 3, 2)):
        cm = CostModel(gpu(GpuKind.B200), arch, par, Precision.FP8)
        cs = cost_struct(cm)
        for _ in range(2000):
            segs = _random_segments(rng, [0, 3, 5, 21, 37, 100, 250])
            sampled = rng.randint(0, len(segs))
            assert prefill_chunk_seconds(clib, cs, segs, sampled) == cm.prefill_chunk_seconds(segs, sampled), segs
            batch = rng.randint(1, 512)
            ctx = rng.choice((rng.uniform(batch, 150.0 * batch), rng.uniform(batch, MAX_END)))
            assert decode_step_seconds(clib, cs, batch, ctx) == cm.decode_step_seconds(batch, ctx), (batch, ctx)


def test_struct_layout_matches_the_header(clib: ctypes.CDLL) -> None:
    """ctypes' offsets, sizes and array length are the C compiler's (cost.h's offsetof)."""
    lines, _ = _probe_lines()
    out = (ctypes.c_int64 * len(lines))()
    clib.ts_probe_layout.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    clib.ts_probe_layout(out)
    want = [getattr(TsCost, n).offset for n, _ in TsCost._fields_]
    want += [getattr(TsAttnGeo, n).offset for n, _ in TsAttnGeo._fields_]
    want += [ctypes.sizeof(TsCost), ctypes.sizeof(TsAttnGeo), TsCost.attn.size // ctypes.sizeof(TsAttnGeo)]
    assert list(out) == want


# (call kind, args): small and large steps, so both sides of every max() are reached
_PROBE_CALLS = (("p", ((0, 1),), 1), ("p", ((0, 16384),), 1), ("p", ((100_000, 100_300), (5, 9)), 2),
                ("p", ((0, 3000),), 0), ("d", 1, 1.0), ("d", 1, 8192.5), ("d", 512, 2e6), ("d", 64, 64 * 128.0),
                ("d", 3, 5.0))


def _prices(clib: ctypes.CDLL, cs: TsCost) -> list[float]:
    return [prefill_chunk_seconds(clib, cs, a, b) if k == "p" else decode_step_seconds(clib, cs, a, b)
            for k, a, b in _PROBE_CALLS]


def _perturbations(value: float | int, field: str) -> list[float | int]:
    """A nudge (catches a field in the winning side of a max) and big moves both ways (flip a max whose
    side never wins at today's efficiencies, e.g. the KV-read side)."""
    if isinstance(value, float):
        return [value * (1 + 2.0 ** -30), value * 2.0 ** 20, value * 2.0 ** -20]
    if field == "indexer":
        return [1 - value]
    if field == "n_attn":
        return [value - 1]
    return [value + 1, (value + 1) << 20]


def _changes_a_price(clib: ctypes.CDLL, cm: CostModel, base: list[float], edit) -> bool:
    cs = cost_struct(cm)
    target, field = edit(cs)
    for value in _perturbations(getattr(target, field), field):
        setattr(target, field, value)
        if _prices(clib, cs) != base:
            return True
    return False


@pytest.mark.parametrize("name", [ModelName.V3_2, ModelName.V4_FLASH])
def test_every_field_is_read(clib: ctypes.CDLL, name: ModelName) -> None:
    """Fault injection: moving any one TsCost field (each geometry's too) changes some price, so the
    equality tests above would catch a field C ignores or reads from the wrong place. V3.2 has dense
    layers; Flash has three attention kinds. Exempt: fields Python itself ignores (the padding, dense
    fields of a model without dense layers, top-k / indexer / index keys of a kind without entries)."""
    cm = CostModel(gpu(GpuKind.B200), model(name), Parallelism(16, 2, 16), Precision.FP4)
    base = _prices(clib, cost_struct(cm))
    assert base == [cm.prefill_chunk_seconds(a, b) if k == "p" else cm.decode_step_seconds(a, b)
                    for k, a, b in _PROBE_CALLS]
    exempt = {"reserved", "attn"} | ({"dense_layers", "dense_params"} if not cm.arch.moe.dense_layers else set())
    checked = 0
    for field, _ in TsCost._fields_:
        if field not in exempt:
            assert _changes_a_price(clib, cm, base, lambda cs, f=field: (cs, f)), f"TsCost.{field} changed no price"
            checked += 1
    for i, geo in enumerate(cm.arch.attention):
        for field, _ in TsAttnGeo._fields_:
            if geo.ratio == 0 and field in ("topk", "indexer", "index_key_bytes"):
                continue
            assert _changes_a_price(clib, cm, base, lambda cs, i=i, f=field: (cs.attn[i], f)), \
                f"TsCost.attn[{i}].{field} ({geo.kind.value}) changed no price"
            checked += 1
    assert checked >= 30


def test_wrappers_refuse_what_python_refuses(clib: ctypes.CDLL) -> None:
    cm = CostModel(gpu(GpuKind.H100), model(ModelName.V4_FLASH), Parallelism(8, 1, 8), Precision.FP8)
    cs = cost_struct(cm)
    for segs in (((5, 5),), ((-1, 3),), ((0, 4), (9, 2))):
        with pytest.raises(ValueError, match=r"prefill segment \(start="):
            prefill_chunk_seconds(clib, cs, segs, 1)
        with pytest.raises(ValueError, match=r"prefill segment \(start="):
            cm.prefill_chunk_seconds(segs, 1)
    for batch, ctx in ((0, 5.0), (4, 3.5)):
        with pytest.raises(ValueError, match="need batch >= 1 and context_tokens >= batch"):
            decode_step_seconds(clib, cs, batch, ctx)
        with pytest.raises(ValueError, match="need batch >= 1 and context_tokens >= batch"):
            cm.decode_step_seconds(batch, ctx)


def test_the_folder_library_exports_the_same_prices() -> None:
    """lib.load() (every *.c of the folder, the simulator's build) carries cost.c unchanged."""
    full = native_lib.load()
    cm = CostModel(gpu(GpuKind.B300), model(ModelName.V4_PRO), Parallelism(16, 4, 16), Precision.FP4)
    cs = cost_struct(cm)
    segs = ((0, 4096), (70_000, 74_000))
    assert prefill_chunk_seconds(full, cs, segs, 2) == cm.prefill_chunk_seconds(segs, 2)
    assert decode_step_seconds(full, cs, 100, 123_456.75) == cm.decode_step_seconds(100, 123_456.75)
