"""The simulator's KV cache (`PrefixCache`) against a plain per-block reference model.

The reference keeps one holder count per block and an OrderedDict LRU of cached blocks, moving a
block to the LRU's end when its last holder releases it, and evicting from the front: the
semantics the cache documents. Random request lifecycles (shared prefixes, partial prefix hits,
re-holding cached blocks, evictions under pressure) must leave both in the same state after every
operation, and the router's `KvIndex` must hold exactly the cache's blocks.

Some requests receive their blocks in a KV handoff (as on a decode): the reference marks the blocks
new to it held-only (`pulled`), a computed request's blocks resumable, a computation resumes after
the deepest computed block of the leading present run (passing over pulled ones) and a handoff
skips leading blocks of either kind; the index's two views must equal the reference's two kinds.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from orchestrator.planner.cache import PrefixCache
from orchestrator.router.inputs import WorkerId
from orchestrator.router.kv_index import KvIndex

pytestmark = pytest.mark.planner


class _Reference:
    """Per-block model: holders per present block; cached blocks in LRU order (oldest first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.holders: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.reserved = 0
        self.pulled: set[int] = set()  # present blocks received, not computed: held-only
        self.stored: list[int] = []
        self.removed: list[int] = []

    def reserve(self, blocks: int) -> bool:
        if self.reserved + blocks > self.capacity:
            return False
        self.reserved += blocks
        self._evict()
        return True

    def acquire_leading(self, hashes: list[int], resumable: bool = True) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.holders:
            n += 1
        while resumable and n and hashes[n - 1] in self.pulled:  # resume after a computed block only
            n -= 1
        for h in hashes[:n]:
            self._hold(h)
        return n

    def _hold(self, h: int) -> None:
        if self.holders[h] == 0:
            del self.lru[h]
        self.holders[h] += 1

    def complete(self, hashes: list[int], held_only: bool = False) -> None:
        for h in hashes:
            if h in self.holders:
                self._hold(h)
                if not held_only:
                    self.pulled.discard(h)  # computed here: resumable now
            else:
                self.holders[h] = 1
                self.stored.append(h)
                if held_only:
                    self.pulled.add(h)

    def release(self, hashes: list[int]) -> None:
        for h in hashes:
            self.holders[h] -= 1
            if self.holders[h] == 0:
                self.lru[h] = None
        self._evict()

    def _evict(self) -> None:
        while self.reserved + len(self.lru) > self.capacity and self.lru:
            h, _ = self.lru.popitem(last=False)
            del self.holders[h]
            self.pulled.discard(h)
            self.removed.append(h)


def _chain(prefix: list[int], n: int, rng: random.Random) -> list[int]:
    return prefix + [rng.getrandbits(62) for _ in range(n)]


@pytest.mark.parametrize("capacity", [40, 150, 100_000])  # exact early, exact late, lazy throughout
@pytest.mark.parametrize("seed", range(3))
def test_cache_equals_the_per_block_reference(seed: int, capacity: int) -> None:
    rng = random.Random(seed)
    index = KvIndex()
    worker = WorkerId("w")
    cache, ref = PrefixCache(worker, capacity, index), _Reference(capacity)
    prefixes = [_chain([], rng.randint(1, 12), rng) for _ in range(4)]
    history: list[list[int]] = []
    # (hashes, blocks held by acquire, reservation, received in a handoff)
    live: list[tuple[list[int], int, int, bool]] = []
    for _ in range(400):
        if live and (rng.random() < 0.45 or len(live) > 6):
            hashes, n, need, pulled = live.pop(rng.randrange(len(live)))
            if n < len(hashes):
                cache.complete(hashes, n, held_only=pulled)
                ref.complete(hashes[n:], held_only=pulled)
            cache.unreserve(need)
            ref.reserved -= need
            cache.release(hashes)
            ref.release(hashes)
        else:
            pick = rng.random()
            if pick < 0.3 and history:  # a repeat, or a longer version, of an earlier prompt
                hashes = _chain(rng.choice(history), rng.randint(0, 3), rng)
            elif pick < 0.8:
                hashes = _chain(rng.choice(prefixes)[: rng.randint(1, 12)], rng.randint(0, 8), rng)
            else:
                hashes = _chain([], rng.randint(1, 10), rng)
            need = len(hashes) + rng.randint(0, 3)
            ok = cache.reserve(need)
            assert ok == ref.reserve(need)
            if not ok:
                continue
            pulled = rng.random() < 0.4
            n = cache.acquire_kept(hashes) if pulled else cache.acquire_leading(hashes)
            assert n == ref.acquire_leading(hashes, resumable=not pulled)
            live.append((hashes, n, need, pulled))
            history.append(hashes)
        # the same blocks, holders, cached count and the same LRU order
        assert cache.holders() == ref.holders
        assert cache.cached == len(ref.lru) and cache.held() == len(ref.holders) - len(ref.lru)
        assert cache.reserved == ref.reserved and cache.reserved + cache.cached <= capacity
        assert cache.pulled == ref.pulled
        assert index.holdings(worker) == frozenset(ref.holders) - ref.pulled
        assert index.held_only(worker) == frozenset(ref.pulled)
    assert ref.pulled and len(ref.pulled) < len(ref.holders)  # both kinds were exercised
    # drain: every block ends cached, and eviction order must match the reference's LRU exactly
    for hashes, n, need, pulled in live:
        cache.complete(hashes, n, held_only=pulled)
        ref.complete(hashes[n:], held_only=pulled)
        cache.unreserve(need)
        ref.reserved -= need
        cache.release(hashes)
        ref.release(hashes)
    # then squeeze: fill the free room at once, then one more reserved block at a time evicts in
    # LRU order (a lazy cache turns exact at the first of these), or the states part
    assert cache.exact == (capacity < 100_000)  # lazy until an eviction becomes possible
    room = capacity - cache.reserved - len(ref.holders)
    assert cache.reserve(room) and ref.reserve(room)
    assert cache.holders() == ref.holders
    while cache.cached:
        ok = cache.reserve(1)
        assert ok == ref.reserve(1)
        if not ok:
            break
        assert cache.holders() == ref.holders and cache.pulled == ref.pulled
        assert index.holdings(worker) == frozenset(ref.holders) - ref.pulled
        assert index.held_only(worker) == frozenset(ref.pulled)
    assert cache.cached == len(ref.lru)
    assert sorted(index.holdings(worker) | index.held_only(worker)) == sorted(ref.holders)
    assert cache.exact


def test_acquire_leading_stops_at_the_first_missing_block() -> None:
    index = KvIndex()
    cache = PrefixCache(WorkerId("w"), 100, index)
    assert cache.reserve(10)
    cache.complete([1, 2, 3])
    cache.unreserve(10)
    cache.release([1, 2, 3])
    assert cache.cached == 3 and cache.held() == 0
    assert cache.reserve(10)
    assert cache.acquire_leading([1, 2, 9, 3]) == 2
    assert cache.cached == 1 and cache.held() == 2
    assert cache.acquire_leading([7, 1]) == 0


def test_a_computation_resumes_after_computed_blocks_that_follow_pulled_ones() -> None:
    """A decode pulled a prompt (held-only) and computed the next blocks itself (the answer): a
    follow-up resumes after them; the index's `match` agrees; a pulled tail is passed back over."""
    index = KvIndex()
    w = WorkerId("d")
    cache = PrefixCache(w, 100, index)
    chain = [11, 12, 13, 14, 15, 16]
    assert cache.reserve(10)
    cache.complete(chain[:3], held_only=True)  # the pulled prompt
    cache.complete(chain[:5], start=3)  # the answer's blocks, computed here
    cache.unreserve(10)
    cache.release(chain[:5])
    assert cache.reserve(10)
    assert cache.acquire_leading(chain) == 5 and index.match(chain) == {w: 5}
    assert cache.acquire_kept(chain) == 5 and index.match_held(chain) == {w: 5}
    assert cache.acquire_leading(chain[:3]) == 0 and index.match(chain[:3]) == {}  # pulled only


def test_eviction_takes_the_oldest_release_first_and_tells_the_index() -> None:
    index = KvIndex()
    w = WorkerId("w")
    cache = PrefixCache(w, 6, index)
    for blocks in ([1, 2], [3, 4], [5, 6]):  # three requests, released in this order
        assert cache.reserve(2)
        cache.complete(blocks)
        cache.unreserve(2)
        cache.release(blocks)
    assert cache.reserve(2)  # re-hold [3, 4]: its entry in the LRU is stale from now on
    assert cache.acquire_leading([3, 4]) == 2
    cache.unreserve(2)
    cache.release([3, 4])  # now the newest
    assert cache.reserve(3)  # room for 3: evicts 1, 2 (oldest release), then 5
    assert set(cache.present) == {3, 4, 6}
    assert index.holdings(w) == frozenset({3, 4, 6})
    assert cache.reserve(3)  # evicts 6, then 3, 4 in prompt order
    assert cache.present == {} and index.holdings(w) == frozenset()
