"""Which pages of a KvCacheManager hold a sequence's KV, in the handoff's form.

Both sides call `sequence_pages` for the same length L: the prefill on the sequence it prefilled
(to open the handoff), the decode on the sequence it admitted and `ensure`d to L (its pull's
destination). Pages the decode's prefix cache already holds are named so the pull skips them:
leading block pages that are registered blocks, and window pages that are registered boundary
pages (shared with other sequences: writing them would race with their readers).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.kv.manager import KvCacheManager
from workers.transfer.handoff import HandoffPages


@dataclass(frozen=True)
class SequencePages:
    pages: HandoffPages
    window_start: int  # first token position of pages.window[0]
    cached_blocks: int  # leading block pages registered in this manager's prefix cache
    cached_windows: tuple[int, ...]  # positions in pages.window that are registered boundary pages


def sequence_pages(manager: KvCacheManager, seq: int, length: int) -> SequencePages:
    """Block pages of blocks 0..ceil(L/block)-1, the window pages covering [max(L - W, 0), L) in
    position order, the state page (L = `length`). Raises naming the sequence if a page is missing."""
    if length <= 0:
        raise ValueError(f"sequence_pages: sequence {seq} length must be positive, got {length}")
    blocks = manager.block_pages(seq)
    n_blocks = -(-length // manager.block_size)
    if len(blocks) < n_blocks:
        raise ValueError(f"sequence {seq}: {len(blocks)} block pages, {n_blocks} needed for {length} tokens")
    w = manager.window_tokens
    held = manager.window_pages(seq)
    first, last = max(length - w, 0) // w, (length - 1) // w
    missing = [i for i in range(first, last + 1) if i not in held]
    if missing:
        raise ValueError(f"sequence {seq}: window pages {missing} not allocated for {length} tokens")
    windows = tuple(held[i] for i in range(first, last + 1))
    prefix = manager.prefix
    cached = 0
    while cached < n_blocks and prefix.registered_block(blocks[cached]):
        cached += 1
    return SequencePages(
        HandoffPages(tuple(blocks[:n_blocks]), windows, (manager.state_page(seq),)),
        window_start=first * w,
        cached_blocks=cached,
        cached_windows=tuple(i for i, p in enumerate(windows) if prefix.registered_boundary(p)),
    )
