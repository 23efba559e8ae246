"""The STATE page and a short handoff at their new sizes (HCA state as running accumulators), and
the tiny model's HCA state through the paged cache: 3 x 512 fp32 whatever its token count, read
back as written (fp32), or rescaled consistently from a float64 model."""

from __future__ import annotations

import pytest
import torch

from workers.kv.geometry import KvGeometry, LayerKind, Part, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.paged_cache import PagedModelCache
from workers.kv.presets import Preset, kv_shape
from workers.model import DeepseekV4, preset, running_pool
from workers.model.cache import CompressorState, ContiguousCache, EntryKind, RunningPool
from workers.model.config import LayerKind as ModelKind
from workers.model.init import init_random
from workers.transfer.pages import sequence_pages

pytestmark = pytest.mark.kv

CSA_ROWS = 7 * (2 * 1024 * 4 + 2 * 256 * 4)  # main + indexer rows of one CSA layer, fp32 kv + score
HCA_ACC = 3 * 512 * 4  # max, sum, weighted sum of one HCA layer, fp32
HCA_RAW = 127 * 2 * 512 * 4  # what the same state took as raw rows


@pytest.mark.parametrize(("which", "n_csa", "n_hca", "was"), [
    (Preset.V4_FLASH, 21, 20, 11_909_120), (Preset.V4_PRO, 30, 31, 18_276_352)])
def test_state_page_is_csa_rows_plus_hca_accumulators(which: Preset, n_csa: int, n_hca: int, was: int) -> None:
    geom = KvGeometry.of(which.shape())
    assert geom.state.nbytes == n_csa * CSA_ROWS + n_hca * HCA_ACC
    assert geom.state.nbytes == was - n_hca * (HCA_RAW - HCA_ACC)  # the raw-row page measured before
    for s in geom.state.segments:
        if geom.shape.kinds[s.layer] is LayerKind.HCA:
            assert (s.part, s.items, s.item_bytes) == (Part.STATE, 1, HCA_ACC)


def test_a_1k_flash_handoff_moves_9_4_mb_instead_of_19_7() -> None:
    """What sequence_pages names for a 1,024-token prompt: 4 block pages, 1 window page, the state
    page; counted from the pools' own byte ranges."""
    geom = KvGeometry.of(Preset.V4_FLASH.shape())
    m = KvCacheManager(geom, KvCapacity(block_pages=5, window_pages=4, state_pages=1), "w", device="meta")
    m.admit(0, [], 1024, 1024)
    m.ensure(0, 1024)
    pages = sequence_pages(m, 0, 1024).pages
    moved = sum(n for pool, ids in ((PoolKind.BLOCK, pages.block), (PoolKind.WINDOW, pages.window),
                                    (PoolKind.STATE, pages.state))
                for _, n in m.pools[pool].byte_ranges(list(ids)))
    assert (len(pages.block), len(pages.window), len(pages.state)) == (4, 1, 1)
    assert moved == 4 * 899_648 + 4_149_248 + 21 * CSA_ROWS + 20 * HCA_ACC == 9_376_000
    assert moved == 19_656_960 - 20 * (HCA_RAW - HCA_ACC)


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    return init_random(DeepseekV4(preset("tiny"), quant_sim=True, with_mtp=False), seed=5)


def paged(model: DeepseekV4, dtype: torch.dtype = torch.float32) -> PagedModelCache:
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
    return PagedModelCache(KvCacheManager(geom, KvCapacity(8, 8, 2), "w"), model.cfg.num_layers, dtype)


def test_the_models_hca_state_round_trips_the_page_exactly(model: DeepseekV4) -> None:
    hca = model.cfg.layer_kinds.index(ModelKind.HCA)
    ids = torch.randint(0, model.cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    cache, ref = paged(model), ContiguousCache(model.cfg.window)
    cache.admit(0, ids.tolist(), 301)
    for c in (cache, ref):
        model.prefill(0, ids[:200], c)
        model.prefill(0, ids[200:], c)
    got, want = cache.compressor_state(hca, 0, EntryKind.ATTN), ref.compressor_state(hca, 0, EntryKind.ATTN)
    assert got is not None and want is not None and got.pool is not None and want.pool is not None
    assert (got.start, got.pool.count, got.kv.shape[0]) == (want.start, want.pool.count, 0) == (256, 44, 0)
    for a, b in ((got.pool.max, want.pool.max), (got.pool.sum, want.pool.sum), (got.pool.wsum, want.pool.wsum)):
        assert torch.equal(a, b)


def test_a_float64_pool_is_rescaled_to_its_fp32_maximum() -> None:
    """Rounding only the maximum would make later folds inconsistent; the cache rescales the sums."""
    cfg = preset("tiny")
    cache = paged(DeepseekV4(cfg, quant_sim=True, with_mtp=False), torch.float64)
    hca = cfg.layer_kinds.index(ModelKind.HCA)
    cache.admit(0, list(range(40)), 40)
    g = torch.Generator().manual_seed(2)
    kv, score = (torch.randn(30, 512, generator=g, dtype=torch.float64) * 5 for _ in range(2))
    pool = running_pool.fold(RunningPool.empty(512, dtype=torch.float64), kv[:20], score[:20])
    none = torch.zeros(0, 512, dtype=torch.float64)
    cache.set_compressor_state(hca, 0, EntryKind.ATTN, CompressorState(0, none, none, pool))
    back = cache.compressor_state(hca, 0, EntryKind.ATTN)
    assert back is not None and back.pool is not None and back.pool.count == 20
    assert torch.equal(back.pool.max, back.pool.max.float().double())  # an fp32 value
    want = (kv * score.softmax(dim=0)).sum(dim=0)
    got = running_pool.value(running_pool.fold(back.pool, kv[20:], score[20:]))
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    with pytest.raises(ValueError, match="expected running accumulators"):
        cache.set_compressor_state(hca, 0, EntryKind.ATTN, CompressorState(0, kv[:3], score[:3]))
