"""A simulated worker's KV blocks: held by live requests, or cached (LRU) until evicted.

Capacity is in 256-token blocks. `reserved` counts the blocks live requests reserved (their whole
footprint, shared prefix blocks included: conservative); cached blocks nobody holds are kept in
LRU order and evicted, oldest first, when a reservation needs room. Every block that becomes
present is announced to the router's `KvIndex` (`stored`) and every eviction too (`removed`),
exactly the events a real worker sends; blocks count as present only once computed (`complete`).

A request's life on a cache: `acquire_leading(hashes)` holds the leading present blocks up to the
deepest resumable one (what a computation starts after) or `acquire_kept(hashes)` the leading
blocks of either kind (what a KV handoff need not move), `complete(hashes, start)` holds the rest
once computed or received, `release(hashes)` lets go of them all.

Two kinds of present block, as on a real decode (workers/kv/prefix_cache.py): resumable blocks were
computed here; held-only blocks (`pulled`) came in a KV handoff (`complete(..., held_only=True)`)
and have no boundary here, so no computation resumes right after them (it may pass over them to a
later block computed here, as the worker's `lookup` does). They are announced to the index
as held-only (`stored(..., held_only=True)`), and become resumable (announced again, resumable) only
when this worker computes them itself (`complete` without held_only). Prefill caches never hold
held-only blocks, so their path does no extra work.

LRU order: a block's place is its latest release; the blocks one `release` frees are
ordered as the request lists them (prompt order).

Two modes, one behaviour (tests/planner/test_planner_cache.py checks both against a per-block
reference):
- lazy, from the start: while reserved + present blocks fit the capacity, no eviction can happen
  (cached <= present), so holder counts and the LRU are not needed yet. Holds and releases are
  only logged (one entry per call, not per block); per block, only presence is kept;
- exact, for good, from the first call that could evict: the counts and the LRU are rebuilt from
  the logs (the release that last touched a cached block is the one that freed it), and then kept
  up to date. `present[b]` is then the number of holders (> 0), or -(release number) for a cached
  block; the LRU is a queue of releases (release number, the blocks it freed), where an entry
  whose block was held again, re-released later or evicted is stale and skipped at eviction.
Every per-block step runs in C loops (map / compress / dict.update); Python code runs per call.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Sequence
from itertools import accumulate, chain, compress, islice, repeat, takewhile
from operator import add, eq, is_not, lt, not_, sub

from orchestrator.router.inputs import WorkerId
from orchestrator.router.kv_index import KvIndex


class PrefixCache:
    """Mutable simulation state of one worker's KV pool (one simulator owns it)."""

    __slots__ = ("_cached", "capacity", "exact", "holds", "index", "present", "pulled", "released",
                 "releases", "reserved", "seq", "worker")

    def __init__(self, worker: WorkerId, capacity_blocks: int, index: KvIndex) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"PrefixCache({worker}).capacity_blocks = {capacity_blocks}: must be >= 1")
        self.worker = worker
        self.capacity = capacity_blocks
        self.index = index
        self.present: dict[int, int] = {}  # exact: holders (> 0) or -(release number); lazy: 0
        self.exact = False
        self.holds: list[tuple[Sequence[int], int, int]] = []  # lazy: (hashes, start, end) held
        self.released: list[Sequence[int]] = []  # lazy: every release's hashes, in order
        self.releases: deque[tuple[int, Sequence[int]]] = deque()  # exact: the LRU
        self.seq = 0  # releases so far (exact mode numbers them on)
        self._cached = 0  # exact: blocks with no holder
        self.pulled: set[int] = set()  # the present blocks that are held-only (received, not computed)
        self.reserved = 0

    # ---- queries ---------------------------------------------------------------------------------
    def holders(self) -> dict[int, int]:
        """Every present block -> how many live requests hold it (0: cached)."""
        if self.exact:
            return {h: max(v, 0) for h, v in self.present.items()}
        counts = self._lazy_counts()
        return {h: counts.get(h, 0) for h in self.present}

    def held(self) -> int:
        """Blocks some live request holds."""
        return len(self.present) - self.cached

    @property
    def cached(self) -> int:
        """Blocks present that no live request holds."""
        if self.exact:
            return self._cached
        counts = self._lazy_counts()
        return len(self.present) - sum(1 for h in self.present if counts.get(h, 0) > 0)

    # ---- a request's life ------------------------------------------------------------------------
    def reserve(self, blocks: int) -> bool:
        """Reserve room for `blocks`, evicting cached blocks as needed; False (nothing changed)
        when even an empty cache would not make room."""
        if self.reserved + blocks > self.capacity:
            return False
        self.reserved += blocks
        self._room()
        return True

    def unreserve(self, blocks: int) -> None:
        if blocks > self.reserved:
            raise ValueError(f"PrefixCache({self.worker}).unreserve({blocks}): only {self.reserved} reserved")
        self.reserved -= blocks

    def acquire_leading(self, hashes: Sequence[int]) -> int:
        """Hold the leading present blocks of `hashes` up to the deepest one computed here (not
        held-only: a computation can start after it); how many there are."""
        return self._acquire(hashes, True)

    def acquire_kept(self, hashes: Sequence[int]) -> int:
        """Hold the leading present blocks of `hashes` of either kind (resumable or held-only: a
        KV handoff need not move them); how many there are."""
        return self._acquire(hashes, False)

    def _acquire(self, hashes: Sequence[int], resumable: bool) -> int:
        present, pulled = self.present, self.pulled
        if not hashes or hashes[0] not in present:
            return 0
        if not self.exact:
            n = len(list(takewhile(present.__contains__, hashes)))
            if resumable and pulled:
                n = _resume_point(hashes, n, pulled)
            if n:
                self.holds.append((hashes, 0, n))
            return n
        counts = list(takewhile(bool, map(present.get, hashes, repeat(0))))
        if resumable and pulled:
            del counts[_resume_point(hashes, len(counts), pulled):]
        self._hold(hashes[: len(counts)], counts)
        return len(counts)

    def complete(self, hashes: Sequence[int], start: int = 0, held_only: bool = False) -> None:
        """The request computed (or, held_only, received in a KV handoff) hashes[start:]: hold
        them, announcing new ones (as held-only when received). Computed blocks that were held-only
        become resumable and are announced again."""
        present, pulled = self.present, self.pulled
        part = hashes[start:] if start else hashes
        if not part:
            return
        counts = list(map(present.get, part))  # None: absent
        if counts.count(None) == len(counts):  # the usual case: every block is new here
            present.update(zip(part, repeat(1)))
            self._announce(part, held_only)
            if not self.exact:
                self.holds.append((hashes, start, len(hashes)))
            return
        known = list(map(is_not, counts, repeat(None)))
        if self.exact:
            self._hold(list(compress(part, known)), list(compress(counts, known)))
        else:
            self.holds.append((hashes, start, len(hashes)))
        fresh = list(compress(part, map(not_, known)))
        if fresh:
            present.update(zip(fresh, repeat(1)))
            self._announce(fresh, held_only)
        if pulled and not held_only:  # computed here now: the boundary exists, resumable from now on
            promoted = list(filter(pulled.__contains__, compress(part, known)))
            if promoted:
                pulled.difference_update(promoted)
                self.index.stored(self.worker, promoted)

    def _announce(self, fresh: Sequence[int], held_only: bool) -> None:
        """Blocks new to this cache: tell the index, as held-only when they were received."""
        if held_only:
            self.pulled.update(fresh)
            self.index.stored(self.worker, fresh, held_only=True)
        else:
            self.index.stored(self.worker, fresh)

    def release(self, hashes: Sequence[int]) -> None:
        """The request no longer needs these held blocks: unheld ones become cached (newest in the
        LRU). Room for them comes out of the request's reservation, released with `unreserve`."""
        if not self.exact:
            self.released.append(hashes)
            self._room()
            return
        present = self.present
        counts = list(map(present.__getitem__, hashes))
        if counts.count(1) == 0:  # every block is still held by another request
            present.update(zip(hashes, map(sub, counts, repeat(1)), strict=True))
            return
        self.seq += 1
        freed = {1: -self.seq}  # a last holder leaves: the block is cached, stamped with this release
        present.update(zip(hashes, map(freed.get, counts, map(sub, counts, repeat(1))), strict=True))
        free = list(compress(hashes, map(eq, counts, repeat(1))))
        self._cached += len(free)
        self.releases.append((self.seq, free))
        self._evict(self.reserved + self._cached - self.capacity)

    # ---- internals -------------------------------------------------------------------------------
    def _room(self) -> None:
        """Evict what the reservations need; in lazy mode only once eviction becomes possible."""
        if not self.exact:
            if self.reserved + len(self.present) <= self.capacity:
                return  # cached <= present: nothing to evict
            self._go_exact()
        self._evict(self.reserved + self._cached - self.capacity)

    def _hold(self, hashes: Sequence[int], counts: list[int]) -> None:
        """Exact mode: add one holder to present blocks whose current values are `counts`."""
        cached = sum(map(lt, counts, repeat(0)))
        if cached:
            self._cached -= cached
            counts = [c if c > 0 else 0 for c in counts]
        self.present.update(zip(hashes, map(add, counts, repeat(1)), strict=True))

    def _lazy_counts(self) -> Counter[int]:
        """Lazy mode: holders per block, from the logs (held minus released, per block)."""
        counts: Counter[int] = Counter(chain.from_iterable(islice(h, s, e) for h, s, e in self.holds))
        counts.subtract(Counter(chain.from_iterable(self.released)))
        return counts

    def _go_exact(self) -> None:
        """Switch to exact mode: holder counts, cached blocks and their LRU order from the logs."""
        counts = self._lazy_counts()
        last: dict[int, int] = {}  # block -> the release that touched it last (freed it, if cached)
        for seq, hashes in enumerate(self.released, start=1):
            last.update(zip(hashes, repeat(seq)))
        present = self.present
        present.update(zip(list(present), list(map(counts.__getitem__, present)), strict=True))
        cached = [h for h, c in present.items() if c == 0]
        for h in cached:
            present[h] = -last[h]
        for seq, hashes in enumerate(self.released, start=1):
            free = list(compress(hashes, map(eq, map(present.__getitem__, hashes), repeat(-seq))))
            if free:
                self.releases.append((seq, free))
        self.seq, self._cached, self.exact = len(self.released), len(cached), True
        self.holds, self.released = [], []

    def _evict(self, n: int) -> None:
        """Exact mode: evict the n oldest cached blocks (skipping stale LRU entries)."""
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
        if self.pulled:
            self.pulled.difference_update(gone)
        self._cached -= len(gone)
        self.index.removed(self.worker, gone)


def _resume_point(hashes: Sequence[int], n: int, pulled: set[int]) -> int:
    """The deepest k <= n whose block k-1 was computed here (not pulled): with hashes[:n] present, a
    computation resumes after it, passing over pulled blocks before it (the worker's `lookup`)."""
    while n and hashes[n - 1] in pulled:
        n -= 1
    return n
