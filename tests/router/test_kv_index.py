"""KvIndex against a brute-force reference (worker -> resumable and held-only sets of hashes),
sequencing, re-sync, snapshots."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.router.inputs import WorkerId
from orchestrator.router.kv_index import ApplyResult, KvEvent, KvEventKind, KvIndex

pytestmark = pytest.mark.router

# Three chains of 10 "chained" hashes (equal prefixes share hashes, as tandem.blocks makes them),
# with a fork: chain 1 shares chain 0's first 4 blocks.
CHAINS = [
    [1000 + k for k in range(10)],
    [1000 + k for k in range(4)] + [2000 + k for k in range(6)],
    [3000 + k for k in range(10)],
]
UNIVERSE = sorted({h for c in CHAINS for h in c})
QUERIES = [c[:n] for c in CHAINS for n in (1, 3, 4, 7, 10)] + [CHAINS[0] + [9999], [9999] + CHAINS[0], []]


def reference_match(held: dict[object, set[int]], query: list[int]) -> dict[object, int]:
    out = {}
    for w, hs in held.items():
        n = 0
        while n < len(query) and query[n] in hs:
            n += 1
        if n:
            out[w] = n
    return out


def reference_resume(res: dict[object, set[int]], both: dict[object, set[int]], query: list[int]
                     ) -> dict[object, int]:
    """Per worker: the deepest k with query[:k] all held (either kind) and query[k-1] resumable."""
    out = {}
    for w, run in reference_match(both, query).items():
        depth = max((k + 1 for k in range(run) if query[k] in res.get(w, set())), default=0)
        if depth:
            out[w] = depth
    return out


def assert_same(index: KvIndex, res: dict[object, set[int]], held: dict[object, set[int]]) -> None:
    """index equals the reference: res = resumable hashes, held = held-only ones (disjoint)."""
    both = {w: res.get(w, set()) | held.get(w, set()) for w in set(res) | set(held)}
    for q in QUERIES:
        assert index.match(q) == reference_resume(res, both, q), q
        assert index.match_held(q) == reference_match(both, q), q
        assert index.match_views(q) == (reference_resume(res, both, q), reference_match(both, q)), q
    assert len(index) == len(set().union(*res.values()) if res else set())
    for w in both:
        assert not res.get(w, set()) & held.get(w, set())
        assert index.blocks_of(w) == len(res.get(w, set()))
        assert index.holdings(w) == frozenset(res.get(w, set()))
        assert index.held_only_blocks_of(w) == len(held.get(w, set()))
        assert index.held_only(w) == frozenset(held.get(w, set()))


workers_st = st.sampled_from(["a", "b", WorkerId("p", 1), 7])
hashes_st = st.lists(st.sampled_from(UNIVERSE), max_size=12)  # duplicates and unknown removals too
op_st = st.one_of(
    st.tuples(st.just("stored"), workers_st, hashes_st),
    st.tuples(st.just("stored_held"), workers_st, hashes_st),
    st.tuples(st.just("removed"), workers_st, hashes_st),
    st.tuples(st.just("remove_worker"), workers_st, st.just([])),
)


@settings(derandomize=True, max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, max_size=40))
def test_random_event_streams_match_the_brute_force_reference(ops: list[tuple]) -> None:
    index = KvIndex()
    res: dict[object, set[int]] = {}
    held: dict[object, set[int]] = {}
    for kind, w, hs in ops:
        if kind in ("stored", "stored_held"):
            index.stored(w, hs, held_only=kind == "stored_held")
            into, other = (held, res) if kind == "stored_held" else (res, held)
            into.setdefault(w, set()).update(hs)
            other.setdefault(w, set()).difference_update(hs)
        elif kind == "removed":
            index.removed(w, iter(hs))  # any iterable is accepted
            for view in (res, held):
                if w in view:
                    view[w].difference_update(hs)
        else:
            index.remove_worker(w)
            res.pop(w, None)
            held.pop(w, None)
        assert_same(index, res, held)
    assert set(index.workers()) == set(res) | set(held)


def test_hand_example_counts_only_leading_blocks() -> None:
    index = KvIndex()
    a, b = CHAINS[0], CHAINS[1]
    index.stored("w0", a[:6])
    index.stored("w1", b)  # shares a[:4]
    index.stored("w2", a[1:])  # lacks block 0: holds no leading block of any query on chain 0
    index.removed("w0", [a[2]])  # a hole: w0 now leads with 2 blocks only
    assert index.match(a) == {"w0": 2, "w1": 4}
    assert index.match(b) == {"w0": 2, "w1": 10}
    assert index.match([a[1], a[2]]) == {"w0": 1, "w1": 2, "w2": 2}
    index.stored("w0", a[:6])  # idempotent re-store fills the hole
    assert index.match(a) == {"w0": 6, "w1": 4}
    assert len(index) == len(set(a) | set(b))


def test_reused_slot_is_named_after_its_new_worker() -> None:
    index = KvIndex()
    index.stored("old", CHAINS[2])
    assert index.match(CHAINS[2]) == {"old": 10}  # caches the mask's name
    index.remove_worker("old")
    assert index.match(CHAINS[2]) == {}
    index.stored("new", CHAINS[2][:3])  # takes the freed slot
    assert index.match(CHAINS[2]) == {"new": 3}
    assert index.workers() == ["new"]


def test_a_hundred_workers_cross_the_64_bit_boundary() -> None:
    index = KvIndex()
    chain = list(range(1, 201))
    for w in range(100):
        index.stored(w, chain[: w + 1])  # worker w holds w + 1 leading blocks
    assert index.match(chain) == {w: w + 1 for w in range(100)}
    for w in range(0, 100, 3):
        index.removed(w, chain[:1])
    assert index.match(chain) == {w: w + 1 for w in range(100) if w % 3}
    assert len(index) == 100


def test_held_only_blocks_change_kind_and_count_only_for_transfers() -> None:
    index = KvIndex()
    c = CHAINS[0]
    index.stored("d", c[:6], held_only=True)  # pulled in a handoff: no boundary
    index.stored("d", c[:2])  # blocks 0-1 gained their boundaries
    index.stored("p", c[:3])
    assert index.match(c) == {"d": 2, "p": 3}
    assert index.match_held(c) == {"d": 6, "p": 3}
    assert index.match_views(c) == ({"d": 2, "p": 3}, {"d": 6, "p": 3})
    index.stored("d", c[1:2], held_only=True)  # block 1's boundary evicted, its page stays
    assert index.match(c) == {"d": 1, "p": 3} and index.match_held(c) == {"d": 6, "p": 3}
    assert (index.blocks_of("d"), index.held_only_blocks_of("d")) == (1, 5)
    index.removed("d", [c[3]])  # the page itself goes
    assert index.match_held(c) == {"d": 3, "p": 3} and index.held_only("d") == frozenset(c[1:3] + c[4:6])
    assert index.apply("d", KvEvent(0, KvEventKind.STORED, tuple(c[:4]), None, held_only=True)) \
        is ApplyResult.APPLIED  # seq 0 (a fresh start) drops both views, then the event applies
    assert index.match(c) == {"p": 3} and index.match_held(c) == {"d": 4, "p": 3}
    assert index.apply("d", KvEvent(1, KvEventKind.CLEARED)) is ApplyResult.APPLIED
    assert index.match_held(c) == {"p": 3} and index.held_only("d") == frozenset()
    m, h = index.match_views(c)  # no held-only block left: one dict serves as both views
    assert m == h == {"p": 3} and h is m
    with pytest.raises(ValueError, match=r"held_only is set on a removed event"):
        KvEvent(2, KvEventKind.REMOVED, (1,), held_only=True)


def test_a_computed_block_after_pulled_ones_is_a_resume_point() -> None:
    """A decode pulled a prompt (held-only) and computed the answer's blocks itself (boundaries):
    a follow-up turn resumes after the answer, as the worker's prefix cache finds it."""
    index = KvIndex()
    c = CHAINS[0]
    index.stored("d", c[:4], held_only=True)  # the pulled prompt
    index.stored("d", c[4:7])  # the answer, decoded here
    index.stored("p", c[:2])
    assert index.match_views(c) == ({"d": 7, "p": 2}, {"d": 7, "p": 2})
    assert index.match(c[:5]) == {"d": 5, "p": 2} and index.match(c[:4]) == {"p": 2}  # held-only alone: none
    index.removed("d", [c[2]])  # a hole in the prompt: nothing after it can be resumed
    assert index.match(c) == {"p": 2} and index.match_held(c) == {"d": 2, "p": 2}


