"""Layout signatures, pairing refusal before any byte moves, descriptor coalescing, wire messages,
huge-page backing of pool buffers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transfer_peer import PoolSpec

from workers.kv.entry import EntryLayout, KeyFormat
from workers.kv.geometry import KvGeometry, KvShape, PoolKind
from workers.kv.presets import Preset
from workers.transfer.agent import AgentConfig, TransferAgent
from workers.transfer.descriptors import (
    PoolPull,
    Region,
    Run,
    coalesce,
    descriptor_arrays,
    page_indices,
    plan_read,
    split_plan,
)
from workers.transfer.handoff import ClaimAnswer, ClaimOutcome
from workers.transfer.hugepages import HUGE, advise_hugepages
from workers.transfer.layout import LayoutMismatch, LayoutSignature, check_pairing
from workers.transfer.messages import BadMessage, Claim, Release, decode, encode

pytestmark = pytest.mark.transfer


def _sig(shape: KvShape) -> LayoutSignature:
    return LayoutSignature.of(KvGeometry.of(shape))


TINY = Preset.TINY.shape()


def test_equal_geometries_have_equal_signatures_and_digests():
    a, b = _sig(Preset.TINY.shape()), _sig(Preset.TINY.shape())
    assert a == b and a.digest == b.digest and a.differences(b) == []
    check_pairing(a, b, "peer")
    assert _sig(Preset.V4_FLASH.shape()).digest != a.digest


@pytest.mark.parametrize(
    ("changed", "fields"),
    [
        (TINY.with_key_format(KeyFormat.FP8), {"key_layout", "key_dtypes", "page_bytes", "page_segments"}),
        (
            dataclasses.replace(TINY, compress_ratios=TINY.compress_ratios[::-1]),
            {"layer_kinds", "page_segments"},
        ),
        (
            dataclasses.replace(TINY, entry=EntryLayout(TINY.entry.nope_dim, TINY.entry.rope_dim, 32)),
            {"entry_layout", "page_bytes", "page_segments"},
        ),
        (dataclasses.replace(TINY, block_size=512), {"block_size", "page_bytes", "page_segments"}),
    ],
    ids=["key-format", "layer-order", "scale-group", "block-size"],
)
def test_each_difference_is_named(changed, fields):
    mine, theirs = _sig(TINY), _sig(changed)
    named = {d.split(":")[0] for d in mine.differences(theirs)}
    assert named == fields
    assert mine.digest != theirs.digest
    with pytest.raises(LayoutMismatch, match="'decode-7'") as err:
        check_pairing(mine, theirs, "decode-7")
    for f in fields:
        assert f in str(err.value)


def test_a_layout_mismatch_refuses_the_pairing_before_any_byte_moves():
    fp4, fp8 = PoolSpec(), PoolSpec(key_format=KeyFormat.FP8)
    a = TransferAgent(AgentConfig("layout-a"), fp4.pools(fill=True), LayoutSignature.of(fp4.geometry()))
    b_pools = fp8.pools(fill=False)
    b = TransferAgent(AgentConfig("layout-b"), b_pools, LayoutSignature.of(fp8.geometry()))
    try:
        with pytest.raises(LayoutMismatch, match="key_layout"):
            b.pair(a.info())
        assert not b.is_paired("layout-a")
        with pytest.raises(KeyError, match="has not paired with 'layout-a'"):
            b.peer_pages("layout-a")
        assert all(int(p.buffer.count_nonzero()) == 0 for p in b_pools.values())
        # the same agents with matching layouts pair fine
        c = TransferAgent(AgentConfig("layout-c"), fp4.pools(fill=False), LayoutSignature.of(fp4.geometry()))
        c.pair(a.info())
        assert c.is_paired("layout-a")
        c.close()
    finally:
        a.close()
        b.close()


# --- coalescing -------------------------------------------------------------------------------------
def test_coalesce_merges_only_pairs_consecutive_on_both_sides():
    src = [5, 6, 7, 20, 3, 40, 41, 42]
    dst = [10, 11, 30, 31, 32, 0, 1, 2]
    assert coalesce(src, dst) == (Run(5, 10, 2), Run(7, 30, 1), Run(20, 31, 1), Run(3, 32, 1), Run(40, 0, 3))
    assert coalesce([], []) == ()
    with pytest.raises(ValueError, match="3 source pages but 2"):
        coalesce([1, 2, 3], [1, 2])


pairs = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        st.permutations(range(64)).map(lambda p: p[:n]), st.permutations(range(64)).map(lambda p: p[:n])
    )
)


@settings(max_examples=200, deadline=None)
@given(pairs, st.booleans())
def test_coalesced_runs_expand_back_to_the_pairs_and_are_maximal(sd, sort):
    src, dst = sd
    if sort:  # mostly contiguous allocations, the common case
        src, dst = sorted(src), sorted(dst)
    runs = coalesce(src, dst)
    expanded = [(r.src + i, r.dst + i) for r in runs for i in range(r.pages)]
    assert expanded == list(zip(src, dst, strict=True))
    for a, b in zip(runs, runs[1:], strict=False):
        assert (b.src, b.dst) != (a.src + a.pages, a.dst + a.pages)


def test_descriptor_arrays_and_prepped_indices_address_the_same_bytes():
    local = {
        PoolKind.BLOCK: Region(PoolKind.BLOCK, 1_000_000, 100, 50),
        PoolKind.STATE: Region(PoolKind.STATE, 9_000_000, 7, 4),
    }
    remote = {
        PoolKind.BLOCK: Region(PoolKind.BLOCK, 5_000_000, 100, 80),
        PoolKind.STATE: Region(PoolKind.STATE, 7_000_000, 7, 2),
    }
    plan = plan_read(
        [
            PoolPull(PoolKind.BLOCK, (3, 4, 9), (10, 11, 12)),
            PoolPull(PoolKind.WINDOW, (), ()),
            PoolPull(PoolKind.STATE, (1,), (3,)),
        ],
        {PoolKind.BLOCK: 100, PoolKind.WINDOW: 999, PoolKind.STATE: 7},
    )
    assert (plan.nbytes, plan.num_descriptors, plan.num_pages) == (307, 3, 4)
    la, ra = descriptor_arrays(plan, local, remote)
    assert la.tolist() == [[1_001_000, 200, 0], [1_001_200, 100, 0], [9_000_021, 7, 0]]
    assert ra.tolist() == [[5_000_300, 200, 0], [5_000_900, 100, 0], [7_000_007, 7, 0]]
    # per-page prepped lists: pools back to back, BLOCK first; each index is one page of the runs above
    li, ri = page_indices(
        plan, {PoolKind.BLOCK: 0, PoolKind.STATE: 50}, {PoolKind.BLOCK: 0, PoolKind.STATE: 80}
    )
    assert li.tolist() == [10, 11, 12, 53] and ri.tolist() == [3, 4, 9, 81]
    assert li.dtype == np.int32
    with pytest.raises(IndexError, match="remote block page 80 outside pool of 80"):
        bad = plan_read([PoolPull(PoolKind.BLOCK, (80,), (0,))], {PoolKind.BLOCK: 100})
        descriptor_arrays(bad, local, remote)


PAGE = {PoolKind.BLOCK: 900, PoolKind.WINDOW: 4100, PoolKind.STATE: 11900}


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(0, 3), st.integers(1, 5), st.randoms(use_true_random=False))
def test_split_plans_cover_the_plan_in_order_with_balanced_bytes(blocks, windows, parts, rnd):
    src = {k: rnd.sample(range(100), n) for k, n in ((PoolKind.BLOCK, blocks), (PoolKind.WINDOW, windows))}
    src[PoolKind.STATE] = [rnd.randrange(4)]
    pulls = [PoolPull(k, tuple(v), tuple(sorted(v))) for k, v in src.items()]
    plan = plan_read(pulls, PAGE)
    pieces = split_plan(plan, parts, PAGE)

    def pages(p):
        return [(pool, r.src + i, r.dst + i) for pool, runs in p.runs for r in runs for i in range(r.pages)]

    assert 1 <= len(pieces) <= parts
    assert [x for piece in pieces for x in pages(piece)] == pages(plan)
    assert sum(piece.nbytes for piece in pieces) == plan.nbytes
    ideal = plan.nbytes / len(pieces) if len(pieces) == parts else None
    if ideal is not None:  # every part within one (largest) page of an equal share
        assert all(abs(piece.nbytes - ideal) <= max(PAGE.values()) for piece in pieces)


# --- wire messages ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "msg",
    [
        Claim("req-1", 3),
        Release("req-1", 3),
        ClaimAnswer("req-1", 3, ClaimOutcome.GRANTED, 30.0),
        ClaimAnswer("r", 1, ClaimOutcome.EXPIRED, 0.0),
    ],
)
def test_messages_round_trip(msg):
    assert decode(encode(msg), "peer") == msg


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b'["claim", 1, 2]', b'["nope", "r", 1]', b'["answer", "r", 1, "maybe", 0]']
)
def test_malformed_messages_are_refused_naming_the_sender(raw):
    with pytest.raises(BadMessage, match="'decode-3'"):
        decode(raw, "decode-3")


# --- huge pages -------------------------------------------------------------------------------------
def _thp_allowed() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as fh:
            return "[never]" not in fh.read()
    except OSError:
        return False


def _huge_kib(lo: int, hi: int) -> int:
    """AnonHugePages (KiB) of this process's mappings that overlap [lo, hi)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a < hi and b > lo
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not _thp_allowed(), reason="transparent huge pages are disabled on this host")
def test_advise_hugepages_puts_the_aligned_interior_on_huge_pages():
    buf = torch.ones(9 << 20, dtype=torch.uint8)
    lo = buf.data_ptr()
    interior = ((lo + buf.numel()) // HUGE - -(-lo // HUGE)) * HUGE
    report = advise_hugepages(buf)
    assert report.ok, report.error
    assert (report.nbytes, report.collapsed) == (buf.numel(), interior)
    assert _huge_kib(lo, lo + buf.numel()) * 1024 >= interior
    assert bool((buf == 1).all())  # collapsing keeps the bytes
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        advise_hugepages(buf.view(3, -1)[:, ::2])
