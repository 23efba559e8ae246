"""Cost model: shapes against published totals, exact work sums, KV geometry from the layout
table, roofline bounds, the estimator's Little's law, and the calibration targets."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from orchestrator.planner.cost import CostModel, Parallelism, decode_token_flops
from orchestrator.planner.estimate import EstimateQuery, estimate
from orchestrator.planner.hardware import GpuKind, efficiencies, gpu
from orchestrator.planner.kv_layout import (
    block_bytes,
    bytes_per_token,
    handoff_bytes,
    request_bytes,
    request_reserve_bytes,
)
from orchestrator.planner.models import AttnKind, ModelName, Precision, model
from orchestrator.planner.work import decode_work, prefill_work

pytestmark = pytest.mark.planner

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "active", "total"), [
    (ModelName.V4_FLASH, 13e9, 284e9), (ModelName.V4_PRO, 49e9, 1.6e12), (ModelName.V3_2, 37e9, 671e9)])
def test_parameter_counts_match_published_totals(name: ModelName, active: float, total: float) -> None:
    arch = model(name)
    assert arch.active_params() == pytest.approx(active, rel=0.03)
    assert arch.total_params() == pytest.approx(total, rel=0.03)


def test_layer_kinds_follow_the_compress_ratios() -> None:
    flash = {a.kind: a.layers for a in model(ModelName.V4_FLASH).attention}
    pro = {a.kind: a.layers for a in model(ModelName.V4_PRO).attention}
    assert flash == {AttnKind.SWA: 2, AttnKind.CSA: 21, AttnKind.HCA: 20}
    assert pro == {AttnKind.CSA: 30, AttnKind.HCA: 31}


def test_kv_bytes_per_token_from_the_layout_table() -> None:
    # V3.2: (656 MLA + 132 indexer) x 61 layers, as dsv4-model.md derives.
    assert bytes_per_token(model(ModelName.V3_2)) == 48_068
    # Flash: per CSA layer one 584 B entry + one 68 B FP4 indexer key per 4 tokens; HCA 584 B per 128.
    assert bytes_per_token(model(ModelName.V4_FLASH)) == 21 * (584 + 68) / 4 + 20 * 584 / 128
    # A 256-token block: 64 CSA entries + keys per CSA layer, 2 HCA entries per HCA layer.
    assert block_bytes(model(ModelName.V4_PRO)) == 30 * 64 * (584 + 68) + 31 * 2 * 584


def test_handoff_bytes_list_what_the_decode_receives() -> None:
    arch, n = model(ModelName.V4_FLASH), 1000
    window = 43 * 128 * 584
    # entries + keys + both compressor states: at 1000 (a multiple of 4) the last block's 4 rows
    csa = 21 * ((n // 4) * (584 + 68) + 4 * 8 * (1024 + 256))
    # entries + the unfinished block (104 tokens) as running accumulators: max, sum, weighted sum fp32
    hca = 20 * ((n // 128) * 584 + 3 * 4 * 512)
    mtp = 128 * 584 + 4096 * 2
    assert handoff_bytes(arch, n) == window + csa + hca + mtp
    # blocks the decode already holds are not sent again
    assert handoff_bytes(arch, n, reused_blocks=3) == window + csa + hca + mtp - 3 * block_bytes(arch)


def _brute(arch, start: int, end: int):  # noqa: ANN001, ANN202 - test reference
    out = []
    for a in arch.attention:
        attended = scored = 0
        for p in range(start, end):
            n = p + 1
            visible = n // a.ratio if a.ratio else 0
            attended += min(n, a.window) + (min(a.topk, visible) if a.topk else visible)
            scored += visible if a.indexer else 0
        entries = end // a.ratio if a.ratio else 0
        kv = min(end, a.window) * a.entry_bytes + entries * (a.entry_bytes + a.index_key_bytes)
        out.append((attended, scored, kv))
    return out


@pytest.mark.parametrize("name", list(ModelName))
def test_prefill_work_sums_equal_a_per_position_loop(name: ModelName) -> None:
    arch, rng = model(name), random.Random(7)
    for _ in range(6):
        start = rng.randrange(0, 9000)
        end = start + rng.randrange(1, 3000)
        work = prefill_work(arch, ((start, end),), 1)
        assert [(w.attended, w.scored, w.kv_read) for w in work.attn] == _brute(arch, start, end)


def test_decode_work_of_one_request_equals_its_last_prefill_position() -> None:
    arch = model(ModelName.V4_PRO)
    n = 128 * 40  # a multiple of every ratio, so the continuous and floor forms agree
    one = decode_work(arch, 1, n)
    seg = prefill_work(arch, ((n - 1, n),), 1)
    assert [(w.attended, w.scored) for w in one.attn] == [(w.attended, w.scored) for w in seg.attn]


def test_prefill_is_compute_bound_and_decode_bandwidth_bound() -> None:
    g = gpu(GpuKind.B200)
    eff = efficiencies(GpuKind.B200)
    arch = model(ModelName.V4_FLASH)
    cm = CostModel(g, arch, Parallelism(4, 4, 1), Precision.FP4)
    # A large chunk cannot beat every FLOP at the fastest (FP4) rate nor miss the slowest (BF16) one.
    flops = 2 * arch.active_params() * 16384
    t = cm.prefill_chunk_seconds(((0, 16384),), 1)
    assert flops / (4 * g.fp4_flops * eff.compute) < t
    # One decode step must at least read the active weights once at the achieved bandwidth.
    step = cm.decode_step_seconds(1, 8192)
    assert step > 0.3 * arch.active_params() / 4 / (g.hbm_bytes_per_s * eff.bandwidth)
    # More GPUs, faster; bigger batches, slower steps but more tokens per second.
    wide = CostModel(g, arch, Parallelism(8, 8, 1), Precision.FP4)
    assert wide.decode_step_seconds(1, 8192) < step
    assert cm.decode_step_seconds(64, 64 * 8192) > step
    assert 64 / cm.decode_step_seconds(64, 64 * 8192) > 10 / step


def test_flops_at_1m_context_scale_with_the_indexer() -> None:
    v32 = model(ModelName.V3_2)
    # at 1M the V3.2 indexer (64 heads x 128 dims x 2 FLOPs over every token, 61 layers) dominates
    indexer = 61 * 64 * 128 * 2 * (1 << 20)
    assert decode_token_flops(v32, 1 << 20) > indexer > 0.8 * decode_token_flops(v32, 1 << 20)
    assert request_bytes(v32, 1 << 20) == 48_068 * (1 << 20)


@pytest.mark.parametrize("concurrency", [1, 16, 256])
def test_estimate_obeys_littles_law(concurrency: int) -> None:
    q = EstimateQuery(model=ModelName.V4_FLASH, gpu=GpuKind.GB200, gpus=8, tp=4, ep=1, precision=Precision.FP4,
                      isl=4096, osl=512, concurrency=concurrency)
    e = estimate(q)
    per_instance_rate = e.requests_per_s / e.instances
    latency = e.ttft_s + (q.osl - 1) * e.tpot_s
    assert per_instance_rate * latency == pytest.approx(concurrency / e.instances, rel=1e-6)
    assert e.total_tok_s_per_gpu == pytest.approx(e.requests_per_s * (q.isl + q.osl) / q.gpus)


def test_estimate_rejects_impossible_layouts() -> None:
    with pytest.raises(ValueError, match="tp = 3"):
        EstimateQuery(model=ModelName.V4_FLASH, gpu=GpuKind.B200, gpus=8, tp=3, ep=1, precision=Precision.FP4,
                      isl=1, osl=1, concurrency=1)
    with pytest.raises(ValueError, match="do not fit"):
        estimate(EstimateQuery(model=ModelName.V4_PRO, gpu=GpuKind.H100, gpus=8, tp=8, ep=1,
                               precision=Precision.FP4, isl=1024, osl=16, concurrency=1))


def test_calibration_rows_meet_their_targets() -> None:
    spec = importlib.util.spec_from_file_location("planner_calibration", ROOT / "bench" / "planner_calibration.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["planner_calibration"] = mod
    spec.loader.exec_module(mod)
    rows = {r.name: r for r in mod.rows()}
    required = {"flash-b200-c1-tpot", "flash-b200-c1-total", "flash-b200-c256-total", "pro-b200-c1-tpot",
                "pro-b200-c1-total", "pro-gb200-tok-per-user", "pro-vs-v32-flops-1m", "pro-vs-v32-kv-1m"}
    assert required <= set(rows)
    bad = {n: round(r.error, 3) for n, r in rows.items() if not r.ok}
    assert not bad


def test_estimate_caps_the_batch_at_what_the_kv_pool_holds() -> None:
    q = EstimateQuery(model=ModelName.V4_PRO, gpu=GpuKind.B200, gpus=8, tp=8, ep=1, precision=Precision.FP4,
                      isl=65536, osl=1024, concurrency=20_000)
    e = estimate(q)
    cm = CostModel(gpu(GpuKind.B200), model(ModelName.V4_PRO), Parallelism(8, 8, 1), Precision.FP4)
    fits = cm.kv_pool_bytes() / request_reserve_bytes(cm.arch, q.isl + q.osl)
    assert e.kv_limited and e.decode_batch == pytest.approx(fits)
    # the users who do not fit wait: Little's law over all of them still holds
    latency = e.ttft_s + (q.osl - 1) * e.tpot_s
    assert e.requests_per_s * latency == pytest.approx(q.concurrency, rel=1e-6)