def test_resync_and_snapshot_carry_both_views() -> None:
    index = KvIndex()
    c = CHAINS[0]
    index.stored("d", c[:2])
    index.stored("d", c[2:8], held_only=True)
    index.resync("d", c[:3], seq=4, held_only=c[3:5] + CHAINS[2][:2])  # block 2 became resumable
    assert index.holdings("d") == frozenset(c[:3])
    assert index.held_only("d") == frozenset(c[3:5] + CHAINS[2][:2])
    assert index.match(c) == {"d": 3} and index.match_held(c) == {"d": 5}
    with pytest.raises(ValueError, match=r"hashes \[1002\] are in both block_hashes and held_only"):
        index.resync("d", c[:3], seq=5, held_only=c[2:4])
    snap = index.snapshot()
    assert snap.workers[0].held_only == frozenset(c[3:5] + CHAINS[2][:2])
    copy = KvIndex.from_snapshot(snap)
    assert copy.snapshot() == snap
    for q in QUERIES:
        assert (copy.match(q), copy.match_held(q)) == (index.match(q), index.match_held(q))
    assert copy.apply("d", KvEvent(5, KvEventKind.STORED, (c[3],))) is ApplyResult.APPLIED
    assert copy.match(c) == {"d": 4} and copy.match_held(c) == {"d": 5}


