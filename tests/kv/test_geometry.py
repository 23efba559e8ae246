"""Page geometry per layer kind, checked against counts taken from the layer lists by hand."""

from __future__ import annotations

import pytest
import torch

from workers.kv.entry import KeyFormat
from workers.kv.geometry import KvGeometry, KvShape, LayerKind, Part, PoolKind
from workers.kv.pool import PagePool
from workers.kv.presets import Preset

pytestmark = pytest.mark.kv


@pytest.mark.parametrize(
    ("preset", "n_csa", "n_hca", "n_layers"),
    [
        (Preset.V4_FLASH, 21, 20, 44),  # CSA even 2..42, HCA odd 3..41, + SWA 0, 1 and MTP
        (Preset.V4_PRO, 30, 31, 62),  # CSA even 2..60, HCA 0, 1, odd 3..59, + MTP
    ],
)
@pytest.mark.parametrize(("fmt", "key_bytes"), [(KeyFormat.FP4, 68), (KeyFormat.FP8, 132)])
def test_page_sizes(
    preset: Preset, n_csa: int, n_hca: int, n_layers: int, fmt: KeyFormat, key_bytes: int
) -> None:
    g = KvGeometry.of(preset.shape(fmt))
    kinds = g.shape.kinds
    assert (kinds.count(LayerKind.CSA), kinds.count(LayerKind.HCA), len(kinds)) == (n_csa, n_hca, n_layers)
    assert g.block.nbytes == n_csa * 64 * (584 + key_bytes) + n_hca * 2 * 584
    # window: 128 raw entries per layer + CSA boundary state (4 rows of fp32 kv+score, 1024 / 256 wide)
    assert g.window.nbytes == n_layers * 128 * 584 + n_csa * 4 * (2 * 1024 * 4 + 2 * 256 * 4)
    # running state: CSA <= 7 rows (main + indexer), HCA 3 running accumulators 512 wide, all fp32
    assert g.state.nbytes == n_csa * 7 * (2 * 1024 * 4 + 2 * 256 * 4) + n_hca * 3 * 512 * 4


def test_flash_compressed_bytes_per_token() -> None:
    g = KvGeometry.of(Preset.V4_FLASH.shape())
    assert g.block.nbytes / 256 == 3514.25  # 21 * (146 + 17) + 20 * 4.5625


def test_segments_tile_the_page_without_overlap() -> None:
    g = KvGeometry.of(Preset.V4_PRO.shape())
    for page in (g.block, g.window, g.state):
        off = 0
        for s in page.segments:
            assert s.offset == off
            off += s.nbytes
        assert off == page.nbytes


def test_pool_views_write_into_the_buffer() -> None:
    shape = KvShape((0, 4, 128, 0))
    g = KvGeometry.of(shape)
    pool = PagePool(g.block, 3)
    v = pool.view(1, Part.KEY)
    assert v.shape == (3, 64, 68)
    v[2, 5] = 7
    s = g.block.segment(1, Part.KEY)
    start = 2 * g.block.nbytes + s.offset + 5 * 68
    flat = pool.buffer.view(-1)
    assert torch.all(flat[start : start + 68] == 7) and int(flat.sum()) == 7 * 68
    with pytest.raises(KeyError, match="no key segment for layer 2"):
        pool.view(2, Part.KEY)


def test_byte_ranges_coalesce_consecutive_pages() -> None:
    g = KvGeometry.of(KvShape((0, 4, 128, 0)))
    pool = PagePool(g.block, 10, device="meta")
    n = g.block.nbytes
    assert pool.byte_ranges([3, 4, 5, 8, 9, 1]) == [(3 * n, 3 * n), (8 * n, 2 * n), (n, n)]
    with pytest.raises(IndexError, match="page 10 outside block pool"):
        pool.byte_ranges([10])


def test_bad_ratio_names_layer() -> None:
    with pytest.raises(ValueError, match=r"compress_ratios\[2\] = 8"):
        KvShape((0, 4, 8))
    assert PoolKind.BLOCK in {p.pool for p in (KvGeometry.of(KvShape((4,))).block,)}


def test_layout_hash_names_the_layout() -> None:
    flash = KvGeometry.of(Preset.V4_FLASH.shape()).layout_hash()
    assert flash == KvGeometry.of(Preset.V4_FLASH.shape()).layout_hash() and 0 <= flash < 2**64
    others = {
        KvGeometry.of(Preset.V4_FLASH.shape(KeyFormat.FP8)).layout_hash(),
        KvGeometry.of(Preset.V4_PRO.shape()).layout_hash(),
        KvGeometry.of(Preset.TINY.shape()).layout_hash(),
    }
    assert flash not in others and len(others) == 3
