"""The router's gateway keeps its KV index true to a worker across lost events: a gap drops the
worker's entries, and the gateway resyncs them from the worker's snapshot at once; held-only
(pulled, not resumable) blocks keep their kind through events and the snapshot."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.router.inputs import Role, WorkerId
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.ray_gateway import RankLimits, RayGateway
from tandem.v1 import worker_pb2

pytestmark = pytest.mark.router

W = WorkerId("decode-0", 0)


def _stats() -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(kv_blocks_free=10, nvlink_domain="local")


def _stored(seq: int, *hashes: int, held_only: bool = False) -> worker_pb2.KvEvent:
    return worker_pb2.KvEvent(seq=seq, stored=worker_pb2.KvStored(block_hashes=list(hashes), held_only=held_only))


class _Method:
    def __init__(self, fn) -> None:  # noqa: ANN001
        self.fn = fn

    def remote(self, *args):  # noqa: ANN002, ANN201
        return self.fn(*args)


class FakeRank:
    """Answers like a rank actor handle: `reports` streams refs (awaitables), `kv_snapshot` a snapshot.
    Its second report skips event seq 2: the router must notice and resync from the snapshot."""

    def __init__(self) -> None:
        self.snapshots = 0
        self.reports = _Method(self._reports)
        self.kv_snapshot = _Method(self._snapshot)
        self.stream = _Method(self._no_tokens)

    async def _no_tokens(self):  # noqa: ANN202
        await asyncio.sleep(3600)
        yield

    async def _reports(self, interval_s: float, after_seq: int = -1):  # noqa: ANN202
        batches = [
            [worker_pb2.KvEvent(seq=0, cleared=worker_pb2.KvCleared()), _stored(1, 11, 12)],
            [_stored(3, 99)],  # seq 2 (which removed 12 and stored 13) was lost
            [_stored(5, 14), _stored(6, 15, held_only=True)],
        ]
        for events in batches:
            yield self._ref((_stats(), worker_pb2.KvEventBatch(events=events)))
            await asyncio.sleep(0)
        await asyncio.sleep(3600)

    async def _ref(self, value):  # noqa: ANN001, ANN202
        return value

    async def _snapshot(self) -> worker_pb2.KvSnapshot:
        self.snapshots += 1
        return worker_pb2.KvSnapshot(seq=4, block_hashes=[11, 13], held_only_hashes=[99])


def test_a_gap_is_resynced_from_the_worker_snapshot() -> None:
    async def go() -> tuple[int, int, int, int]:
        index = KvIndex()
        gw = RayGateway(index, RankLimits(8, 8, 1000.0), report_interval_s=0.0)
        rank = FakeRank()
        gw.add(W, Role.DECODE, rank, _stats())
        for _ in range(1000):  # until the event after the resync (seq 5: block 14) is in (10 s at most)
            await asyncio.sleep(0.01)
            if index.match([14]).get(W) == 1:
                break
        old_path = index.match([11, 12]).get(W, 0)
        new_path = index.match([11, 13, 99, 14]).get(W, 0)
        held_path = index.match_held([11, 13, 99, 14, 15]).get(W, 0)
        gw.remove(W)
        return old_path, new_path, held_path, rank.snapshots

    old_path, new_path, held_path, snapshots = asyncio.run(go())
    assert snapshots == 1
    assert old_path == 1  # block 12 left with the lost event: the index no longer claims it
    assert new_path == 4  # the snapshot's 13, its 99 (held only), then 14 (resumable, a later event)
    assert held_path == 5  # 99 (snapshot, held only), then the later events' 14 and 15 (held only)


def test_a_removed_rank_leaves_no_gauge_series_behind() -> None:
    """Its per-worker queue gauges are set from its reports and dropped with it."""
    from prometheus_client import CollectorRegistry, generate_latest

    from orchestrator.router.metrics import RouterMetrics

    async def go() -> tuple[str, str]:
        registry = CollectorRegistry()
        gw = RayGateway(KvIndex(), RankLimits(8, 8, 1000.0), report_interval_s=0.0,
                        metrics=RouterMetrics(registry))
        gw.add(W, Role.DECODE, FakeRank(), _stats())
        for _ in range(1000):  # 10 s at most, for a loaded machine
            await asyncio.sleep(0.01)
            if f'worker="{W}"' in generate_latest(registry).decode():
                break
        before = generate_latest(registry).decode()
        gw.remove(W)
        return before, generate_latest(registry).decode()

    before, after = asyncio.run(go())
    series = ('tandem_router_worker_queue_depth{worker="decode-0/0"}',
              'tandem_router_worker_queued_prefill_tokens{worker="decode-0/0"}')
    assert all(s in before for s in series)
    assert not any(s in after for s in series)


class LastEventLostRank(FakeRank):
    """Its only report carries events 0 and 1 but says seq 2 exists: the last event was lost, and
    no later event will come to show the gap."""

    async def _reports(self, interval_s: float, after_seq: int = -1):  # noqa: ANN202
        batch = worker_pb2.KvEventBatch(events=[worker_pb2.KvEvent(seq=0, cleared=worker_pb2.KvCleared()),
                                                _stored(1, 11, 12)], last_seq=2)
        yield self._ref((_stats(), batch))
        await asyncio.sleep(3600)

    async def _snapshot(self) -> worker_pb2.KvSnapshot:
        self.snapshots += 1
        return worker_pb2.KvSnapshot(seq=2, block_hashes=[11, 13])


def test_a_lost_last_event_is_resynced_at_once_from_the_batch_last_seq() -> None:
    async def go() -> tuple[int, dict, dict]:
        index = KvIndex()
        gw = RayGateway(index, RankLimits(8, 8, 1000.0), report_interval_s=0.0)
        rank = LastEventLostRank()
        gw.add(W, Role.DECODE, rank, _stats())
        for _ in range(1000):  # 10 s at most, for a loaded machine
            await asyncio.sleep(0.01)
            if rank.snapshots:
                break
        await asyncio.sleep(0.05)
        return rank.snapshots, index.match([11, 13]), index.match([11, 12])

    snapshots, now, old = asyncio.run(go())
    assert snapshots == 1
    assert now == {W: 2} and old == {W: 1}  # event 2 (12 evicted, 13 stored) is in: from the snapshot


def test_check_newest_marks_a_gap_only_when_events_are_missing() -> None:
    from orchestrator.router.kv_messages import ApplyResult, KvEvent, KvEventKind

    index = KvIndex()
    index.apply(W, KvEvent(0, KvEventKind.CLEARED))
    index.apply(W, KvEvent(1, KvEventKind.STORED, (11, 12)))
    assert index.check_newest(W, 1) is ApplyResult.APPLIED and index.match([11]) == {W: 1}
    assert index.check_newest(W, 2) is ApplyResult.GAP
    assert W in index.needs_resync() and index.match([11]) == {}  # dropped until the resync
    assert index.check_newest(W, 2) is ApplyResult.UNSYNCED
    index.resync(W, [11, 13], seq=2)
    assert index.check_newest(W, 2) is ApplyResult.APPLIED and index.match([11, 13]) == {W: 2}
