"""KV event numbering, merging into batches, and snapshots that later events extend exactly."""

from __future__ import annotations

import pytest

from orchestrator.router.kv_index import ApplyResult, KvEventKind, KvIndex
from orchestrator.router.kv_index import KvEvent as IndexEvent
from workers.kv.events import EventLog, KvCleared, KvEvent, KvRemoved, KvStored

pytestmark = pytest.mark.kv


def test_numbering_starts_with_cleared_and_merges_chains() -> None:
    log = EventLog("p0")
    log.stored(10, None)
    log.stored(11, 10)  # extends the chain: same event
    log.stored(20, None)  # another chain: new event
    log.removed(10)
    log.removed(20)
    batch = log.flush()
    assert batch.worker == "p0"
    assert batch.events == (
        KvEvent(0, KvCleared()),
        KvEvent(1, KvStored((10, 11), None)),
        KvEvent(2, KvStored((20,), None)),
        KvEvent(3, KvRemoved((10, 20))),
    )
    log.removed(11)  # a flushed event is never extended
    assert log.flush().events == (KvEvent(4, KvRemoved((11,))),)
    assert log.flush().events == ()


def test_snapshot_seals_pending_events() -> None:
    """An event numbered <= a snapshot's seq must not grow afterwards, or an index resynced from
    the snapshot would skip the growth as a duplicate."""
    log = EventLog("d1")
    log.stored(1, None)
    snap = log.snapshot((1,))
    log.stored(2, 1)
    events = log.flush().events
    assert snap.seq == 1 and events[1:] == (KvEvent(1, KvStored((1,), None)), KvEvent(2, KvStored((2,), 1)))
    index = KvIndex()
    index.resync("d1", snap.block_hashes, snap.seq)
    results = [index.apply("d1", IndexEvent(e.seq, KvEventKind.STORED, e.body.block_hashes)) for e in events[1:]]
    assert results == [ApplyResult.DUPLICATE, ApplyResult.APPLIED]
    assert index.match([1, 2]) == {"d1": 2}
