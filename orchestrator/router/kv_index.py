"""Which worker holds which KV block: the router's index, fed by the workers' KV events.

Block hashes are chained (`tandem.blocks`): hash k names the whole prefix of blocks 0..k, so a
prefix tree is not needed. The index is one dict, block hash -> bitmask of worker slots (a
Python int, bit s = the worker in slot s), plus a block count per worker. Masks are interned:
blocks with the same holders share one int object. `match` looks up the query's blocks up to the
first one nobody holds, finds by identity the few points where the mask object changes, and ANDs
only there: a worker's depth is where its bit first drops out of the running AND. Every
per-block step of `match`, `stored` and `removed` runs inside C loops (map / compress /
takewhile / dict.update); Python code runs per event and per change point, never per block. A
worker's own holdings are found by one scan of the index (C speed), which only snapshots,
re-syncs and worker removal need. bench/router_index.py measures it against Dynamo's Rust radix
tree.

Sequencing: each worker numbers its events 0, 1, 2, ... from its start. `apply` checks the
number; a gap means events were lost, so that worker's entries are dropped (the router cannot
know what it missed) and its events are ignored until `resync` replaces its holdings with a
snapshot taken from the worker. Event 0 means the worker (re)started with an empty cache: its old
entries are dropped and it is in sync again. `snapshot` / `from_snapshot` carry the whole index
across a router restart or to a new router replica.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, repeat, takewhile
from operator import and_, is_not, not_


class KvEventKind(enum.Enum):
    STORED = "stored"  # the worker's cache now holds these blocks
    REMOVED = "removed"  # the worker evicted these blocks
    CLEARED = "cleared"  # the worker dropped its whole cache


@dataclass(frozen=True)
class KvEvent:
    """One KV event of one worker. seq counts the worker's events from 0 at its start.
    parent_hash is accepted for compatibility with radix-tree indexes and not needed here."""

    seq: int
    kind: KvEventKind
    block_hashes: tuple[int, ...] = ()
    parent_hash: int | None = None

    def __post_init__(self) -> None:
        if self.seq < 0:
            raise ValueError(f"KvEvent.seq = {self.seq}: must be >= 0")


class ApplyResult(enum.Enum):
    """What `apply` did with an event."""

    APPLIED = "applied"  # in sequence: applied
    RESTARTED = "restarted"  # seq 0 from a known worker: old entries dropped, event applied
    DUPLICATE = "duplicate"  # seq already applied (at-least-once delivery): ignored
    GAP = "gap"  # events were missed: the worker's entries dropped, it needs `resync`
    UNSYNCED = "unsynced"  # the worker awaits `resync`: ignored


@dataclass(frozen=True)
class WorkerSnapshot:
    """A worker's holdings in the index. seq: its last applied event (None when it was fed only
    through `stored`/`removed`); synced False while it awaits `resync`."""

    worker: Hashable
    seq: int | None
    synced: bool
    block_hashes: frozenset[int]


@dataclass(frozen=True)
class IndexSnapshot:
    workers: tuple[WorkerSnapshot, ...]


class KvIndex:
    """Block hash -> workers holding it. Single-threaded (the router's event loop owns it)."""

    def __init__(self) -> None:
        self._owners: dict[int, int] = {}  # block hash -> bitmask of slots holding it (never 0)
        self._slot: dict[Hashable, int] = {}  # worker -> slot
        self._by_slot: list[Hashable] = []  # slot -> worker (stale for free slots)
        self._count: list[int] = []  # slot -> blocks it holds
        self._free: list[int] = []  # heap of free slots: reuse the lowest, keep masks small
        self._seq: dict[Hashable, int] = {}  # worker -> last applied event seq
        self._unsynced: set[Hashable] = set()
        # mask -> the workers its bits name; the same few masks recur (a hot prefix is held by
        # the same workers), so `match` turns a mask into names without a per-bit Python loop.
        self._names: dict[int, tuple[Hashable, ...]] = {}
        self._canon: dict[int, int] = {}  # mask value -> its one shared object (`_canonical`)

    # -- the event API (benchmarks and outside checks call exactly these) --

    def stored(self, worker: Hashable, block_hashes: Iterable[int], parent_hash: int | None = None) -> None:
        """worker now holds block_hashes. Idempotent. parent_hash is not needed (chained hashes)."""
        slot = self._slot_of(worker)
        bit = self._canonical(1 << slot)
        owners = self._owners
        hashes = block_hashes if isinstance(block_hashes, list | tuple) else list(block_hashes)
        before = len(owners)
        # Every per-block step runs in C. The common case: no block of the event is indexed yet.
        if owners.keys().isdisjoint(hashes):
            owners.update(zip(hashes, repeat(bit)))
            self._count[slot] += len(owners) - before
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
        self._count[slot] += gained + len(owners) - before

    def removed(self, worker: Hashable, block_hashes: Iterable[int]) -> None:
        """worker no longer holds block_hashes; hashes it does not hold (or an unknown worker): no-op."""
        slot = self._slot.get(worker)
        if slot is None or not self._count[slot]:
            return
        bit = self._canonical(1 << slot)
        owners = self._owners
        hashes = block_hashes if isinstance(block_hashes, list | tuple) else list(block_hashes)
        masks = list(map(owners.get, hashes, repeat(0)))
        if masks.count(bit) == len(masks):  # the usual eviction: blocks only this worker holds
            before = len(owners)
            deque(map(owners.pop, hashes, repeat(None)), 0)  # pop with a default: duplicates are fine
            self._count[slot] -= before - len(owners)
            return
        mine = list(map(and_, masks, repeat(bit)))
        gone = dict(
            zip(compress(hashes, mine), compress(masks, mine), strict=True)
        )  # hash -> mask, deduplicated
        if gone:
            self._count[slot] -= len(gone)
            self._release(gone, bit)

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
        """For each worker holding block 0 of the query: how many leading blocks of it the worker
        holds. Workers holding none are left out."""
        owners = self._owners
        # Masks of the query's blocks up to the first block nobody holds. Blocks with the same
        # holders share one mask object (`_canonical`), so the running AND can only change where
        # the object changes: find those few points by identity, in C, and AND only there.
        masks = list(takewhile(bool, map(owners.get, block_hashes, repeat(0))))
        if not masks:
            return {}
        out: dict[Hashable, int] = {}
        names, cum = self._names, masks[0]
        for k in compress(range(1, len(masks)), map(is_not, masks[1:], masks)):
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
        """How many blocks worker holds (0 for an unknown worker)."""
        slot = self._slot.get(worker)
        return 0 if slot is None else self._count[slot]

    def holdings(self, worker: Hashable) -> frozenset[int]:
        """The hashes worker holds. A scan of the whole index (C speed): for snapshots and
        re-syncs, not for the request path."""
        slot = self._slot.get(worker)
        if slot is None or not self._count[slot]:
            return frozenset()
        return frozenset(self._scan(slot))

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
            self._drop(worker)
            self._seq.pop(worker, None)
            self._unsynced.add(worker)
            self._slot_of(worker)
            return ApplyResult.GAP
        else:
            result = ApplyResult.APPLIED
        self._seq[worker] = event.seq
        if event.kind is KvEventKind.STORED:
            self.stored(worker, event.block_hashes, event.parent_hash)
        elif event.kind is KvEventKind.REMOVED:
            self.removed(worker, event.block_hashes)
        else:
            self._drop(worker)
        return result

    def resync(self, worker: Hashable, block_hashes: Iterable[int], seq: int) -> None:
        """Replace worker's holdings with block_hashes, taken by the worker after its event seq;
        events up to seq are then duplicates and seq + 1 is the next one applied."""
        if seq < 0:
            raise ValueError(f"resync seq = {seq} for worker {worker!r}: must be >= 0")
        want = set(block_hashes)
        have = self.holdings(worker)
        self.removed(worker, list(have - want))
        self.stored(worker, list(want - have))
        self._seq[worker] = seq
        self._unsynced.discard(worker)

    def needs_resync(self) -> frozenset[Hashable]:
        """Workers whose events are ignored until `resync`."""
        return frozenset(self._unsynced)

    def snapshot(self) -> IndexSnapshot:
        """Every worker's holdings and sequence state, immutable (one index scan per worker)."""
        return IndexSnapshot(
            tuple(
                WorkerSnapshot(w, self._seq.get(w), w not in self._unsynced, self.holdings(w))
                for w in self._slot
            )
        )

    @classmethod
    def from_snapshot(cls, snap: IndexSnapshot) -> KvIndex:
        """An index equal to the one `snap` was taken from."""
        index = cls()
        for ws in snap.workers:
            index.stored(ws.worker, list(ws.block_hashes))
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

    def _scan(self, slot: int) -> list[int]:
        """The hashes slot holds, by one C-speed pass over the index (keys and values align)."""
        owners = self._owners
        return list(compress(owners.keys(), map(and_, owners.values(), repeat(1 << slot))))

    def _drop(self, worker: Hashable) -> None:
        """Remove all of worker's entries, keeping its slot."""
        slot = self._slot.get(worker)
        if slot is not None and self._count[slot]:
            gone = self._scan(slot)
            self._release(dict(zip(gone, map(self._owners.__getitem__, gone), strict=True)), 1 << slot)
            self._count[slot] = 0

    def _release(self, gone: dict[int, int], bit: int) -> None:
        """Clear bit on gone (hash -> its current mask, which has bit); delete hashes left unheld."""
        owners = self._owners
        table = {m: self._canonical(m ^ bit) for m in set(gone.values())}
        left = list(map(table.__getitem__, gone.values()))
        if any(left):
            owners.update(zip(compress(gone, left), filter(None, left), strict=True))
            deque(map(owners.__delitem__, compress(gone, map(not_, left))), 0)
        else:  # the common eviction: blocks only this worker held
            deque(map(owners.__delitem__, gone), 0)
