"""Two agents in two OS processes: a prefill child serves handoffs, this process pulls them.

The expected bytes are rebuilt here from the child's seed (never read back through NIXL), so a
pull that moved the wrong pages, or nothing, fails.
"""

from __future__ import annotations

import time

import pytest
import torch
from prometheus_client import CollectorRegistry
from transfer_peer import Advance, Corrupt, Open, PoolSpec, PrefillProcess, PrefillSpec, Serve

from workers.kv.geometry import PoolKind
from workers.transfer.agent import AgentConfig, TransferAgent
from workers.transfer.handoff import ClaimOutcome, HandoffPages
from workers.transfer.layout import LayoutSignature
from workers.transfer.messages import Inbox
from workers.transfer.metrics import TransferMetrics
from workers.transfer.pull import HandoffExpired, Puller
from workers.transfer.transport import FaultHooks, FaultyTransport, NixlTransport, TransferFailed

pytestmark = pytest.mark.transfer

SPEC = PrefillSpec("prefill-0", PoolSpec(seed=1234), lease_s=5.0, pin_s=60.0)
# Scattered on purpose: runs of 3, 1, 2 on the source, broken differently on the destination.
SRC = HandoffPages(block=(5, 6, 7, 20, 3, 40, 41), window=(9, 2), state=(1,))
DST = HandoffPages(block=(10, 11, 30, 31, 32, 0, 1), window=(4, 5), state=(3,))
TIMEOUT_S = 20.0


class Decode:
    """This process's decode rank: pools, agent, puller with a fresh metrics registry."""

    def __init__(self, prefill: PrefillProcess, prepped_min_runs: int, lanes: int = 1) -> None:
        self.pools = SPEC.pools.pools(fill=False)
        for pool in self.pools.values():
            pool.buffer.fill_(0xA5)  # not a value a pull would leave by chance everywhere
        layout = LayoutSignature.of(SPEC.pools.geometry())
        config = AgentConfig(f"decode-{prepped_min_runs}-{lanes}", lanes=lanes)
        self.agent = TransferAgent(config, self.pools, layout)
        self.agent.pair(prefill.info)
        prefill.pair(self.agent.info())
        self.hooks = FaultHooks()
        self.metrics = TransferMetrics(CollectorRegistry())
        self.transport = NixlTransport(self.agent, prepped_min_runs)
        transport = FaultyTransport(self.transport, self.hooks)
        self.puller = Puller(Inbox(self.agent), transport, self.metrics)

    def page(self, pool: PoolKind, page: int) -> torch.Tensor:
        return self.pools[pool].buffer[page].clone()


@pytest.fixture(scope="module")
def prefill():
    proc = PrefillProcess(SPEC)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference() -> dict[PoolKind, torch.Tensor]:
    """The prefill's pool contents, rebuilt from its seed in this process."""
    return {k: p.buffer for k, p in SPEC.pools.pools(fill=True).items()}


@pytest.fixture(scope="module")
def decodes(prefill):
    """Decode ranks over the same prefill: one building coalesced lists per call, one using the
    per-page lists prepped at pairing, one cutting each READ over two lanes."""
    ranks = {
        "coalesced": Decode(prefill, prepped_min_runs=10**6),
        "prepped": Decode(prefill, prepped_min_runs=1),
        "two-lanes": Decode(prefill, prepped_min_runs=1, lanes=2),
    }
    yield ranks
    for rank in ranks.values():
        rank.transport.close()
        rank.agent.close()


def _open(prefill: PrefillProcess, rid: str, pages: HandoffPages = SRC):
    return prefill.call(Open(rid, pages.block, pages.window, pages.state, num_tokens=len(pages.block) * 256))


def _expected_runs(src: tuple[int, ...], dst: tuple[int, ...]) -> int:
    """Descriptor count by a different route than descriptors.coalesce: count breaks."""
    return 1 + sum(1 for i in range(1, len(src)) if (src[i] - src[i - 1], dst[i] - dst[i - 1]) != (1, 1))


