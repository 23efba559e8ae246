"""The prefill's handoff table on a fake clock: leases, claims, pins, releases, epochs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from transfer_peer import FakeClock

from workers.transfer.handoff import ClaimOutcome, HandoffPages, HandoffTable, ReleaseOutcome
from workers.transfer.metrics import TransferMetrics

pytestmark = pytest.mark.transfer

LEASE, PIN = 10.0, 3.0
PAGES = HandoffPages(block=(4, 5, 9), window=(1, 2), state=(0,))


class Harness:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.freed: list[tuple[str, HandoffPages, float]] = []
        self.metrics = TransferMetrics(CollectorRegistry())
        self.table = HandoffTable(
            "prefill-0",
            LEASE,
            PIN,
            lambda rid, p: self.freed.append((rid, p, self.clock())),
            self.clock,
            self.metrics,
        )

    def open(self, rid: str, pages: HandoffPages = PAGES):
        return self.table.open(rid, pages, num_tokens=700, window_start=512)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_claim_within_the_lease_is_granted_and_pins_until_the_pin_deadline(h):
    d = h.open("r")
    assert (d.epoch, d.agent, d.pages, d.lease_s) == (1, "prefill-0", PAGES, LEASE)
    h.clock.advance(LEASE - 0.001)
    answer = h.table.claim("r", d.epoch)
    assert (answer.outcome, answer.pin_s, answer.epoch) == (ClaimOutcome.GRANTED, PIN, 1)
    h.clock.advance(PIN - 0.001)  # past the lease, within the pin: the claim keeps the blocks
    assert h.table.expire() == () and h.freed == []
    h.clock.advance(0.001)  # the decode never released: the pin runs out
    assert h.table.expire() == ("r",)
    assert h.freed == [("r", PAGES, h.clock())]
    assert h.metrics.value("kv_lease_expiries_total") == 1


def test_release_frees_exactly_once(h):
    d = h.open("r")
    h.table.claim("r", d.epoch)
    h.clock.advance(PIN - 0.001)
    assert h.table.release("r", d.epoch) is ReleaseOutcome.RELEASED
    assert h.freed == [("r", PAGES, h.clock())]
    assert h.table.release("r", d.epoch) is ReleaseOutcome.GONE
    h.clock.advance(100)
    assert h.table.expire() == ()
    assert len(h.freed) == 1 and len(h.table) == 0
    assert h.metrics.value("kv_lease_expiries_total") == 0


def test_late_claim_is_expired_and_the_blocks_were_freed_at_the_deadline(h):
    d = h.open("r")
    h.clock.advance(LEASE - 0.001)
    assert h.table.expire() == ()
    h.clock.advance(0.001)
    assert h.table.expire() == ("r",)
    assert h.freed == [("r", PAGES, h.clock())]
    h.clock.advance(5)
    answer = h.table.claim("r", d.epoch)
    assert (answer.outcome, answer.pin_s) == (ClaimOutcome.EXPIRED, 0.0)
    assert len(h.freed) == 1
    assert h.metrics.value("kv_lease_expiries_total") == 1
    assert h.metrics.value("kv_handoff_claims_total", outcome="expired") == 1


def test_a_claim_after_the_deadline_expires_it_itself(h):
    d = h.open("r")
    h.clock.advance(LEASE)  # nobody polled expire() in between
    assert h.table.claim("r", d.epoch).outcome is ClaimOutcome.EXPIRED
    assert [f[0] for f in h.freed] == ["r"]


def test_double_claim_is_refused_and_keeps_the_pin(h):
    d = h.open("r")
    assert h.table.claim("r", d.epoch).outcome is ClaimOutcome.GRANTED
    second = h.table.claim("r", d.epoch)
    assert (second.outcome, second.pin_s) == (ClaimOutcome.ALREADY_CLAIMED, 0.0)
    assert h.freed == [] and h.table.is_live("r")
    assert h.metrics.value("kv_handoff_claims_total", outcome="granted") == 1
    assert h.metrics.value("kv_handoff_claims_total", outcome="already_claimed") == 1


def test_epoch_mismatch_is_detected(h):
    first = h.open("r")
    h.clock.advance(LEASE)
    h.table.expire()
    second = h.open("r")  # the request was prefilled again
    assert second.epoch == first.epoch + 1
    assert h.table.claim("r", first.epoch).outcome is ClaimOutcome.EPOCH_MISMATCH
    assert h.table.release("r", first.epoch) is ReleaseOutcome.EPOCH_MISMATCH
    assert h.table.claim("r", second.epoch + 5).outcome is ClaimOutcome.UNKNOWN
    assert h.table.claim("r", second.epoch).outcome is ClaimOutcome.GRANTED
    assert [f[0] for f in h.freed] == ["r"]  # only the first one, by its lease


def test_release_without_a_claim_is_refused(h):
    d = h.open("r")
    assert h.table.release("r", d.epoch) is ReleaseOutcome.NOT_CLAIMED
    assert h.table.is_live("r") and h.freed == []
    assert h.table.release("nobody", 1) is ReleaseOutcome.GONE
    assert h.table.release("nobody", 99) is ReleaseOutcome.UNKNOWN


def test_a_request_finished_at_the_prefill_frees_at_once(h):
    h.table.finish("done", PAGES)
    assert h.freed == [("done", PAGES, h.clock())]
    assert len(h.table) == 0
    assert h.table.claim("done", 1).outcome is ClaimOutcome.UNKNOWN  # no handoff ever existed
    h.open("r")
    with pytest.raises(ValueError, match="'r'.*handoff is open"):
        h.table.finish("r", PAGES)
    with pytest.raises(ValueError, match="'r' is already open"):
        h.open("r")


def test_bad_construction_and_empty_handoffs_are_refused(h):
    with pytest.raises(ValueError, match="lease_s"):
        HandoffTable("p", 0.0, PIN, lambda r, p: None, h.clock)
    with pytest.raises(ValueError, match="nothing to hand off"):
        h.table.open("e", HandoffPages((), (), (0,)), num_tokens=10, window_start=0)


# --- model-based: random operation sequences against a straightforward reference ---------------------
OPS = st.lists(
    st.tuples(st.sampled_from(["open", "claim", "release", "tick"]), st.integers(0, 3), st.floats(0, 6)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_sequences_match_a_reference_model(ops):
    """Each handoff is freed exactly once, at release or at/after its deadline, never earlier."""
    h = Harness()
    live: dict[str, tuple[int, bool, float]] = {}  # rid -> (epoch, claimed, deadline)
    last_epoch: dict[str, int] = {}
    want_freed: list[tuple[str, int]] = []
    opens = 0

    def expire_reference() -> None:
        for rid, (epoch, _, deadline) in list(live.items()):
            if h.clock() >= deadline:
                del live[rid]
                want_freed.append((rid, epoch))

    for op, k, dt in ops:
        rid = f"r{k}"
        if op == "open" and rid not in live:
            opens += 1
            d = h.open(rid, HandoffPages((opens,), (), ()))
            assert d.epoch == opens
            live[rid], last_epoch[rid] = (d.epoch, False, h.clock() + LEASE), d.epoch
        elif op == "claim" and rid in last_epoch:
            expire_reference()
            answer = h.table.claim(rid, last_epoch[rid])
            if rid not in live:
                assert answer.outcome is ClaimOutcome.EXPIRED
            elif live[rid][1]:
                assert answer.outcome is ClaimOutcome.ALREADY_CLAIMED
            else:
                assert answer.outcome is ClaimOutcome.GRANTED
                live[rid] = (live[rid][0], True, h.clock() + PIN)
        elif op == "release" and rid in live and live[rid][1]:
            assert h.table.release(rid, last_epoch[rid]) is ReleaseOutcome.RELEASED
            want_freed.append((rid, live.pop(rid)[0]))
        elif op == "tick":
            h.clock.advance(dt)
            expire_reference()
            h.table.expire()
        assert h.table.live() == tuple(live)
        assert [(rid, pages.block[0]) for rid, pages, _ in h.freed] == want_freed
    h.clock.advance(LEASE + PIN)
    h.table.expire()
    assert len(h.table) == 0 and len(h.freed) == opens
