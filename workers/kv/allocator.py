"""Reference counts and a free list for the pages of one pool.

A page is in exactly one of three states: FREE (on the free list), HELD (refcount > 0), or CACHED
(refcount 0 but kept by the prefix cache, which gives it back when it evicts it). This class knows
FREE and HELD; whoever drops the last reference decides between caching and `give_back`.
"""

from __future__ import annotations

from collections import deque

from workers.kv.geometry import PoolKind


class OutOfPages(RuntimeError):
    """A pool has no free page and nothing evictable: admission should have refused earlier."""


class PageAllocator:
    """Pages 0..num_pages-1 of one pool; `take` hands out the lowest-numbered never-used page first,
    then pages in the order they were given back (FIFO), so ids are predictable in tests."""

    def __init__(self, pool: PoolKind, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"PageAllocator({pool.value}).num_pages must be positive, got {num_pages}")
        self.pool = pool
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._is_free = bytearray(b"\x01" * num_pages)
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def is_free(self, page: int) -> bool:
        return bool(self._is_free[page])

    def take(self) -> int:
        """A free page with refcount 1."""
        if not self._free:
            raise OutOfPages(f"{self.pool.value} pool: all {self.num_pages} pages are in use")
        page = self._free.popleft()
        self._is_free[page] = 0
        self._refs[page] = 1
        return page

    def ref(self, page: int) -> None:
        """One more holder of a HELD or CACHED page."""
        if self._is_free[page]:
            raise ValueError(f"{self.pool.value} page {page} is free: take it, do not ref it")
        self._refs[page] += 1

    def unref(self, page: int) -> int:
        """One holder fewer; returns the refcount left (0: the caller caches it or gives it back)."""
        if self._is_free[page] or self._refs[page] <= 0:
            raise ValueError(f"{self.pool.value} page {page} has no reference to drop")
        self._refs[page] -= 1
        return self._refs[page]

    def give_back(self, page: int) -> None:
        """Return an unreferenced page to the free list."""
        if self._is_free[page] or self._refs[page]:
            raise ValueError(
                f"{self.pool.value} page {page} cannot be freed: free={bool(self._is_free[page])}, "
                f"refs={self._refs[page]}"
            )
        self._is_free[page] = 1
        self._free.append(page)