# -- sequenced events --


def ev(seq: int, kind: KvEventKind, *hashes: int) -> KvEvent:
    return KvEvent(seq, kind, tuple(hashes))


def test_in_order_events_apply_and_duplicates_are_ignored() -> None:
    index = KvIndex()
    c = CHAINS[0]
    assert index.apply("w", ev(0, KvEventKind.STORED, *c[:5])) is ApplyResult.APPLIED
    assert index.apply("w", ev(1, KvEventKind.REMOVED, c[4])) is ApplyResult.APPLIED
    assert index.apply("w", ev(1, KvEventKind.REMOVED, c[3])) is ApplyResult.DUPLICATE  # redelivered
    assert index.apply("w", ev(0, KvEventKind.STORED, *c[:2])) is ApplyResult.RESTARTED
    assert index.match(c) == {"w": 2}  # the restart dropped the old cache
    assert index.apply("w", ev(1, KvEventKind.STORED, *c[2:6])) is ApplyResult.APPLIED
    assert index.match(c) == {"w": 6}
    assert index.apply("w", ev(2, KvEventKind.CLEARED)) is ApplyResult.APPLIED
    assert index.match(c) == {}
    assert index.workers() == ["w"]


def test_a_gap_drops_the_worker_until_resync() -> None:
    index = KvIndex()
    c, d = CHAINS[0], CHAINS[2]
    index.apply("w", ev(0, KvEventKind.STORED, *c))
    index.apply("v", ev(0, KvEventKind.STORED, *c[:3]))
    assert index.apply("w", ev(2, KvEventKind.STORED, *d)) is ApplyResult.GAP  # seq 1 was lost
    assert index.match(c) == {"v": 3}  # w's entries dropped, v untouched
    assert index.needs_resync() == frozenset({"w"})
    assert index.apply("w", ev(3, KvEventKind.STORED, *d)) is ApplyResult.UNSYNCED
    assert index.match(d) == {}
    index.resync("w", c[:4] + d[:2], seq=3)  # the worker's holdings after its event 3
    assert index.needs_resync() == frozenset()
    assert index.match(c) == {"w": 4, "v": 3} and index.match(d) == {"w": 2}
    assert index.apply("w", ev(3, KvEventKind.STORED, 1, 2)) is ApplyResult.DUPLICATE
    assert index.apply("w", ev(4, KvEventKind.STORED, *d[2:5])) is ApplyResult.APPLIED
    assert index.match(d) == {"w": 5}


def test_first_event_past_zero_from_an_unknown_worker_is_a_gap() -> None:
    index = KvIndex()  # e.g. the router restarted while the worker kept running
    assert index.apply("w", ev(41, KvEventKind.STORED, *CHAINS[0])) is ApplyResult.GAP
    assert index.match(CHAINS[0]) == {}
    index.resync("w", CHAINS[0][:5], seq=41)
    assert index.apply("w", ev(42, KvEventKind.REMOVED, CHAINS[0][4])) is ApplyResult.APPLIED
    assert index.match(CHAINS[0]) == {"w": 4}


