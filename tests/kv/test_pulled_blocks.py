"""Blocks a handoff filled (`pulled`): held by hash for later pulls, reported in KV events, never a
point a computation resumes from; refcounted and evicted like any cached block.

The manager runs on meta-device pools (no bytes needed: this is page bookkeeping only). A random
walk over register / boundary / release / evict is checked against an independent model of what
must be reported (a hash is resumable iff it is registered and has a boundary, held only iff it
was pulled and has none): replaying the emitted events must always give exactly those two sets,
with no duplicate stored (of one kind) or removed.
"""

from __future__ import annotations

import random

import pytest

from workers.kv.allocator import PageAllocator
from workers.kv.events import EventLog, KvCleared, KvRemoved, KvStored
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.prefix_cache import PrefixCache
from workers.kv.presets import kv_shape
from workers.model.presets import tiny

pytestmark = pytest.mark.kv

HASHES = [0x100 + i for i in range(4)]


def _manager(block_pages: int = 8) -> KvCacheManager:
    geom = KvGeometry.of(kv_shape(tiny(), with_mtp=False))
    return KvCacheManager(geom, KvCapacity(block_pages, 8, 2), "d", device="meta")


def _bodies(m: KvCacheManager) -> list[object]:
    return [e.body for e in m.flush_events().events]


def test_pulled_blocks_are_held_and_reported_but_not_resumable() -> None:
    m = _manager()
    m.flush_events()
    m.admit(1, HASHES[:3], 3 * 256 + 10, 3 * 256 + 20)
    m.ensure(1, 3 * 256 + 10)
    m.advance(1, 3 * 256 + 10, boundary_state_written=False, settle=False, pulled=True)
    assert _bodies(m) == [KvStored(tuple(HASHES[:3]), None, held_only=True)]
    assert m.snapshot().block_hashes == () and m.snapshot().held_only == tuple(HASHES[:3])
    assert m.prefix.held(HASHES) == 3 and m.prefix.lookup(HASHES) == 0
    pages = m.block_pages(1)[:3]
    m.free(1)
    assert m.prefix.evictable_blocks == 3

    # A second sequence admitted for 4 blocks: no hit (nothing resumable), then it takes the 3
    # held pages by reference; its length stays 0.
    adm = m.admit(2, HASHES, 4 * 256 + 1, 4 * 256 + 9)
    assert (adm.hit_blocks, adm.hit_tokens) == (0, 0)
    with pytest.raises(ValueError, match="n_blocks 5"):
        m.reuse_blocks(2, 5)
    assert m.reuse_blocks(2, 4) == 3
    assert m.block_pages(2) == pages and m.length(2) == 0
    assert m.prefix.evictable_blocks == 0 and m.allocators[PoolKind.BLOCK].refs(pages[0]) == 1
    with pytest.raises(ValueError, match="call it once"):
        m.reuse_blocks(2, 4)
    m.ensure(2, 4 * 256 + 1)
    m.advance(2, 4 * 256 + 1, boundary_state_written=False, settle=False, pulled=True)
    assert _bodies(m) == [KvStored((HASHES[3],), HASHES[2], held_only=True)]
    m.free(2)
    used = m.allocators[PoolKind.BLOCK]
    assert used.num_free + m.prefix.evictable_blocks == used.num_pages
    m.prefix.evict_block()  # LRU: the tail block went first
    assert _bodies(m) == [KvRemoved((HASHES[3],))]


def test_reuse_refuses_a_sequence_that_already_wrote() -> None:
    m = _manager()
    m.admit(1, HASHES[:2], 600, 700)
    m.ensure(1, 300)
    with pytest.raises(ValueError, match="sequence 1 is no longer as admitted"):
        m.reuse_blocks(1, 2)


