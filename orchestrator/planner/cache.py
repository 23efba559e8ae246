"""A simulated worker's KV blocks: held by live requests, or cached (LRU) until evicted.

Capacity is in 256-token blocks. `reserved` counts the blocks live requests reserved (their whole
footprint, shared prefix blocks included: conservative); cached blocks nobody holds are kept in
LRU order and evicted, oldest first, when a reservation needs room. Every block that becomes
present is announced to the router's `KvIndex` (`stored`) and every eviction too (`removed`),
exactly the events a real worker sends; blocks count as present only once computed (`complete`).

LRU order: a block's place is its latest release; the blocks one `release` frees are ordered as
the request lists them (prompt order). A block that is held again keeps no place until it is
released again.

Speed (a request touches tens of blocks at a time; every per-block step runs in C loops, map /
compress / dict.update, and Python code runs per call or per release, never per block):
- one dict, `present`, says everything about a block: value v > 0 = held by v live requests;
  v < 0 = cached, freed by the release numbered -v;
- the LRU is a queue of releases (release number, the blocks it freed), not of blocks: an entry
  whose block was held again, released again later (its value names a newer release) or evicted
  is stale and skipped at eviction, so holding and releasing never search the queue.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from itertools import accumulate, compress, repeat, takewhile
from operator import add, eq, lt, not_, sub

from orchestrator.router.inputs import WorkerId
from orchestrator.router.kv_index import KvIndex


class PrefixCache:
    """Mutable simulation state of one worker's KV pool (one simulator owns it)."""

    __slots__ = ("capacity", "cached", "index", "present", "releases", "reserved", "seq", "worker")

    def __init__(self, worker: WorkerId, capacity_blocks: int, index: KvIndex) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"PrefixCache({worker}).capacity_blocks = {capacity_blocks}: must be >= 1")
        self.worker = worker
        self.capacity = capacity_blocks
        self.index = index
        self.present: dict[int, int] = {}  # block -> holders (> 0), or -(release number) when cached
        self.releases: deque[tuple[int, Sequence[int]]] = deque()  # the LRU: (release number, blocks)
        self.seq = 0  # releases so far
        self.cached = 0  # blocks with no holder
        self.reserved = 0

    def leading(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are present (held or cached)."""
        present = self.present
        if not hashes or hashes[0] not in present:
            return 0
        return len(list(takewhile(present.__contains__, hashes)))

    def acquire_leading(self, hashes: Sequence[int]) -> int:
        """Hold the leading present blocks of `hashes`; how many there are (`leading` + `acquire`)."""
        present = self.present
        if not hashes or hashes[0] not in present:
            return 0
        counts = list(takewhile(bool, map(present.get, hashes, repeat(0))))
        self._hold(hashes[: len(counts)], counts)
        return len(counts)

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

    def _hold(self, hashes: Sequence[int], counts: list[int]) -> None:
        """Add one holder to present blocks whose current values are `counts`."""
        cached = sum(map(lt, counts, repeat(0)))
        if cached:
            self.cached -= cached
            counts = [c if c > 0 else 0 for c in counts]
        self.present.update(zip(hashes, map(add, counts, repeat(1)), strict=True))

    def acquire(self, hashes: Sequence[int]) -> None:
        """Hold blocks that are present (the caller checked with `leading`)."""
        self._hold(hashes, list(map(self.present.__getitem__, hashes)))

    def complete(self, hashes: Sequence[int]) -> None:
        """The request computed (or received) these blocks: hold them, announcing new ones."""
        present = self.present
        counts = list(map(present.get, hashes, repeat(0)))
        if counts.count(0) == len(counts):  # the usual case: every block is new here
            present.update(zip(hashes, repeat(1)))
            self.index.stored(self.worker, hashes)
            return
        known = list(map(bool, counts))
        self._hold(list(compress(hashes, known)), list(filter(None, counts)))
        fresh = list(compress(hashes, map(not_, counts)))
        if fresh:
            present.update(zip(fresh, repeat(1)))
            self.index.stored(self.worker, fresh)

    def release(self, hashes: Sequence[int]) -> None:
        """The request no longer needs these held blocks: unheld ones become cached (newest in the
        LRU). Room for them comes out of the request's reservation, released with `unreserve`."""
        present = self.present
        counts = list(map(present.__getitem__, hashes))
        if counts.count(1) == 0:  # every block is still held by another request
            present.update(zip(hashes, map(sub, counts, repeat(1)), strict=True))
            return
        self.seq += 1
        freed = {1: -self.seq}  # a last holder leaves: the block is cached, stamped with this release
        present.update(zip(hashes, map(freed.get, counts, map(sub, counts, repeat(1))), strict=True))
        free = list(compress(hashes, map(eq, counts, repeat(1))))
        self.cached += len(free)
        self.releases.append((self.seq, free))
        self._evict(self.reserved + self.cached - self.capacity)

    def _evict(self, n: int) -> None:
        """Evict the n oldest cached blocks (skipping stale LRU entries)."""
        if n <= 0:
            return
        present, releases, gone = self.present, self.releases, []
        while len(gone) < n and releases:
            seq, blocks = releases[0]
            live = list(map(eq, map(present.get, blocks), repeat(-seq)))
            need = n - len(gone)
            if sum(live) <= need:
                releases.popleft()
                gone += compress(blocks, live)
            else:  # the oldest `need` live blocks go; the rest keep their place at the front
                cut = bisect_left(list(accumulate(live)), need) + 1
                gone += compress(blocks[:cut], live)
                releases[0] = (seq, blocks[cut:])
        deque(map(present.__delitem__, gone), maxlen=0)
        self.cached -= len(gone)
        self.index.removed(self.worker, gone)

