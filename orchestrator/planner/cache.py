"""A simulated worker's KV blocks: held by live requests, or cached (LRU) until evicted.

Capacity is in 256-token blocks. `reserved` counts the blocks live requests reserved (their whole
footprint, shared prefix blocks included: conservative); cached blocks nobody holds sit in an LRU
and are evicted, oldest first, when a reservation needs room. Every block that becomes present
is announced to the router's `KvIndex` (`stored`) and every eviction too (`removed`), exactly the
events a real worker sends; blocks count as present only once computed (`complete`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from orchestrator.router.inputs import WorkerId
from orchestrator.router.kv_index import KvIndex


class PrefixCache:
    """Mutable simulation state of one worker's KV pool (not shared across threads)."""

    __slots__ = ("capacity", "index", "lru", "refs", "reserved", "worker")

    def __init__(self, worker: WorkerId, capacity_blocks: int, index: KvIndex) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"PrefixCache({worker}).capacity_blocks = {capacity_blocks}: must be >= 1")
        self.worker = worker
        self.capacity = capacity_blocks
        self.index = index
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.refs: dict[int, int] = {}
        self.reserved = 0

    def leading(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are present (held or cached)."""
        refs, lru = self.refs, self.lru
        n = 0
        for h in hashes:
            if h in refs or h in lru:
                n += 1
            else:
                break
        return n

    def reserve(self, blocks: int) -> bool:
        """Reserve room for `blocks`, evicting cached blocks as needed; False (nothing changed)
        when even an empty cache would not make room."""
        if self.reserved + blocks > self.capacity:
            return False
        excess = self.reserved + blocks + len(self.lru) - self.capacity
        if excess > 0:
            lru = self.lru
            gone = [lru.popitem(last=False)[0] for _ in range(excess)]
            self.index.removed(self.worker, gone)
        self.reserved += blocks
        return True

    def unreserve(self, blocks: int) -> None:
        if blocks > self.reserved:
            raise ValueError(f"PrefixCache({self.worker}).unreserve({blocks}): only {self.reserved} reserved")
        self.reserved -= blocks

    def acquire(self, hashes: Sequence[int]) -> None:
        """Hold blocks that are present (the caller checked with `leading`)."""
        refs, lru = self.refs, self.lru
        for h in hashes:
            if h in refs:
                refs[h] += 1
            else:
                del lru[h]
                refs[h] = 1

    def complete(self, hashes: Sequence[int]) -> None:
        """The request computed (or received) these blocks: hold them, announcing new ones."""
        refs, lru = self.refs, self.lru
        fresh = []
        for h in hashes:
            if h in refs:
                refs[h] += 1
            elif h in lru:
                del lru[h]
                refs[h] = 1
            else:
                refs[h] = 1
                fresh.append(h)
        if fresh:
            self.index.stored(self.worker, fresh)

    def release(self, hashes: Sequence[int]) -> None:
        """The request no longer needs these held blocks: unreferenced ones become cached (LRU).
        Room for them comes out of the request's reservation, released with `unreserve`."""
        refs, lru = self.refs, self.lru
        for h in hashes:
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
                lru[h] = None
        # cached blocks beyond capacity (reservations were conservative) go at once
        excess = self.reserved + len(lru) - self.capacity
        if excess > 0:
            gone = [lru.popitem(last=False)[0] for _ in range(min(excess, len(lru)))]
            self.index.removed(self.worker, gone)
