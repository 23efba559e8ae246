"""Which worker holds which KV block: the router's index, fed by the workers' KV events.

Block hashes are chained (`tandem.blocks`): hash k names the whole prefix of blocks 0..k, so no
prefix tree is needed. One dict maps block hash -> bitmask of worker slots (interned: blocks with
the same holders share one int object), plus a block count per worker. A match ANDs masks only
where the mask object changes (found by identity, in C); every per-block step of matching,
`stored` and `removed` runs in C loops (map / compress / takewhile / dict.update), Python code
per event and per change point. bench/router_index.py measures it against Dynamo's radix tree.

Two kinds of holding (KvStored.held_only): a worker's resumable blocks are hits a computation can
resume after; its held-only blocks are pages it pulled in a handoff and holds without a boundary
(they spare a later pull, and a computation can pass over them to a later resumable block). A
second dict of the same shape keeps the held-only masks; a hash is in at most one of a worker's two
views. `match_held` counts the leading blocks a worker holds of either kind (what a handoff to it
need not move); `match`, the deepest resumable block within that run (what a prefill or a local
prefill starts from, as the worker's own prefix cache finds it). While no worker holds a held-only
block, both are the leading resumable run and the path does no extra work.

Sequencing: each worker numbers its events 0, 1, 2, ... from its start. `apply` checks the
number; a gap means events were lost, so that worker's entries are dropped (the router cannot
know what it missed) and its events are ignored until `resync` replaces its holdings with a
snapshot taken from the worker. Event 0 means the worker (re)started with an empty cache: its old
entries are dropped and it is in sync again. `snapshot` / `from_snapshot` carry the whole index
across a router restart or to a new router replica.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Hashable, Iterable, Sequence
from itertools import compress, repeat, takewhile
from operator import and_, is_not, ne, not_, or_

from orchestrator.router.kv_messages import (  # re-exported: the index's API names them
    ApplyResult,
    IndexSnapshot,
    KvEvent,
    KvEventKind,
    WorkerSnapshot,
)

__all__ = ["ApplyResult", "IndexSnapshot", "KvEvent", "KvEventKind", "KvIndex", "WorkerSnapshot"]


class KvIndex:
    """Block hash -> workers holding it. Single-threaded (the router's event loop owns it)."""

    def __init__(self) -> None:
        self._owners: dict[int, int] = {}  # block hash -> bitmask of slots holding it (never 0)
        self._held: dict[int, int] = {}  # block hash -> bitmask of slots holding it held-only
        self._slot: dict[Hashable, int] = {}  # worker -> slot
        self._by_slot: list[Hashable] = []  # slot -> worker (stale for free slots)
        self._count: list[int] = []  # slot -> blocks it holds (resumable)
        self._held_count: list[int] = []  # slot -> blocks it holds held-only
        self._free: list[int] = []  # heap of free slots: reuse the lowest, keep masks small
        self._seq: dict[Hashable, int] = {}  # worker -> last applied event seq
        self._unsynced: set[Hashable] = set()
        # mask -> the workers its bits name; the same few masks recur (a hot prefix is held by
        # the same workers), so `match` turns a mask into names without a per-bit Python loop.
        self._names: dict[int, tuple[Hashable, ...]] = {}
        self._canon: dict[int, int] = {}  # mask value -> its one shared object (`_canonical`)

    # -- the event API (benchmarks and outside checks call exactly these) --

    def stored(
        self, worker: Hashable, block_hashes: Iterable[int], parent_hash: int | None = None,
        held_only: bool = False,
    ) -> None:
        """worker now holds block_hashes: as resumable hits, or (held_only) as held-only pages; a
        hash it held as the other kind changes kind. Idempotent. parent_hash is not needed."""
        slot = self._slot_of(worker)
        hashes = block_hashes if isinstance(block_hashes, list | tuple) else list(block_hashes)
        if held_only:
            if self._count[slot]:
                self._sub(self._owners, self._count, slot, hashes)
            self._add(self._held, self._held_count, slot, hashes)
            return
        if self._held_count[slot]:
            self._sub(self._held, self._held_count, slot, hashes)
        self._add(self._owners, self._count, slot, hashes)

    def removed(self, worker: Hashable, block_hashes: Iterable[int]) -> None:
        """worker no longer holds block_hashes (of either kind); hashes it does not hold (or an
        unknown worker): no-op."""
        slot = self._slot.get(worker)
        if slot is None:
            return
        hashes = block_hashes if isinstance(block_hashes, list | tuple) else list(block_hashes)
        if self._count[slot]:
            self._sub(self._owners, self._count, slot, hashes)
        if self._held_count[slot]:
            self._sub(self._held, self._held_count, slot, hashes)

    def _add(self, owners: dict[int, int], count: list[int], slot: int, hashes: Sequence[int]) -> None:
        """Set slot's bit on hashes in owners (one of the two views), counting new blocks."""
        bit = self._canonical(1 << slot)
        before = len(owners)
        # Every per-block step runs in C. The common case: no block of the event is indexed yet.
        if owners.keys().isdisjoint(hashes):
            owners.update(zip(hashes, repeat(bit)))
            count[slot] += len(owners) - before
            return
        masks = list(map(owners.get, hashes, repeat(0)))
        cut = masks.index(0) if 0 in masks else len(masks)
        if not any(masks[cut:]):  # the usual shape: a prefix others hold, then blocks new to the index
            held = dict(zip(hashes[:cut], masks[:cut], strict=True))  # hash -> mask, deduplicated
            fresh: Iterable[int] = hashes[cut:]
        else:
            held = dict(zip(compress(hashes, masks), filter(None, masks), strict=True))
            fresh = compress(hashes, map(not_, masks))
        counts = Counter(held.values())  # distinct holder sets: few
        table = {m: self._canonical(m | bit) for m in counts}
        gained = sum(c for m, c in counts.items() if not m & bit)  # blocks new to this worker
        owners.update(zip(held, map(table.__getitem__, held.values()), strict=True))
        owners.update(zip(fresh, repeat(bit)))
        count[slot] += gained + len(owners) - before

    def _sub(self, owners: dict[int, int], count: list[int], slot: int, hashes: Sequence[int]) -> None:
        """Clear slot's bit on hashes in owners (one of the two views); hashes without it: no-op."""
        bit = self._canonical(1 << slot)
        masks = list(map(owners.get, hashes, repeat(0)))
        if masks.count(bit) == len(masks):  # the usual eviction: blocks only this worker holds
            before = len(owners)
            deque(map(owners.pop, hashes, repeat(None)), 0)  # pop with a default: duplicates are fine
            count[slot] -= before - len(owners)
            return
        mine = list(map(and_, masks, repeat(bit)))
        gone = dict(
            zip(compress(hashes, mine), compress(masks, mine), strict=True)
        )  # hash -> mask, deduplicated
        if gone:
            count[slot] -= len(gone)
            self._release(owners, gone, bit)

    def remove_worker(self, worker: Hashable) -> None:
        """Forget worker entirely (entries, sequence state); an unknown worker: no-op."""
        self._seq.pop(worker, None)
        self._unsynced.discard(worker)
        if worker not in self._slot:
            return
        self._drop(worker)
        slot = self._slot.pop(worker)
        heapq.heappush(self._free, slot)

    def match(self, block_hashes: Sequence[int]) -> dict[Hashable, int]:
        """Per worker: the deepest k such that it holds blocks 0..k-1 (either kind) and block k-1 is
        resumable, as its own prefix cache finds it (workers/kv/prefix_cache.py `lookup`); 0: left out."""
        return self.match_views(block_hashes)[0]

    def _leading(self, own: Iterable[int]) -> dict[Hashable, int]:
        """Per worker: its leading run of resumable blocks (= `match` while nobody holds held-only),
        from the query's resumable masks `own` (owners.get per block, 0 where nobody holds it)."""
        # Masks up to the first block nobody holds. Blocks with the same holders share one mask
        # object (`_canonical`), so the running AND can only change where the object changes: find
        # those few points by identity, in C, and AND only there.
        masks = list(takewhile(bool, own))
        return self._depths(masks, map(is_not, masks[1:], masks)) if masks else {}

    def _held_run(self, own: Iterable[int], hs: Sequence[int]) -> dict[Hashable, int]:
        """Per worker: its leading run of blocks of either kind, from the resumable masks `own`."""
        masks = list(takewhile(bool, map(or_, own, map(self._held.get, hs, repeat(0)))))
        # ORed masks are not interned: the change points are found by value
        return self._depths(masks, map(ne, masks[1:], masks)) if masks else {}

    def _own(self, hs: Sequence[int]) -> list[int]:
        return list(map(self._owners.get, hs, repeat(0)))

    def match_held(self, block_hashes: Sequence[int]) -> dict[Hashable, int]:
        """Per worker: its leading run of blocks of either kind (what a handoff to it need not move)."""
        hs = block_hashes if isinstance(block_hashes, list | tuple) else list(block_hashes)
        return self._held_run(self._own(hs), hs) if self._held else self._leading(self._own(hs))

    def match_views(self, block_hashes: Sequence[int]) -> tuple[dict[Hashable, int], dict[Hashable, int]]:
        """(`match`, `match_held`) of one query; the same dict twice while no worker holds a
        held-only block (read them, do not change them)."""
        if not self._held:
            resumable = self._leading(map(self._owners.get, block_hashes, repeat(0)))
            return resumable, resumable
        hs = block_hashes if isinstance(block_hashes, list | tuple) else list(block_hashes)
        own = self._own(hs)  # each block's resumable mask, looked up once
        resumable, held = self._leading(own), self._held_run(own, hs)
        for worker, n in held.items():
            lead = resumable.get(worker, 0)
            if n <= lead + 1:  # block `lead` (if held) is held-only: nothing deeper to find
                continue
            mine = list(map(and_, reversed(own[lead + 1 : n]), repeat(1 << self._slot[worker])))
            last = next(compress(range(len(mine)), mine), None)  # from the end, in C
            if last is not None:  # a resumable block after held-only ones: resume after it
                resumable[worker] = n - last
        return resumable, held

    def _depths(self, masks: list[int], changed: Iterable[bool]) -> dict[Hashable, int]:
        """worker -> where its bit first drops out of the running AND of masks (non-empty, all
        non-zero); changed[k - 1]: whether masks[k] may differ from masks[k - 1]."""
        out: dict[Hashable, int] = {}
        names, cum = self._names, masks[0]
        for k in compress(range(1, len(masks)), changed):
            now = cum & masks[k]
            if now != cum:
                self._credit(out, names, cum & ~now, k)
                cum = now
                if not cum:
                    return out
        self._credit(out, names, cum, len(masks))
        return out

    def _credit(
        self, out: dict[Hashable, int], names: dict[int, tuple[Hashable, ...]], mask: int, depth: int
    ) -> None:
        """out[w] = depth for every worker w of mask."""
        workers = names.get(mask)
        if workers is None:
            workers = self._name(mask)
        out.update(dict.fromkeys(workers, depth))

    def workers(self) -> list[Hashable]:
        """The workers the index knows (including ones holding nothing or awaiting resync)."""
        return list(self._slot)

    def __len__(self) -> int:
        """Distinct block hashes held by at least one worker."""
        return len(self._owners)

    def blocks_of(self, worker: Hashable) -> int:
        """How many resumable blocks worker holds (0 for an unknown worker)."""
        slot = self._slot.get(worker)
        return 0 if slot is None else self._count[slot]

    def held_only_blocks_of(self, worker: Hashable) -> int:
        """How many held-only blocks worker holds (0 for an unknown worker)."""
        slot = self._slot.get(worker)
        return 0 if slot is None else self._held_count[slot]

    def holdings(self, worker: Hashable) -> frozenset[int]:
        """The resumable hashes worker holds. A scan of the whole index (C speed): for snapshots
        and re-syncs, not for the request path."""
        slot = self._slot.get(worker)
        if slot is None or not self._count[slot]:
            return frozenset()
        return frozenset(self._scan(self._owners, slot))

    def held_only(self, worker: Hashable) -> frozenset[int]:
        """The held-only hashes worker holds (a scan of the held-only view, as `holdings`)."""
        slot = self._slot.get(worker)
        if slot is None or not self._held_count[slot]:
            return frozenset()
        return frozenset(self._scan(self._held, slot))

    # -- sequenced events, re-sync, snapshots --

    def apply(self, worker: Hashable, event: KvEvent) -> ApplyResult:
        """Apply worker's event if it is the next in its sequence; see the module docstring."""
        last = self._seq.get(worker)
        if event.seq == 0:
            fresh = last is None and worker not in self._unsynced
            result = ApplyResult.APPLIED if fresh else ApplyResult.RESTARTED
            self._drop(worker)
            self._unsynced.discard(worker)
        elif worker in self._unsynced:
            return ApplyResult.UNSYNCED
        elif last is not None and event.seq <= last:
            return ApplyResult.DUPLICATE
        elif last is None or event.seq != last + 1:
            self._mark_gap(worker)
            return ApplyResult.GAP
        else:
            result = ApplyResult.APPLIED
        self._seq[worker] = event.seq
        if event.kind is KvEventKind.STORED:
            self.stored(worker, event.block_hashes, event.parent_hash, event.held_only)
        elif event.kind is KvEventKind.REMOVED:
            self.removed(worker, event.block_hashes)
        else:
            self._drop(worker)
        return result

    def check_newest(self, worker: Hashable, newest_seq: int) -> ApplyResult:
        """The worker's newest event is `newest_seq`: fewer applied means the last ones were lost (GAP:
        entries dropped, awaits `resync`); APPLIED when up to date, UNSYNCED when awaiting one."""
        if worker in self._unsynced:
            return ApplyResult.UNSYNCED
        last = self._seq.get(worker)
        if last is not None and last >= newest_seq:
            return ApplyResult.APPLIED
        self._mark_gap(worker)
        return ApplyResult.GAP

    def _mark_gap(self, worker: Hashable) -> None:
        self._drop(worker)
        self._seq.pop(worker, None)
        self._unsynced.add(worker)
        self._slot_of(worker)

    def resync(
        self, worker: Hashable, block_hashes: Iterable[int], seq: int, held_only: Iterable[int] = ()
    ) -> None:
        """Replace worker's holdings with block_hashes (resumable) and held_only (disjoint), taken
        by the worker after its event seq; events up to seq are then duplicates and seq + 1 is the
        next one applied."""
        if seq < 0:
            raise ValueError(f"resync seq = {seq} for worker {worker!r}: must be >= 0")
        want, want_held = set(block_hashes), set(held_only)
        if both := want & want_held:
            raise ValueError(f"resync of worker {worker!r}: hashes {sorted(both)[:4]} are in both "
                             "block_hashes and held_only")
        have, have_held = self.holdings(worker), self.held_only(worker)
        self.removed(worker, list((have | have_held) - (want | want_held)))
        self.stored(worker, list(want_held - have_held), held_only=True)
        self.stored(worker, list(want - have))
        self._seq[worker] = seq
        self._unsynced.discard(worker)

    def needs_resync(self) -> frozenset[Hashable]:
        """Workers whose events are ignored until `resync`."""
        return frozenset(self._unsynced)

    def snapshot(self) -> IndexSnapshot:
        """Every worker's holdings and sequence state, immutable (one index scan per worker)."""
        return IndexSnapshot(tuple(WorkerSnapshot(w, self._seq.get(w), w not in self._unsynced,
                                                  self.holdings(w), self.held_only(w)) for w in self._slot))

    @classmethod
    def from_snapshot(cls, snap: IndexSnapshot) -> KvIndex:
        """An index equal to the one `snap` was taken from."""
        index = cls()
        for ws in snap.workers:
            index.stored(ws.worker, list(ws.block_hashes))
            index.stored(ws.worker, list(ws.held_only), held_only=True)
            if ws.seq is not None:
                index._seq[ws.worker] = ws.seq
            if not ws.synced:
                index._unsynced.add(ws.worker)
        return index

    # -- internals --

    def _slot_of(self, worker: Hashable) -> int:
        slot = self._slot.get(worker)
        if slot is None:
            if self._free:
                slot = heapq.heappop(self._free)
                self._by_slot[slot] = worker
                self._names.clear()  # cached masks may name the slot's previous worker
            else:
                slot = len(self._by_slot)
                self._by_slot.append(worker)
                self._count.append(0)
                self._held_count.append(0)
            self._slot[worker] = slot
        return slot

    def _canonical(self, mask: int) -> int:
        """The one shared int object for this mask value. Blocks held by the same workers then
        share a mask object, so a query touches a few hot objects, not one stray object per block.
        The table is emptied when it passes 65536 masks (entries keep the objects they have)."""
        found = self._canon.get(mask)
        if found is None:
            if len(self._canon) >= 65_536:
                self._canon.clear()
            found = self._canon.setdefault(mask, mask)
        return found

    def _name(self, mask: int) -> tuple[Hashable, ...]:
        """The workers of mask's bits, cached (bounded: cleared when it grows past 4096 masks)."""
        names, by_slot, rest = [], self._by_slot, mask
        while rest:
            low = rest & -rest
            names.append(by_slot[low.bit_length() - 1])
            rest ^= low
        if len(self._names) >= 4096:
            self._names.clear()
        self._names[mask] = found = tuple(names)
        return found

    def _scan(self, owners: dict[int, int], slot: int) -> list[int]:
        """The hashes slot holds in owners (one view), by one C-speed pass (keys and values align)."""
        return list(compress(owners.keys(), map(and_, owners.values(), repeat(1 << slot))))

    def _drop(self, worker: Hashable) -> None:
        """Remove all of worker's entries (both views), keeping its slot."""
        slot = self._slot.get(worker)
        if slot is None:
            return
        for owners, count in ((self._owners, self._count), (self._held, self._held_count)):
            if count[slot]:
                gone = self._scan(owners, slot)
                self._release(owners, dict(zip(gone, map(owners.__getitem__, gone), strict=True)), 1 << slot)
                count[slot] = 0

    def _release(self, owners: dict[int, int], gone: dict[int, int], bit: int) -> None:
        """Clear bit on gone (hash -> its current mask in owners, which has bit); delete hashes
        left unheld."""
        table = {m: self._canonical(m ^ bit) for m in set(gone.values())}
        left = list(map(table.__getitem__, gone.values()))
        if any(left):
            owners.update(zip(compress(gone, left), filter(None, left), strict=True))
            deque(map(owners.__delitem__, compress(gone, map(not_, left))), 0)
        else:  # the common eviction: blocks only this worker held
            deque(map(owners.__delitem__, gone), 0)
