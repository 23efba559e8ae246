"""The messages of the router's KV index (orchestrator/router/kv_index.py): a worker's KV event as
the index applies it, what `apply` did with it, and the index's snapshots."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass


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
    held_only: bool = False  # STORED only: held, not resumable (orchestrator/router/kv_index.py)

    def __post_init__(self) -> None:
        if self.seq < 0:
            raise ValueError(f"KvEvent.seq = {self.seq}: must be >= 0")
        if self.held_only and self.kind is not KvEventKind.STORED:
            raise ValueError(f"KvEvent(seq {self.seq}).held_only is set on a {self.kind.value} event: "
                             "only a stored event has a kind of holding")


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
    through `stored`/`removed`); synced False while it awaits `resync`. block_hashes are its
    resumable blocks, held_only its held-only ones (disjoint)."""

    worker: Hashable
    seq: int | None
    synced: bool
    block_hashes: frozenset[int]
    held_only: frozenset[int] = frozenset()


@dataclass(frozen=True)
class IndexSnapshot:
    workers: tuple[WorkerSnapshot, ...]
