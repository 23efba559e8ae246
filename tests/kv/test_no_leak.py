"""Random admit / step / free / clear sequences: no page leaks, references add up, admitted
sequences never run out of pages, and KV events replayed into an index (a plain replay here, and
the router's KvIndex) reproduce exactly the boundaries the worker can serve as hits."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.router.kv_index import KvEvent as IndexEvent
from orchestrator.router.kv_index import KvEventKind, KvIndex
from tandem.blocks import block_hashes
from workers.kv.events import KvCleared, KvEventBatch, KvRemoved, KvStored
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import AdmissionRefused, KvCacheManager, KvCapacity
from workers.kv.presets import Preset

pytestmark = pytest.mark.kv
GEOM = KvGeometry.of(Preset.TINY.shape())
FAMILIES = [[(f * 1009 + 17 * i) % 40000 for i in range(4 * 256)] for f in range(3)]


class Replay:
    """The tiniest index: per worker, the set of hashes its events say it holds."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.seq = -1

    def apply(self, batch: KvEventBatch) -> None:
        for ev in batch.events:
            assert ev.seq == self.seq + 1, "events must be numbered without gaps"
            self.seq = ev.seq
            if isinstance(ev.body, KvStored):
                assert not self.held & set(ev.body.block_hashes), "stored twice without a removal"
                self.held |= set(ev.body.block_hashes)
            elif isinstance(ev.body, KvRemoved):
                assert set(ev.body.block_hashes) <= self.held, "removed what was never stored"
                self.held -= set(ev.body.block_hashes)
            else:
                assert isinstance(ev.body, KvCleared)
                self.held = set()


def to_index(index: KvIndex, batch: KvEventBatch) -> None:
    for ev in batch.events:
        if isinstance(ev.body, KvStored):
            e = IndexEvent(ev.seq, KvEventKind.STORED, ev.body.block_hashes, ev.body.parent_hash)
        elif isinstance(ev.body, KvRemoved):
            e = IndexEvent(ev.seq, KvEventKind.REMOVED, ev.body.block_hashes)
        else:
            e = IndexEvent(ev.seq, KvEventKind.CLEARED)
        index.apply(batch.worker, e)


def held_by(index: KvIndex, worker: str) -> frozenset[int]:
    return {w.worker: w.block_hashes for w in index.snapshot().workers}.get(worker, frozenset())


