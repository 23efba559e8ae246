"""Handoff pages from real KvCacheManagers, and decode-side prefix reuse in the pull plan."""

from __future__ import annotations

import pytest

from tandem.blocks import BLOCK_SIZE, block_hashes
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import Preset
from workers.transfer.handoff import HandoffDescriptor
from workers.transfer.pages import sequence_pages
from workers.transfer.pull import pull_plan

pytestmark = pytest.mark.transfer

GEO = KvGeometry.of(Preset.TINY.shape())
CAP = KvCapacity(block_pages=32, window_pages=24, state_pages=6)
PAGE_BYTES = {k: GEO.page(k).nbytes for k in PoolKind}
W = GEO.window.tokens


def _manager(name: str) -> KvCacheManager:
    return KvCacheManager(GEO, CAP, name)


def _prefill(m: KvCacheManager, seq: int, tokens: list[int], chunk_ends: list[int]) -> None:
    """Admit and write `tokens` in chunks ending at `chunk_ends` (block ends keep their boundary)."""
    m.admit(seq, block_hashes(tokens), len(tokens), len(tokens) + 64)
    for end in chunk_ends:
        m.advance(seq, end, boundary_state_written=end % BLOCK_SIZE == 0)


def _descriptor(m: KvCacheManager, seq: int, length: int) -> HandoffDescriptor:
    sp = sequence_pages(m, seq, length)
    return HandoffDescriptor(f"req-{seq}", "prefill", 1, sp.pages, length, sp.window_start, 10.0)


def test_sequence_pages_name_blocks_last_window_and_state():
    m = _manager("p")
    tokens = list(range(700))
    _prefill(m, 1, tokens, [700])
    sp = sequence_pages(m, 1, 700)
    held = m.window_pages(1)
    assert sp.pages.block == tuple(m.block_pages(1)) and len(sp.pages.block) == 3
    # the last W = 128 tokens, positions [572, 700), lie in window pages 4 and 5
    assert (sp.window_start, sp.pages.window) == (4 * W, (held[4], held[5]))
    assert sp.pages.state == (m.state_page(1),)
    with pytest.raises(ValueError, match="sequence 1: 3 block pages, 4 needed"):
        sequence_pages(m, 1, 800)


def test_a_shared_two_block_prefix_pulls_exactly_two_fewer_blocks():
    prefix = [7] * (2 * BLOCK_SIZE)
    first, second = prefix + list(range(188)), prefix + list(range(1000, 1388))
    decode = _manager("d")
    _prefill(decode, 1, first, [2 * BLOCK_SIZE, len(first)])  # an earlier request served here
    decode.free(1)

    prefill = _manager("p")
    _prefill(prefill, 2, second, [len(second)])
    desc = _descriptor(prefill, 2, len(second))

    admission = decode.admit(2, block_hashes(second), len(second), len(second) + 64)
    assert admission.hit_blocks == 2
    decode.ensure(2, len(second))
    local = sequence_pages(decode, 2, len(second))
    assert (local.cached_blocks, local.cached_windows) == (2, ())
    assert local.pages.block[:2] == tuple(decode.block_pages(2)[:2])

    full = pull_plan(desc, local.pages, 0, PAGE_BYTES)
    reuse = pull_plan(desc, local.pages, local.cached_blocks, PAGE_BYTES, local.cached_windows)
    assert full.nbytes - reuse.nbytes == 2 * PAGE_BYTES[PoolKind.BLOCK]
    moved = {pool: [p for r in runs for p in range(r.dst, r.dst + r.pages)] for pool, runs in reuse.runs}
    assert moved[PoolKind.BLOCK] == list(local.pages.block[2:])
    assert not set(moved[PoolKind.BLOCK]) & set(local.pages.block[:2])


def test_a_shared_boundary_window_page_is_not_overwritten():
    prefix = [3] * (2 * BLOCK_SIZE)
    decode = _manager("d")
    _prefill(decode, 1, prefix + [1] * 40, [2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 40])
    decode.free(1)
    second = prefix + [2] * 88  # 600 tokens: its last window [472, 600) starts in the boundary page
    prefill = _manager("p")
    _prefill(prefill, 2, second, [len(second)])
    desc = _descriptor(prefill, 2, len(second))
    assert decode.admit(2, block_hashes(second), len(second), 700).hit_blocks == 2
    decode.ensure(2, len(second))
    local = sequence_pages(decode, 2, len(second))
    boundary = decode.window_pages(2)[2 * BLOCK_SIZE // W - 1]
    assert local.pages.window[0] == boundary and local.cached_windows == (0,)
    plan = pull_plan(desc, local.pages, local.cached_blocks, PAGE_BYTES, local.cached_windows)
    windows = [
        p
        for pool, runs in plan.runs
        if pool is PoolKind.WINDOW
        for r in runs
        for p in range(r.dst, r.dst + r.pages)
    ]
    assert windows == [local.pages.window[1]]
