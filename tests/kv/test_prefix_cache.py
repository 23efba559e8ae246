"""Allocator and prefix cache with exact page ids (the style of vLLM's prefix-cache tests).

Pages are handed out lowest id first, then in the order they were given back; the comments walk
through which page each step must take.
"""

from __future__ import annotations

import pytest

from tandem.blocks import block_hashes
from workers.kv.events import KvCleared, KvEvent, KvRemoved, KvStored
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import AdmissionRefused, KvCacheManager, KvCapacity
from workers.kv.presets import Preset

pytestmark = pytest.mark.kv
GEOM = KvGeometry.of(Preset.TINY.shape())


def manager(blocks: int, windows: int, states: int) -> KvCacheManager:
    return KvCacheManager(GEOM, KvCapacity(blocks, windows, states), "w0", device="meta")


def run(m: KvCacheManager, seq: int, upto: int) -> None:
    """Step `seq` to `upto` tokens in chunks that end on block ends, state written at each."""
    while (n := m.length(seq)) < upto:
        end = min((n // 256 + 1) * 256, upto)
        m.ensure(seq, end)
        m.advance(seq, end, boundary_state_written=True)


def free_ids(m: KvCacheManager, pool: PoolKind) -> list[int]:
    return list(m.allocators[pool]._free)


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + 31 * i) % 50000 for i in range(n)]


def test_exact_pages_hits_and_eviction_order() -> None:
    m = manager(blocks=8, windows=8, states=3)
    a = tokens(1, 778)
    ha = block_hashes(a)
    assert m.admit(1, ha, 778, 800).hit_blocks == 0
    run(m, 1, 778)
    # Block pages 0..3; window pages: idx1->0 (boundary h0), idx3->1 (h1), idx5->2 (h2), idx6->3.
    assert m.block_pages(1) == [0, 1, 2, 3]
    assert m.window_pages(1) == {5: 2, 6: 3}
    assert [m.prefix.boundary_page(h) for h in ha] == [0, 1, 2]
    assert m.flush_events().events == (KvEvent(0, KvCleared()), KvEvent(1, KvStored(tuple(ha), None)))
    m.free(1)
    # Unregistered pages go straight back; registered ones are cached, the tail block oldest.
    assert free_ids(m, PoolKind.BLOCK) == [4, 5, 6, 7, 3]
    assert list(m.prefix._lru_b) == [2, 1, 0]
    assert free_ids(m, PoolKind.WINDOW) == [4, 5, 6, 7, 3]
    assert list(m.prefix._lru_w) == [0, 1, 2]

    b = a[:512] + tokens(2, 300)
    hb = block_hashes(b)
    adm = m.admit(2, hb, 812, 812)
    assert (adm.hit_blocks, adm.hit_tokens) == (2, 512)
    assert m.block_pages(2) == [0, 1] and m.window_pages(2) == {3: 1}
    assert list(m.prefix._lru_b) == [2] and list(m.prefix._lru_w) == [0, 2]
    run(m, 2, 812)
    assert m.block_pages(2) == [0, 1, 4, 5]
    assert m.window_pages(2) == {5: 4, 6: 5}
    assert list(m.prefix._lru_w) == [0, 2, 1]
    assert m.flush_events().events[0].body == KvStored((hb[2],), hb[1])

    # A fresh 4-block prompt: free block pages 6, 7, 3, then the LRU cached block (page 2, h_a2),
    # whose boundary window page 2 is freed with it.
    d = tokens(3, 1024)
    hd = block_hashes(d)
    m.admit(3, hd, 1024, 1024)
    run(m, 3, 1024)
    assert m.block_pages(3) == [6, 7, 3, 2]
    assert [ev.body for ev in m.flush_events().events] == [
        KvStored(tuple(hd[:3]), None),
        KvRemoved((ha[2],)),
        KvStored((hd[3],), hd[2]),
    ]
    assert not m.prefix.is_registered(ha[2]) and m.prefix.is_registered(ha[1])
    assert m.prefix.lookup(ha) == 2


def test_boundary_without_window_is_no_longer_a_hit() -> None:
    m = manager(blocks=16, windows=8, states=2)
    a = tokens(4, 800)
    ha = block_hashes(a)
    m.admit(1, ha, 800, 800)
    run(m, 1, 800)
    m.free(1)
    assert list(m.prefix._lru_w) == [0, 1, 2] and free_ids(m, PoolKind.WINDOW) == [4, 5, 6, 7, 3]
    assert [m.prefix.lookup(ha[:k]) for k in (1, 2, 3)] == [1, 2, 3]
    # A 6-block prompt: its boundary pages take the free window pages 4, 5, 6, 7, 3 (each cached
    # once passed); its 6th needs one more and evicts the least recently used: page 0 (h_a0).
    e = tokens(5, 1536)
    m.admit(2, block_hashes(e), 1536, 1536)
    run(m, 2, 1280)
    assert m.window_pages(2) == {9: 3} and m.flush_events().events[-1].body == KvStored(
        tuple(block_hashes(e)[:5]), None
    )
    run(m, 2, 1536)
    assert m.window_pages(2) == {11: 0}
    he = block_hashes(e)
    assert [ev.body for ev in m.flush_events().events] == [KvRemoved((ha[0],)), KvStored((he[5],), he[4])]
    # Blocks stay cached; only the boundary at 256 lost its window.
    assert all(m.prefix.is_registered(h) for h in ha)
    assert [m.prefix.lookup(ha[:k]) for k in (1, 2, 3)] == [0, 2, 3]
    m.free(2)
    assert m.admit(3, ha[:1], 300, 300).hit_blocks == 0
    m.free(3)
    assert m.admit(4, ha, 800, 800).hit_blocks == 3


def test_hit_leaves_at_least_one_token_to_compute() -> None:
    m = manager(blocks=8, windows=8, states=3)
    a = tokens(5, 512)
    m.admit(1, block_hashes(a), 512, 600)
    run(m, 1, 512)
    m.free(1)
    assert m.admit(2, block_hashes(a), 512, 600).hit_blocks == 1  # 2 would leave nothing to compute
    assert m.admit(3, block_hashes(a + [1]), 513, 600).hit_blocks == 2


def test_admission_refuses_what_it_cannot_hold_to_max_length() -> None:
    m = manager(blocks=6, windows=8, states=4)
    m.admit(1, [], 10, 1024)  # reserves 4 block pages
    assert m.can_admit([], 10, 512) and not m.can_admit([], 10, 513)
    with pytest.raises(AdmissionRefused, match="block pool needs 3 pages, 2 available"):
        m.admit(2, [], 10, 513)
    assert not m.is_admitted(2)
    m.admit(2, [], 10, 512)
    run(m, 1, 1024)
    run(m, 2, 512)  # both run to max length without running out
    assert m.allocators[PoolKind.BLOCK].num_free == 0
    with pytest.raises(ValueError, match="outside"):
        m.ensure(2, 513)


def test_cached_pages_count_as_available_and_hits_stop_being_evictable() -> None:
    m = manager(blocks=4, windows=8, states=4)
    a = tokens(6, 768)
    m.admit(1, block_hashes(a), 768, 768)
    run(m, 1, 768)
    m.free(1)
    assert m.available(PoolKind.BLOCK) == 4  # 1 free + 3 cached
    # Hitting 2 cached blocks: they stop being evictable, so 2 more pages remain for this sequence.
    assert m.admit(2, block_hashes(a), 768, 1024).hit_blocks == 2
    assert m.available(PoolKind.BLOCK) == 0
    assert not m.can_admit([], 1, 1)