def test_resync_replaces_holdings_exactly() -> None:
    index = KvIndex()
    index.stored("w", CHAINS[0])
    index.stored("v", CHAINS[0][:2])
    index.resync("w", CHAINS[1][:6], seq=9)
    assert index.holdings("w") == frozenset(CHAINS[1][:6])
    assert index.match(CHAINS[0]) == {"w": 4, "v": 2}
    assert len(index) == len(set(CHAINS[1][:6]))
    with pytest.raises(ValueError, match="resync seq = -1"):
        index.resync("w", [], seq=-1)
    with pytest.raises(ValueError, match="KvEvent.seq = -2"):
        KvEvent(-2, KvEventKind.STORED)


def test_snapshot_round_trip_keeps_entries_and_sequence_state() -> None:
    index = KvIndex()
    index.apply("w", ev(0, KvEventKind.STORED, *CHAINS[0]))
    index.apply("w", ev(1, KvEventKind.REMOVED, CHAINS[0][9]))
    index.apply("v", ev(0, KvEventKind.STORED, *CHAINS[2]))
    index.apply("v", ev(5, KvEventKind.STORED, 1))  # gap: v awaits resync
    index.stored("raw", CHAINS[1][:3])  # fed without sequence numbers
    snap = index.snapshot()
    copy = KvIndex.from_snapshot(snap)
    for q in QUERIES:
        assert copy.match(q) == index.match(q)
    assert copy.snapshot() == snap
    assert copy.needs_resync() == frozenset({"v"})
    assert copy.apply("w", ev(2, KvEventKind.REMOVED, CHAINS[0][8])) is ApplyResult.APPLIED
    assert copy.match(CHAINS[0]) == {"w": 8, "raw": 3}
    assert copy.apply("v", ev(6, KvEventKind.STORED, 1)) is ApplyResult.UNSYNCED


@settings(derandomize=True, max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["stored", "held", "removed"]), hashes_st,
                  st.booleans()),
        max_size=40,
    )
)
def test_lossy_delivery_with_resync_converges_to_the_workers_state(steps: list[tuple]) -> None:
    """Workers emit numbered events; some are lost. Whenever the index reports a gap, the worker is
    re-synced from its true holdings. A worker whose latest event was delivered is then exactly
    right in the index; one whose latest event was lost is simply not yet known to be stale."""
    index = KvIndex()
    truth: dict[str, set[int]] = {}  # resumable
    truth_held: dict[str, set[int]] = {}  # held only
    seq: dict[str, int] = {}
    behind: set[str] = set()
    for w, op, hs, delivered in steps:
        s = seq[w] = seq.get(w, -1) + 1
        mine, mine_held = truth.setdefault(w, set()), truth_held.setdefault(w, set())
        if op == "stored":
            mine.update(hs)
            mine_held.difference_update(hs)
        elif op == "held":
            mine_held.update(hs)
            mine.difference_update(hs)
        else:
            mine.difference_update(hs)
            mine_held.difference_update(hs)
        if not delivered:
            behind.add(w)
            continue
        behind.discard(w)
        kind = KvEventKind.REMOVED if op == "removed" else KvEventKind.STORED
        result = index.apply(w, KvEvent(s, kind, tuple(hs), held_only=op == "held"))
        if result in (ApplyResult.GAP, ApplyResult.UNSYNCED):
            index.resync(w, mine, seq=s, held_only=mine_held)
        current = {k: v for k, v in truth.items() if k not in behind}
        current_all = {k: v | truth_held[k] for k, v in truth.items() if k not in behind}
        for q in QUERIES:
            got = {k: n for k, n in index.match(q).items() if k not in behind}
            assert got == reference_resume(current, current_all, q), q
            got = {k: n for k, n in index.match_held(q).items() if k not in behind}
            assert got == reference_match(current_all, q), q
        for k, v in current.items():
            assert index.holdings(k) == frozenset(v)
            assert index.held_only(k) == frozenset(truth_held[k])
    assert index.needs_resync() == frozenset()