@pytest.mark.parametrize("path", ["coalesced", "prepped", "two-lanes"])
def test_scattered_pull_moves_exactly_the_handoff_bytes(prefill, reference, decodes, path):
    d = decodes[path]
    before = {k: p.buffer.clone() for k, p in d.pools.items()}
    desc = _open(prefill, f"bytes-{path}")
    result = d.puller.pull(desc, DST, cached_blocks=0, timeout_s=TIMEOUT_S)

    touched = {k: set() for k in PoolKind}
    for kind in PoolKind:
        for s, t in zip(SRC.of(kind), DST.of(kind), strict=True):
            assert torch.equal(d.page(kind, t), reference[kind][s]), f"{kind.value} page {s} -> {t}"
            touched[kind].add(t)
        for t in range(d.pools[kind].num_pages):
            if t not in touched[kind]:
                assert torch.equal(d.pools[kind].buffer[t], before[kind][t]), (
                    f"{kind.value} page {t} was written"
                )

    page_bytes = {k: p.page_bytes for k, p in d.pools.items()}
    want_bytes = sum(len(SRC.of(k)) * page_bytes[k] for k in PoolKind)
    want_descs = sum(_expected_runs(SRC.of(k), DST.of(k)) for k in PoolKind)
    assert (result.nbytes, result.descriptors, result.blocks_pulled) == (want_bytes, want_descs, 7)
    assert d.metrics.value("kv_transfer_bytes_total") == want_bytes
    assert d.metrics.value("kv_transfer_descriptors_total") == want_descs
    assert d.metrics.value("kv_transfer_seconds_count") == 1
    freed = prefill.wait_freed(desc.request_id)
    assert (desc.request_id, SRC) in freed
    assert desc.request_id not in prefill.status()[0]


def test_prefix_cached_blocks_are_not_pulled(prefill, reference, decodes):
    d = decodes["coalesced"]
    for t in DST.block[:2]:
        d.pools[PoolKind.BLOCK].buffer[t].fill_(0x11)  # the decode's own cached copy
    bytes_before = d.metrics.value("kv_transfer_bytes_total")
    desc = _open(prefill, "prefix")
    result = d.puller.pull(desc, DST, cached_blocks=2, timeout_s=TIMEOUT_S)
    full = sum(len(SRC.of(k)) * d.pools[k].page_bytes for k in PoolKind)
    assert result.nbytes == full - 2 * d.pools[PoolKind.BLOCK].page_bytes
    assert (result.blocks_pulled, result.blocks_skipped) == (5, 2)
    assert d.metrics.value("kv_transfer_bytes_total") - bytes_before == result.nbytes
    for t in DST.block[:2]:
        assert bool((d.page(PoolKind.BLOCK, t) == 0x11).all())
    for s, t in zip(SRC.block[2:], DST.block[2:], strict=True):
        assert torch.equal(d.page(PoolKind.BLOCK, t), reference[PoolKind.BLOCK][s])
    prefill.wait_freed(desc.request_id)


def test_corruption_before_the_pull_is_seen_after_it_is_not(prefill, reference, decodes):
    d = decodes["prepped"]
    src_page, dst_page, offset = SRC.block[3], DST.block[3], 777
    assert prefill.call(Corrupt(PoolKind.BLOCK, src_page, offset))
    desc = _open(prefill, "corrupt")
    d.puller.pull(desc, DST, cached_blocks=0, timeout_s=TIMEOUT_S)
    got = d.page(PoolKind.BLOCK, dst_page)
    want = reference[PoolKind.BLOCK][src_page].clone()
    want[offset] = (int(want[offset]) + 1) % 256
    assert torch.equal(got, want)
    assert int(got[offset]) != int(reference[PoolKind.BLOCK][src_page][offset])

    prefill.wait_freed(desc.request_id)
    assert prefill.call(Corrupt(PoolKind.BLOCK, src_page, offset + 1))
    assert torch.equal(d.page(PoolKind.BLOCK, dst_page), want)  # a finished pull is a copy