def test_a_pulled_block_changes_kind_with_its_boundary() -> None:
    """held only -> (boundary registered) resumable -> (boundary evicted) held only -> removed."""
    blocks, windows = PageAllocator(PoolKind.BLOCK, 4), PageAllocator(PoolKind.WINDOW, 4)
    log = EventLog("w")
    cache = PrefixCache(blocks, windows, log)
    log.flush()
    root, child = HASHES[0], HASHES[1]
    for h, parent, pulled in ((root, None, True), (child, root, False)):
        page = blocks.take()
        assert cache.register_block(h, parent, page, pulled)
        blocks.unref(page)
        cache.release_block(page)
    assert [e.body for e in log.flush().events] == [KvStored((root,), None, held_only=True)]
    for h in (root, child):
        page = windows.take()
        assert cache.register_boundary(h, page)
        windows.unref(page)
        cache.release_window(page)
    assert [e.body for e in log.flush().events] == [KvStored((root, child), None)]
    assert cache.reported() == ((root, child), ())
    cache.evict_window()  # the root's boundary (LRU): its block stays, pulled
    cache.evict_window()  # the child's: it was computed here, nothing is left to report
    assert [e.body for e in log.flush().events] == [
        KvStored((root,), None, held_only=True), KvRemoved((child,))]
    assert cache.reported() == ((), (root,))
    cache.evict_block()  # the root's page (LRU), its child with it
    assert not cache.is_registered(child)
    assert [e.body for e in log.flush().events] == [KvRemoved((root,))]
    assert cache.reported() == ((), ())


def test_random_walk_reports_exactly_the_held_pulled_or_bounded_hashes() -> None:
    rng = random.Random(7)
    for _ in range(40):
        blocks, windows = PageAllocator(PoolKind.BLOCK, 64), PageAllocator(PoolKind.WINDOW, 64)
        log = EventLog("w")
        cache = PrefixCache(blocks, windows, log)
        reg: dict[int, tuple[int | None, bool]] = {}  # hash -> (parent, pulled): the model
        bounded: set[int] = set()
        seen_res: set[int] = set()  # replayed events: resumable hashes
        seen_held: set[int] = set()  # and held-only ones
        for _step in range(60):
            op = rng.randrange(5)
            if op < 2:  # register a child of a random registered hash (or a root)
                parent = rng.choice([None, *reg])
                h = rng.getrandbits(40)
                pulled = rng.random() < 0.5
                page = blocks.take()
                assert cache.register_block(h, parent, page, pulled)
                reg[h] = (parent, pulled)
                blocks.unref(page)
                cache.release_block(page)
            elif op == 2 and reg:  # a boundary on a registered block without one
                h = rng.choice(list(reg))
                if h not in bounded:
                    page = windows.take()
                    assert cache.register_boundary(h, page)
                    bounded.add(h)
                    windows.unref(page)
                    cache.release_window(page)
            elif op == 3 and cache.evictable_windows:
                cache.evict_window()
                bounded = {h for h in bounded if h in reg and _has_boundary(cache, h)}
            elif op == 4 and cache.evictable_blocks:
                cache.evict_block()
                reg = {h: v for h, v in reg.items() if cache.is_registered(h)}
                bounded &= set(reg)
            for e in log.flush().events:
                hs = set(e.body.block_hashes) if not isinstance(e.body, KvCleared) else set()
                if isinstance(e.body, KvStored):
                    into, other = (seen_held, seen_res) if e.body.held_only else (seen_res, seen_held)
                    assert not into & hs, "stored twice as the same kind"
                    into |= hs
                    other -= hs
                elif isinstance(e.body, KvRemoved):
                    assert hs <= seen_res | seen_held, "removed what was not stored"
                    seen_res -= hs
                    seen_held -= hs
                else:
                    assert isinstance(e.body, KvCleared) and e.seq == 0
            want_res = set(bounded)
            want_held = {h for h, (_, pulled) in reg.items() if pulled and h not in bounded}
            res, held = cache.reported()
            assert (seen_res, seen_held) == (want_res, want_held) == (set(res), set(held))
            assert set(cache.hit_able()) == want_res | want_held


def _has_boundary(cache: PrefixCache, h: int) -> bool:
    try:
        cache.boundary_page(h)
    except KeyError:
        return False
    return True
