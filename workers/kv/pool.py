"""A page pool: one contiguous uint8 buffer of [num_pages, page_bytes] and typed views of it.

One buffer per pool so a transfer engine registers one region; page p starts at byte
p * page_bytes, so consecutive page ids are one contiguous range. The buffer may live on the meta
device (sizes without memory, for footprint accounting).
"""

from __future__ import annotations

import torch

from workers.kv.geometry import PageLayout, Part


class PagePool:
    """The bytes of one pool. Ownership of pages is the allocator's business, not this class's."""

    def __init__(self, layout: PageLayout, num_pages: int, device: torch.device | str = "cpu") -> None:
        if num_pages <= 0:
            raise ValueError(f"PagePool({layout.pool.value}).num_pages must be positive, got {num_pages}")
        self.layout = layout
        self.num_pages = num_pages
        self.buffer = torch.zeros(num_pages, layout.nbytes, dtype=torch.uint8, device=device)

    @property
    def page_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.layout.nbytes

    def view(self, layer: int, part: Part) -> torch.Tensor:
        """uint8 [num_pages, items, item_bytes]: the (layer, part) segment of every page (a strided
        view; writes land in the pool)."""
        s = self.layout.segment(layer, part)
        return self.buffer[:, s.offset : s.offset + s.nbytes].view(self.num_pages, s.items, s.item_bytes)

    def byte_ranges(self, pages: list[int]) -> list[tuple[int, int]]:
        """(byte offset, length) runs covering `pages` in order, consecutive ids merged: the
        descriptors a transfer of these pages needs."""
        runs: list[tuple[int, int]] = []
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise IndexError(f"page {p} outside {self.layout.pool.value} pool of {self.num_pages}")
            off = p * self.page_bytes
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1] = (runs[-1][0], runs[-1][1] + self.page_bytes)
            else:
                runs.append((off, self.page_bytes))
        return runs
