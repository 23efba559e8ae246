"""KV events: what a worker's prefix cache started or stopped being able to serve as a hit.

Mirrors tandem.v1 KvEvent / KvEventBatch / KvSnapshot (the worker converts at its edge). Block
hash h_k is reported in one of two kinds (workers/kv/prefix_cache.py):
- resumable: the compressed pages of blocks 0..k AND the window before boundary k+1 (with its
  compressor state) are held, so a computation can resume after block k (a hit);
- held only (`KvStored.held_only`): block k's page was pulled in a handoff and has no boundary
  here; it spares a later pull of that prefix, but a local prefill cannot start after it.
"stored" reports a hash entering either kind, or changing kind (a pulled block that gains a
boundary: stored resumable; one whose boundary is evicted while the block stays: stored held
only); "removed" when it is neither. Because hashes are chained, h_k alone names the whole prefix:
an index must not assume h_{k-1} is held when h_k is (window pages of inner boundaries are evicted
on their own).

Every event gets the next per-worker sequence number when recorded, from 0: a log starts with
event 0 = Cleared, the worker announcing that it (re)started with an empty cache (the router's
KvIndex drops that worker's old entries on seeing seq 0). Consecutive events of the same kind that
extend each other are merged while still pending and not yet covered by a snapshot (one seq),
which is what batching means here. A snapshot lists what is held now and the last seq it reflects.

Note for indexes: hit-able hashes are not closed under prefixes (an inner boundary can lose its
window while a deeper one keeps it); with chained hashes the exact hit of a query is its deepest
reported hash, so an index that stops at the first missing block undercounts such workers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvStored:
    """Blocks now reported, in chain order; parent_hash is the block before block_hashes[0] in the
    chain (None for block 0), whether or not the parent itself is reported. held_only: the blocks
    are held but not resumable (see the module docstring); False = resumable hits."""

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    held_only: bool = False


@dataclass(frozen=True)
class KvRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class KvCleared:
    """Everything the worker reported before is gone."""


KvEventBody = KvStored | KvRemoved | KvCleared


@dataclass(frozen=True)
class KvEvent:
    seq: int
    body: KvEventBody


@dataclass(frozen=True)
class KvEventBatch:
    worker: str
    events: tuple[KvEvent, ...]


@dataclass(frozen=True)
class KvSnapshot:
    """What `worker` reports after applying every event with seq <= `seq`: block_hashes can be
    served as hits (resumable), held_only are held but not resumable (disjoint from block_hashes)."""

    worker: str
    seq: int
    block_hashes: tuple[int, ...]
    held_only: tuple[int, ...] = ()


class EventLog:
    """Pending events of one worker, numbered 0, 1, 2, ...; event 0 is Cleared (a fresh start)."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._seq = -1
        self._pending: list[KvEvent] = []
        self._sealed = 0  # pending events before this index are covered by a snapshot: no merging
        self.cleared()

    @property
    def last_seq(self) -> int:
        return self._seq

    def stored(self, block_hash: int, parent_hash: int | None, held_only: bool = False) -> None:
        """block_hash is now reported as resumable, or as held only (see the module docstring)."""
        last = self._mergeable()
        if (
            last is not None
            and isinstance(last.body, KvStored)
            and last.body.held_only == held_only
            and last.body.block_hashes[-1] == parent_hash
        ):
            body = KvStored(last.body.block_hashes + (block_hash,), last.body.parent_hash, held_only)
            self._pending[-1] = KvEvent(last.seq, body)
            return
        self._record(KvStored((block_hash,), parent_hash, held_only))

    def removed(self, block_hash: int) -> None:
        last = self._mergeable()
        if last is not None and isinstance(last.body, KvRemoved):
            self._pending[-1] = KvEvent(last.seq, KvRemoved(last.body.block_hashes + (block_hash,)))
            return
        self._record(KvRemoved((block_hash,)))

    def cleared(self) -> None:
        self._record(KvCleared())

    def _mergeable(self) -> KvEvent | None:
        return self._pending[-1] if len(self._pending) > self._sealed else None

    def _record(self, body: KvEventBody) -> None:
        self._seq += 1
        self._pending.append(KvEvent(self._seq, body))

    def flush(self) -> KvEventBatch:
        """The pending events as one batch (possibly empty), oldest first; clears them."""
        batch = KvEventBatch(self.worker, tuple(self._pending))
        self._pending, self._sealed = [], 0
        return batch

    def snapshot(self, resumable: tuple[int, ...], held_only: tuple[int, ...] = ()) -> KvSnapshot:
        """A snapshot of the caller's current reported hashes (`resumable` hits and `held_only`
        ones) at the last recorded seq. Events already pending stop growing, so none numbered <=
        that seq changes afterwards."""
        self._sealed = len(self._pending)
        return KvSnapshot(self.worker, self._seq, resumable, held_only)
