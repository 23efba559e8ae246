"""A simulated worker's KV blocks: held by live requests, or cached (LRU) until evicted.

Capacity is in 256-token blocks. `reserved` counts the blocks live requests reserved (their whole
footprint, shared prefix blocks included: conservative); cached blocks nobody holds are kept in
LRU order and evicted, oldest first, when a reservation needs room. Every block that becomes
present is announced to the router's `KvIndex` (`stored`) and every eviction too (`removed`),
exactly the events a real worker sends; blocks count as present only once computed (`complete`).

Speed: a request touches tens of blocks per step, so every per-block step runs in C loops
(map / filterfalse / compress over dicts). `present` maps a block to its holders (0 = cached);
the LRU is a plain dict in recency order (dict operations run in C, OrderedDict's update does
not) and lazy: a block held again stays in it and is skipped at eviction, and a released block
moves to its end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import compress, filterfalse, repeat, takewhile
from operator import not_, sub

from orchestrator.router.inputs import WorkerId
from orchestrator.router.kv_index import KvIndex


class PrefixCache:
    """Mutable simulation state of one worker's KV pool (one simulator owns it)."""

    __slots__ = ("capacity", "cached", "index", "lru", "present", "reserved", "worker")

    def __init__(self, worker: WorkerId, capacity_blocks: int, index: KvIndex) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"PrefixCache({worker}).capacity_blocks = {capacity_blocks}: must be >= 1")
        self.worker = worker
        self.capacity = capacity_blocks
        self.index = index
        self.present: dict[int, int] = {}  # block -> live requests holding it (0: cached only)
        self.lru: dict[int, None] = {}  # cached blocks, oldest first (lazy)
        self.cached = 0  # blocks with no holder
        self.reserved = 0

    def leading(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are present (held or cached)."""
        present = self.present
        if not hashes or hashes[0] not in present:
            return 0
        return len(list(takewhile(present.__contains__, hashes)))

    def held(self) -> int:
        """Blocks some live request holds."""
        return len(self.present) - self.cached

    def reserve(self, blocks: int) -> bool:
        """Reserve room for `blocks`, evicting cached blocks as needed; False (nothing changed)
        when even an empty cache would not make room."""
        if self.reserved + blocks > self.capacity:
            return False
        self.reserved += blocks
        self._evict(self.reserved + self.cached - self.capacity)
        return True

    def unreserve(self, blocks: int) -> None:
        if blocks > self.reserved:
            raise ValueError(f"PrefixCache({self.worker}).unreserve({blocks}): only {self.reserved} reserved")
        self.reserved -= blocks

    def _hold(self, hashes: Sequence[int]) -> None:
        """Add one holder to blocks that are all present."""
        present = self.present
        counts = list(map(present.__getitem__, hashes))
        self.cached -= counts.count(0)
        present.update(zip(hashes, [c + 1 for c in counts], strict=True))

    def acquire(self, hashes: Sequence[int]) -> None:
        """Hold blocks that are present (the caller checked with `leading`)."""
        self._hold(hashes)

    def complete(self, hashes: Sequence[int]) -> None:
        """The request computed (or received) these blocks: hold them, announcing new ones."""
        present = self.present
        fresh = list(filterfalse(present.__contains__, hashes))
        if len(fresh) < len(hashes):
            self._hold(list(filter(present.__contains__, hashes)))
        if fresh:
            present.update(zip(fresh, repeat(1)))
            self.index.stored(self.worker, fresh)

    def release(self, hashes: Sequence[int]) -> None:
        """The request no longer needs these held blocks: unheld ones become cached (newest in the
        LRU). Room for them comes out of the request's reservation, released with `unreserve`."""
        present, lru = self.present, self.lru
        counts = list(map(sub, map(present.__getitem__, hashes), repeat(1)))
        present.update(zip(hashes, counts, strict=True))
        free = list(compress(hashes, map(not_, counts)))
        if free:
            self.cached += len(free)
            deque(map(lru.pop, free, repeat(None)), maxlen=0)  # lazily kept entries move to the end
            lru.update(zip(free, repeat(None)))
            self._evict(self.reserved + self.cached - self.capacity)

    def _evict(self, n: int) -> None:
        """Evict the n oldest cached blocks (skipping LRU entries that are held again)."""
        if n <= 0:
            return
        present, lru, gone = self.present, self.lru, []
        while len(gone) < n and lru:
            h = next(iter(lru))
            del lru[h]
            if present.get(h) == 0:
                del present[h]
                gone.append(h)
        self.cached -= len(gone)
        self.index.removed(self.worker, gone)