def check_pages(m: KvCacheManager) -> None:
    refs: dict[PoolKind, dict[int, int]] = {p: {} for p in PoolKind}
    for s in m._seqs.values():
        for page in s.blocks:
            refs[PoolKind.BLOCK][page] = refs[PoolKind.BLOCK].get(page, 0) + 1
        for page in s.windows.values():
            refs[PoolKind.WINDOW][page] = refs[PoolKind.WINDOW].get(page, 0) + 1
        refs[PoolKind.STATE][s.state] = refs[PoolKind.STATE].get(s.state, 0) + 1
    lru = {PoolKind.BLOCK: m.prefix._lru_b, PoolKind.WINDOW: m.prefix._lru_w, PoolKind.STATE: {}}
    for pool in PoolKind:
        a = m.allocators[pool]
        free = list(a._free)
        assert len(free) == len(set(free))
        for page in range(a.num_pages):
            states = [a.is_free(page), refs[pool].get(page, 0) > 0, page in lru[pool]]
            assert sum(states) == 1, f"{pool.value} page {page}: free/held/cached = {states}"
            assert a.refs(page) == refs[pool].get(page, 0), f"{pool.value} page {page} refcount"
            assert a.is_free(page) == (page in free)
    for h in m.prefix.hit_able():  # a reported boundary has its whole chain registered
        assert m.prefix.is_registered(h)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_ops_leak_nothing_and_events_replay_exactly(data: st.DataObject) -> None:
    m = KvCacheManager(GEOM, KvCapacity(block_pages=10, window_pages=8, state_pages=4), "w", device="meta")
    replay, index = Replay(), KvIndex()
    late_index, late_from = None, -1
    next_seq = 0
    for _ in range(data.draw(st.integers(100, 200), label="ops")):
        op = data.draw(
            st.sampled_from(["admit", "admit", "step", "step", "finish", "free", "clear", "flush", "snap"])
        )
        running = sorted(m._seqs)
        if op == "admit":
            fam = data.draw(st.integers(0, 2))
            shared = 256 * data.draw(st.integers(0, 4)) + data.draw(st.sampled_from([0, 0, 5, 130]))
            tail = data.draw(st.integers(0 if shared else 1, 300))
            prompt = FAMILIES[fam][:shared] + [40000 + next_seq * 1000 + i for i in range(tail)]
            max_len = len(prompt) + data.draw(st.integers(0, 100))
            hashes = block_hashes(prompt)
            ok = m.can_admit(hashes, len(prompt), max_len)
            before = [m.allocators[p].num_free for p in PoolKind]
            if ok:
                adm = m.admit(next_seq, hashes, len(prompt), max_len)
                assert adm.hit_tokens == 256 * adm.hit_blocks < len(prompt)
            else:
                with pytest.raises(AdmissionRefused):
                    m.admit(next_seq, hashes, len(prompt), max_len)
                assert before == [m.allocators[p].num_free for p in PoolKind]
            next_seq += 1
        elif op == "step" and running:
            seq = data.draw(st.sampled_from(running))
            n, top = m.length(seq), m._seqs[seq].max_len
            if n < top:
                end = data.draw(
                    st.sampled_from(
                        sorted(
                            {
                                min((n // 256 + 1) * 256, top),
                                min(n + 1, top),
                                min(n + data.draw(st.integers(1, 700)), top),
                            }
                        )
                    )
                )
                m.ensure(seq, end)  # an admitted sequence never runs out of pages
                m.advance(
                    seq, end, boundary_state_written=data.draw(st.sampled_from([True, True, True, False]))
                )
        elif op == "finish" and running:  # run to max length in block-aligned chunks, then end
            seq = data.draw(st.sampled_from(running))
            while (n := m.length(seq)) < m._seqs[seq].max_len:
                end = min((n // 256 + 1) * 256, m._seqs[seq].max_len)
                m.ensure(seq, end)
                m.advance(seq, end, boundary_state_written=True)
            m.free(seq)
        elif op == "free" and running:
            m.free(data.draw(st.sampled_from(running)))
        elif op == "clear" and data.draw(st.integers(0, 3)) == 0:
            m.clear_cache()
        elif op == "flush":
            batch = m.flush_events()
            replay.apply(batch)
            to_index(index, batch)
            if late_index is not None:
                to_index(late_index, batch)
        elif op == "snap" and late_index is None:
            snap = m.snapshot()  # a router replica joining late: snapshot, then later events
            late_index, late_from = KvIndex(), snap.seq
            late_index.resync("w", snap.block_hashes, snap.seq)
        check_pages(m)
    batch = m.flush_events()
    replay.apply(batch)
    to_index(index, batch)
    held = set(m.prefix.hit_able())
    assert replay.held == held and replay.seq == m.snapshot().seq
    assert held_by(index, "w") == held
    if late_index is not None:
        to_index(late_index, batch)
        assert held_by(late_index, "w") == held and late_from <= replay.seq
    for seq in sorted(m._seqs):
        m.free(seq)
    check_pages(m)
    assert all(
        m.allocators[p].num_free + len(lru) == m.allocators[p].num_pages
        for p, lru in ((PoolKind.BLOCK, m.prefix._lru_b), (PoolKind.WINDOW, m.prefix._lru_w))
    )
    m.clear_cache()
    assert all(m.allocators[p].num_free == m.allocators[p].num_pages for p in PoolKind)
    replay.apply(m.flush_events())
    assert replay.held == set()
