"""Prefix cache keyed by the chained block hashes of tandem.blocks, with two kinds of pages.

- Block pages (compressed entries, indexer keys) are registered under their block's hash h_k. A
  block is registered only under a registered parent, so registered blocks form a forest closed
  under ancestors; dropping a block drops its registered descendants with it.
- Boundary pages: the window page that ends at block k's end, holding the raw KV before boundary
  k+1 and the compressor state there. Registered under h_k (only on a registered block); evicted on
  their own, because they cost several times the compressed bytes. A boundary whose window page is
  gone is no longer a hit.
A hit of k blocks needs blocks h_0..h_{k-1} registered and the boundary of h_{k-1}: `lookup` finds
the deepest such k. Unreferenced registered pages sit in per-pool LRU order (oldest first) until
evicted; pages that were never registered go straight back to the free list.
"Block held" and "boundary resumable" are separate: `held` counts the leading registered blocks
(enough to skip pulling their pages in a handoff), `lookup` only those a computation can resume
after. A block registered from a pull (`pulled=True`) has no boundary of its own on this worker.
Events (workers/kv/events.py) report the registered boundaries (resumable) and the pulled blocks
without one (held only): a hash is "stored" when it enters either kind or changes kind (a pulled
block gains a boundary, or loses it while the block stays), "removed" once it has neither.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from workers.kv.allocator import PageAllocator
from workers.kv.events import EventLog


@dataclass
class _Block:
    page: int
    parent: int | None
    children: set[int] = field(default_factory=set)
    boundary: int | None = None  # window page id
    pulled: bool = False  # registered from a handoff: reported although it has no boundary

    @property
    def reported(self) -> bool:
        return self.boundary is not None or self.pulled


class PrefixCache:
    """Registrations and LRU order of cached pages; page ownership stays with the allocators."""

    def __init__(self, blocks: PageAllocator, windows: PageAllocator, events: EventLog) -> None:
        self._alloc_b, self._alloc_w, self.events = blocks, windows, events
        self._by_hash: dict[int, _Block] = {}
        self._block_hash: dict[int, int] = {}  # block page -> hash
        self._boundary_hash: dict[int, int] = {}  # window page -> hash
        self._lru_b: OrderedDict[int, None] = OrderedDict()
        self._lru_w: OrderedDict[int, None] = OrderedDict()

    # --- queries -------------------------------------------------------------------------------
    def lookup(self, hashes: list[int]) -> int:
        """The largest k such that hashes[0..k-1] are registered blocks and hashes[k-1] has a
        boundary (0 when none)."""
        best = 0
        for i, h in enumerate(hashes):
            b = self._by_hash.get(h)
            if b is None:
                break
            if b.boundary is not None:
                best = i + 1
        return best

    def held(self, hashes: list[int]) -> int:
        """The largest k such that hashes[0..k-1] are registered blocks, boundaries or not: their
        pages can stand in for pulled ones, but no computation can resume after them unless
        `lookup` says so."""
        k = 0
        while k < len(hashes) and hashes[k] in self._by_hash:
            k += 1
        return k

    def block_page(self, h: int) -> int:
        return self._by_hash[h].page

    def boundary_page(self, h: int) -> int:
        page = self._by_hash[h].boundary
        if page is None:
            raise KeyError(f"block hash {h:#x} has no boundary window page")
        return page

    def is_registered(self, h: int) -> bool:
        return h in self._by_hash

    def registered_block(self, page: int) -> bool:
        return page in self._block_hash

    def registered_boundary(self, page: int) -> bool:
        return page in self._boundary_hash

    def hit_able(self) -> tuple[int, ...]:
        """The reported hashes (with a boundary, or pulled), in block registration order."""
        return tuple(h for h, b in self._by_hash.items() if b.reported)

    def reported(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(resumable, held only): the hashes with a boundary, and the pulled ones without one,
        each in block registration order (what a snapshot lists)."""
        resumable = tuple(h for h, b in self._by_hash.items() if b.boundary is not None)
        held_only = tuple(h for h, b in self._by_hash.items() if b.pulled and b.boundary is None)
        return resumable, held_only

    @property
    def evictable_blocks(self) -> int:
        return len(self._lru_b)

    @property
    def evictable_windows(self) -> int:
        return len(self._lru_w)

    def is_evictable_block(self, page: int) -> bool:
        return page in self._lru_b

    def is_evictable_window(self, page: int) -> bool:
        return page in self._lru_w

    # --- registration --------------------------------------------------------------------------
    def register_block(self, h: int, parent: int | None, page: int, pulled: bool = False) -> bool:
        """Register a (held, fully written) block page under h; False when h is already registered
        or its parent is not (the caller's page then stays private). `pulled`: the page came from a
        handoff; it is reported (stored) now, as it can spare a later pull."""
        if h in self._by_hash or (parent is not None and parent not in self._by_hash):
            return False
        if page in self._block_hash:
            raise ValueError(f"block page {page} is already registered under {self._block_hash[page]:#x}")
        self._by_hash[h] = _Block(page, parent, pulled=pulled)
        self._block_hash[page] = h
        if parent is not None:
            self._by_hash[parent].children.add(h)
        if pulled:
            self.events.stored(h, parent, held_only=True)
        return True

    def register_boundary(self, h: int, page: int) -> bool:
        """Register a (held, fully written) window page as the boundary after block h; False when
        h is not registered or already has one."""
        b = self._by_hash.get(h)
        if b is None or b.boundary is not None:
            return False
        if page in self._boundary_hash:
            raise ValueError(f"window page {page} is already the boundary of {self._boundary_hash[page]:#x}")
        b.boundary = page
        self._boundary_hash[page] = h
        self.events.stored(h, b.parent)  # new, or a pulled (held-only) block becoming resumable
        return True

    # --- references dropping to zero, hits taking them back -----------------------------------
    def release_block(self, page: int) -> None:
        """The last reference to a block page went: cache it if registered, else free it."""
        if page in self._block_hash:
            self._lru_b[page] = None
        else:
            self._alloc_b.give_back(page)

    def release_window(self, page: int) -> None:
        if page in self._boundary_hash:
            self._lru_w[page] = None
        else:
            self._alloc_w.give_back(page)

    def touch_block(self, page: int) -> None:
        """A hit took a reference: the page is no longer evictable."""
        self._lru_b.pop(page, None)

    def touch_window(self, page: int) -> None:
        self._lru_w.pop(page, None)

    # --- eviction ------------------------------------------------------------------------------
    def evict_block(self) -> None:
        """Evict the least recently used unreferenced block (and its registered descendants and
        their boundaries); raises LookupError when none is evictable."""
        if not self._lru_b:
            raise LookupError("no unreferenced cached block page to evict")
        page = next(iter(self._lru_b))
        self._drop_block(self._block_hash[page])

    def evict_window(self) -> None:
        """Evict the least recently used unreferenced boundary window page."""
        if not self._lru_w:
            raise LookupError("no unreferenced cached window page to evict")
        page = next(iter(self._lru_w))
        self._drop_boundary(self._boundary_hash[page])

    def clear(self) -> None:
        """Forget every registration; unreferenced cached pages go back to the free lists."""
        for h in [h for h, b in self._by_hash.items() if b.parent is None]:
            self._drop_block(h, report=False)
        self.events.cleared()

    def _drop_boundary(self, h: int, report: bool = True) -> None:
        b = self._by_hash[h]
        page = b.boundary
        if page is None:
            return
        b.boundary = None
        del self._boundary_hash[page]
        if page in self._lru_w:
            del self._lru_w[page]
            self._alloc_w.give_back(page)
        if not report:
            return
        if b.pulled:  # the block's page is still held: back to held only
            self.events.stored(h, b.parent, held_only=True)
        else:
            self.events.removed(h)

    def _drop_block(self, h: int, report: bool = True) -> None:
        stack, order = [h], []
        while stack:  # iterative: chains can be thousands of blocks deep
            x = stack.pop()
            order.append(x)
            stack.extend(self._by_hash[x].children)
        for x in reversed(order):  # leaves first
            reported = self._by_hash[x].reported
            self._drop_boundary(x, report=False)
            if report and reported:
                self.events.removed(x)
            b = self._by_hash.pop(x)
            del self._block_hash[b.page]
            if b.parent is not None and b.parent in self._by_hash:
                self._by_hash[b.parent].children.discard(x)
            if b.page in self._lru_b:
                del self._lru_b[b.page]
                self._alloc_b.give_back(b.page)
