"""KvCacheManager: the pools, their allocators, admission, per-sequence page tables, prefix hits.

Per sequence it holds: one BLOCK page per (possibly partial) 256-token block, the WINDOW pages
that cover the last `window` tokens (page i covers positions [i*W, (i+1)*W)), and one STATE page.

Admission reserves a sequence's worst case up front -- ceil(max_len / block) block pages,
WINDOW_PAGES_PER_SEQ window pages, one state page -- and refuses (AdmissionRefused, naming the
pool) unless free + evictable pages cover every admitted sequence's reservation. So a sequence
admitted to max_len never runs out of pages later.

Prefix caching: `admit` takes the sequence's tandem.blocks hashes; a hit of k blocks references
the cached block pages and the boundary window page (a step must still compute at least one
token, so k <= (prompt_len - 1) // block). `advance` registers blocks as they fill and a boundary
when a step ends exactly on a block end with its compressor state written. A sequence whose
pages are filled from elsewhere (a KV handoff) first takes the registered blocks its prompt
starts with (`reuse_blocks`: held, not resumable), then registers the pulled ones
(`advance(..., pulled=True)`), so a later handoff sharing the prefix pulls only what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.kv.allocator import OutOfPages, PageAllocator
from workers.kv.events import EventLog, KvEventBatch, KvSnapshot
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.pool import PagePool
from workers.kv.prefix_cache import PrefixCache

# Between steps a sequence holds the <= 2 window pages of its last W tokens; during a step it also
# writes the <= 2 pages of the new last W tokens before the old ones are dropped.
WINDOW_PAGES_PER_SEQ = 4


class AdmissionRefused(RuntimeError):
    """The sequence cannot be held to its max length; nothing was allocated."""


@dataclass(frozen=True)
class KvCapacity:
    """Pages per pool."""

    block_pages: int
    window_pages: int
    state_pages: int

    def of(self, pool: PoolKind) -> int:
        return {
            PoolKind.BLOCK: self.block_pages,
            PoolKind.WINDOW: self.window_pages,
            PoolKind.STATE: self.state_pages,
        }[pool]


@dataclass(frozen=True)
class Admission:
    seq: int
    hit_blocks: int
    hit_tokens: int


@dataclass
class _Seq:
    max_len: int
    hashes: list[int]
    length: int = 0
    blocks: list[int] = field(default_factory=list)
    windows: dict[int, int] = field(default_factory=dict)
    state: int = -1
    registered: int = 0  # blocks 0..registered-1 went through registration


class KvCacheManager:
    """One worker's (one dp rank's) paged KV pools. Not thread-safe: the worker's loop owns it."""

    def __init__(
        self, geometry: KvGeometry, capacity: KvCapacity, worker: str, device: torch.device | str = "cpu"
    ) -> None:
        self.geometry = geometry
        self.block_size = geometry.shape.block_size
        self.window_tokens = geometry.window.tokens
        self.pools = {k: PagePool(geometry.page(k), capacity.of(k), device) for k in PoolKind}
        self.allocators = {k: PageAllocator(k, capacity.of(k)) for k in PoolKind}
        self.events = EventLog(worker)
        self.prefix = PrefixCache(
            self.allocators[PoolKind.BLOCK], self.allocators[PoolKind.WINDOW], self.events
        )
        self._seqs: dict[int, _Seq] = {}

    # --- admission -----------------------------------------------------------------------------
    def _budget(self, pool: PoolKind, max_len: int) -> int:
        if pool is PoolKind.BLOCK:
            return -(-max_len // self.block_size)
        return WINDOW_PAGES_PER_SEQ if pool is PoolKind.WINDOW else 1

    def _held(self, s: _Seq, pool: PoolKind) -> int:
        if pool is PoolKind.BLOCK:
            return len(s.blocks)
        return len(s.windows) if pool is PoolKind.WINDOW else int(s.state >= 0)

    def _evictable(self, pool: PoolKind) -> int:
        if pool is PoolKind.BLOCK:
            return self.prefix.evictable_blocks
        return self.prefix.evictable_windows if pool is PoolKind.WINDOW else 0

    def available(self, pool: PoolKind) -> int:
        """Free plus evictable pages not promised to admitted sequences."""
        reserved = sum(self._budget(pool, s.max_len) - self._held(s, pool) for s in self._seqs.values())
        return self.allocators[pool].num_free + self._evictable(pool) - reserved

    def _plan(self, hashes: list[int], prompt_len: int, max_len: int) -> tuple[int, dict[PoolKind, int]]:
        if not 0 <= prompt_len <= max_len or max_len <= 0:
            raise ValueError(
                f"admit: need 0 <= prompt_len ({prompt_len}) <= max_len ({max_len}), max_len > 0"
            )
        # At least one prompt token must be computed (its logits sample the next token).
        k = self.prefix.lookup(hashes[: max(prompt_len - 1, 0) // self.block_size])
        pages = {p: self._budget(p, max_len) for p in PoolKind}
        if k:
            # Hit pages already held by others cost nothing; evictable ones stop being evictable.
            pages[PoolKind.BLOCK] -= sum(
                not self.prefix.is_evictable_block(self.prefix.block_page(h)) for h in hashes[:k]
            )
            pages[PoolKind.WINDOW] -= 1 - self.prefix.is_evictable_window(
                self.prefix.boundary_page(hashes[k - 1])
            )
        return k, pages

    def can_admit(self, hashes: list[int], prompt_len: int, max_len: int) -> bool:
        _, need = self._plan(hashes, prompt_len, max_len)
        return all(need[p] <= self.available(p) for p in PoolKind)

    def admit(self, seq: int, hashes: list[int], prompt_len: int, max_len: int) -> Admission:
        """Admit `seq` (its prompt's block hashes, prompt and max length), taking any prefix hit."""
        if seq in self._seqs:
            raise ValueError(f"admit: sequence {seq} is already admitted")
        k, need = self._plan(hashes, prompt_len, max_len)
        for p in PoolKind:
            if need[p] > self.available(p):
                raise AdmissionRefused(
                    f"sequence {seq} (max_len {max_len}): {p.value} pool needs {need[p]} "
                    f"pages, {self.available(p)} available"
                )
        s = _Seq(max_len, list(hashes))
        self._seqs[seq] = s
        self._share_blocks(s, hashes[:k])
        if k:
            page = self.prefix.boundary_page(hashes[k - 1])
            self.allocators[PoolKind.WINDOW].ref(page)
            self.prefix.touch_window(page)
            s.windows[(k * self.block_size) // self.window_tokens - 1] = page
        s.state = self._take(PoolKind.STATE)
        s.length, s.registered = k * self.block_size, k
        return Admission(seq, k, k * self.block_size)

    def extend(self, seq: int, max_len: int) -> None:
        """Raise an admitted sequence's max length (a scheduler that grows sequences step by step);
        AdmissionRefused, changing nothing, when the extra block pages are not available."""
        s = self._get(seq)
        if max_len <= s.max_len:
            return
        need = self._budget(PoolKind.BLOCK, max_len) - self._budget(PoolKind.BLOCK, s.max_len)
        if need > self.available(PoolKind.BLOCK):
            raise AdmissionRefused(
                f"sequence {seq}: growing to {max_len} tokens needs {need} more block pages, "
                f"{self.available(PoolKind.BLOCK)} available"
            )
        s.max_len = max_len

    def max_len(self, seq: int) -> int:
        return self._get(seq).max_len

    # --- pages of a sequence -------------------------------------------------------------------
    def _take(self, pool: PoolKind) -> int:
        alloc = self.allocators[pool]
        while alloc.num_free == 0:
            if pool is PoolKind.BLOCK and self.prefix.evictable_blocks:
                self.prefix.evict_block()
            elif pool is PoolKind.WINDOW and self.prefix.evictable_windows:
                self.prefix.evict_window()
            else:
                raise OutOfPages(f"{pool.value} pool: no free or evictable page")
        return alloc.take()

    def _get(self, seq: int) -> _Seq:
        s = self._seqs.get(seq)
        if s is None:
            raise KeyError(f"sequence {seq} is not admitted")
        return s

    def length(self, seq: int) -> int:
        s = self._seqs.get(seq)
        return 0 if s is None else s.length

    def is_admitted(self, seq: int) -> bool:
        return seq in self._seqs

    def ensure(self, seq: int, new_len: int) -> None:
        """Allocate the pages a step to `new_len` tokens writes: block pages up to its last block,
        window pages covering its last W tokens. Within the admitted max_len this cannot fail."""
        s = self._get(seq)
        if new_len < s.length:
            raise ValueError(f"sequence {seq}: new length {new_len} is below its length {s.length}")
        self.ensure_blocks(seq, -(-new_len // self.block_size))
        self.ensure_window(seq, max(s.length, new_len - self.window_tokens), new_len)

    def ensure_blocks(self, seq: int, n_blocks: int) -> None:
        """Block pages for blocks 0..n_blocks-1."""
        s = self._get(seq)
        if n_blocks * self.block_size >= s.max_len + self.block_size:
            raise ValueError(f"sequence {seq}: {n_blocks} blocks outside max_len {s.max_len}")
        while len(s.blocks) < n_blocks:
            s.blocks.append(self._take(PoolKind.BLOCK))

    def ensure_window(self, seq: int, lo: int, hi: int) -> None:
        """Window pages covering positions [lo, hi)."""
        s = self._get(seq)
        if not 0 <= lo <= hi <= s.max_len:
            raise ValueError(
                f"sequence {seq}: window positions [{lo}, {hi}) outside [0, max_len {s.max_len}]"
            )
        w = self.window_tokens
        for i in range(lo // w, -(-hi // w)):
            if i not in s.windows:
                s.windows[i] = self._take(PoolKind.WINDOW)

    def block_pages(self, seq: int) -> list[int]:
        return list(self._get(seq).blocks)

    def window_pages(self, seq: int) -> dict[int, int]:
        """Window page index -> page id."""
        return dict(self._get(seq).windows)

    def state_page(self, seq: int) -> int:
        return self._get(seq).state

    def reuse_blocks(self, seq: int, n_blocks: int) -> int:
        """For a sequence about to be filled from elsewhere: reference the registered block pages
        of its blocks len(blocks)..n_blocks-1 while their hashes are registered, whether or not
        a boundary follows them, so a pull skips them. Its length does not move (nothing can be
        computed after a block without its boundary): only a fill to at least 256 * n_blocks
        tokens may follow. Returns the leading block pages it now takes from the cache."""
        s = self._get(seq)
        if len(s.blocks) != s.registered or s.length != s.registered * self.block_size:
            raise ValueError(
                f"reuse_blocks: sequence {seq} is no longer as admitted ({len(s.blocks)} block pages, "
                f"{s.registered} registered, length {s.length}): call it once, before any write"
            )
        if not 0 <= n_blocks <= min(len(s.hashes), self._budget(PoolKind.BLOCK, s.max_len)):
            raise ValueError(
                f"reuse_blocks: sequence {seq} n_blocks {n_blocks} outside [0, {len(s.hashes)} hashes "
                f"and max_len {s.max_len}]"
            )
        k = len(s.blocks)
        held = k + self.prefix.held(s.hashes[k:n_blocks])
        self._share_blocks(s, s.hashes[k:held])
        s.registered = held
        return held

    def known_blocks(self, seq: int) -> int:
        """How many of the sequence's leading blocks have a known hash."""
        return len(self._get(seq).hashes)

    def last_hash(self, seq: int) -> int:
        """The hash of the sequence's last block with a known hash (IndexError: none yet)."""
        return self._get(seq).hashes[-1]

    def _share_blocks(self, s: _Seq, hashes: list[int]) -> None:
        """Append the cached block pages of `hashes` to the sequence, one more reference each."""
        for h in hashes:
            page = self.prefix.block_page(h)
            self.allocators[PoolKind.BLOCK].ref(page)
            self.prefix.touch_block(page)
            s.blocks.append(page)

    def add_hashes(self, seq: int, hashes: list[int]) -> None:
        """Extend the sequence's known block hashes (blocks filled by generated tokens). Blocks
        already fully written register now (a speculative step may have passed their end before
        their last token was known); the others as `advance` reaches their end."""
        s = self._get(seq)
        s.hashes.extend(hashes)
        self._register_full(s, pulled=False)

    # --- step end ------------------------------------------------------------------------------
    def advance(
        self, seq: int, new_len: int, boundary_state_written: bool, settle: bool = True, pulled: bool = False
    ) -> None:
        """Every layer has written the sequence up to `new_len`: register the blocks that filled,
        then (unless settle=False, for a caller that still writes below new_len, e.g. an MTP layer
        after the step) `settle`. `pulled`: the pages came from a handoff (reported as stored)."""
        s = self._get(seq)
        self.ensure(seq, new_len)
        s.length = new_len
        self._register_full(s, pulled)
        if settle:
            self.settle(seq, boundary_state_written)

    def _register_full(self, s: _Seq, pulled: bool) -> None:
        """Register the blocks of `s` that are fully written and have a known hash."""
        full = min(s.length // self.block_size, len(s.hashes))
        for k in range(s.registered, full):
            self.prefix.register_block(s.hashes[k], s.hashes[k - 1] if k else None, s.blocks[k], pulled)
        s.registered = max(s.registered, full)

    def settle(self, seq: int, boundary_state_written: bool) -> None:
        """Nothing more is written below the sequence's length L: register the boundary at L when
        L is a block end whose window page holds the compressor state at exactly L, and drop the
        window pages that end at or before L - W."""
        s = self._get(seq)
        n = s.length
        k = n // self.block_size - 1
        at_block_end = boundary_state_written and n % self.block_size == 0 and 0 <= k < s.registered
        # Only a boundary on this sequence's own registered block (not a private duplicate) is shared.
        if (
            at_block_end
            and self.prefix.is_registered(s.hashes[k])
            and self.prefix.block_page(s.hashes[k]) == s.blocks[k]
        ):
            self.prefix.register_boundary(s.hashes[k], s.windows[n // self.window_tokens - 1])
        first_needed = max(n - self.window_tokens, 0) // self.window_tokens
        for i in sorted(i for i in s.windows if i < first_needed):
            self._drop_window(s.windows.pop(i))

    def _drop_window(self, page: int) -> None:
        if self.allocators[PoolKind.WINDOW].unref(page) == 0:
            self.prefix.release_window(page)

    def free(self, seq: int) -> None:
        """The sequence ended: drop its references; registered pages stay cached (tail blocks are
        put in LRU order first, so they are evicted before the prefixes they extend)."""
        s = self._seqs.pop(seq)
        for page in reversed(s.blocks):
            if self.allocators[PoolKind.BLOCK].unref(page) == 0:
                self.prefix.release_block(page)
        for i in sorted(s.windows, reverse=True):
            self._drop_window(s.windows[i])
        if self.allocators[PoolKind.STATE].unref(s.state) == 0:
            self.allocators[PoolKind.STATE].give_back(s.state)

    # --- reporting -----------------------------------------------------------------------------
    def seq_bytes(self, seq: int) -> int:
        """Bytes of the pages `seq` holds now."""
        s = self._get(seq)
        g = self.geometry
        return len(s.blocks) * g.block.nbytes + len(s.windows) * g.window.nbytes + g.state.nbytes

    def flush_events(self) -> KvEventBatch:
        return self.events.flush()

    def snapshot(self) -> KvSnapshot:
        return self.events.snapshot(*self.prefix.reported())

    def clear_cache(self) -> None:
        """Forget every cached prefix (running sequences keep their pages); emits Cleared."""
        self.prefix.clear()