def test_late_claim_is_expired_and_the_blocks_were_freed(prefill, decodes):
    d = decodes["coalesced"]
    before = d.pools[PoolKind.BLOCK].buffer.clone()
    failures = d.metrics.value("kv_transfer_failures_total")
    desc = _open(prefill, "late")
    assert prefill.call(Advance(SPEC.lease_s + 0.001))
    freed = prefill.wait_freed(desc.request_id)  # expired by the prefill's own poll
    assert (desc.request_id, SRC) in freed
    with pytest.raises(HandoffExpired, match="lease expired"):
        d.puller.pull(desc, DST, cached_blocks=0, timeout_s=TIMEOUT_S)
    assert torch.equal(d.pools[PoolKind.BLOCK].buffer, before)  # no byte moved
    assert d.metrics.value("kv_transfer_failures_total") == failures + 1
    answers = prefill.status()[2]
    assert [a.outcome for a in answers if a.request_id == desc.request_id] == [ClaimOutcome.EXPIRED]


def test_a_failed_read_releases_at_once(prefill, decodes):
    d = decodes["coalesced"]
    desc = _open(prefill, "fail")
    d.hooks.fail_next = 1
    with pytest.raises(TransferFailed, match="injected"):
        d.puller.pull(desc, DST, cached_blocks=0, timeout_s=TIMEOUT_S)
    assert d.hooks.fail_next == 0
    prefill.wait_freed(desc.request_id)  # by the release, long before any lease or pin runs out


class _ClockJumpsOnPost:
    """A transport wrapper that moves the test's clock `by` seconds the moment a READ is posted."""

    def __init__(self, inner, offset: list[float], by: float) -> None:
        self.inner, self.offset, self.by = inner, offset, by

    def prepare(self, peer, plan):
        read = self.inner.prepare(peer, plan)
        post = read.post

        def post_and_jump() -> None:
            post()
            self.offset[0] += self.by

        read.post = post_and_jump
        return read


def test_a_read_that_outlasts_its_pin_is_abandoned(prefill, decodes):
    d = decodes["prepped"]
    desc = _open(prefill, "slow")
    offset = [0.0]

    def clock() -> float:
        return time.monotonic() + offset[0]

    # the bytes land at once but the READ reports completion only after the pin has run out
    hooks = FaultHooks(delay_s=SPEC.pin_s + 5)
    transport = _ClockJumpsOnPost(
        FaultyTransport(NixlTransport(d.agent), hooks, clock), offset, SPEC.pin_s + 1
    )
    puller = Puller(Inbox(d.agent), transport, d.metrics, clock)
    bytes_before = d.metrics.value("kv_transfer_bytes_total")
    with pytest.raises(TransferFailed, match="in progress at its deadline"):
        puller.pull(desc, DST, cached_blocks=0, timeout_s=10 * SPEC.pin_s)
    assert d.metrics.value("kv_transfer_bytes_total") == bytes_before
    prefill.wait_freed(desc.request_id)  # released at once, not left to the pin


def test_a_claim_answered_too_late_is_dropped_and_the_pin_runs_out(prefill, decodes):
    d = decodes["coalesced"]
    desc = _open(prefill, "no-answer")
    inbox = Inbox(d.agent)
    puller = Puller(inbox, NixlTransport(d.agent), d.metrics)
    assert prefill.call(Serve(False))  # the prefill's loop is stuck: the claim waits unanswered
    try:
        with pytest.raises(TransferFailed, match="no answer to the claim"):
            puller.pull(desc, DST, cached_blocks=0, timeout_s=0.2)
    finally:
        assert prefill.call(Serve(True))
    # now the prefill pins it and answers; the late answer reaches this inbox and is dropped
    assert inbox.abandoned() == 1
    deadline = time.monotonic() + 10
    while inbox.abandoned():
        assert time.monotonic() < deadline, "the late answer never arrived"
        inbox.poll()
        time.sleep(0.002)
    assert inbox.pending_answers() == 0
    answers = [a for a in prefill.status()[2] if a.request_id == desc.request_id]
    assert [a.outcome for a in answers] == [ClaimOutcome.GRANTED]
    assert desc.request_id in prefill.status()[0]  # pinned, not freed early
    assert prefill.call(Advance(SPEC.pin_s))
    prefill.wait_freed(desc.request_id)
