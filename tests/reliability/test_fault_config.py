"""Fault injection is off by default, picks exactly what its config says (by position, then by a
seeded draw), reaches the ranks from the spec, and acts at the transport wrapper and the event log."""

from __future__ import annotations

import pytest

from orchestrator.spec import SpecError, load_spec, parse_spec
from orchestrator.worker_plan import instance_plan
from workers.engine.engine import Role
from workers.faults import EventDropper, FaultConfig, FaultPick
from workers.transfer.transport import FaultHooks, FaultyTransport, TransferFailed

pytestmark = pytest.mark.reliability


def test_a_pick_hits_skip_then_count_then_a_seeded_share() -> None:
    pick = FaultPick(skip=2, count=3)
    assert [i for i in range(10) if pick.hits(i)] == [2, 3, 4]
    seeded = FaultPick(skip=1, probability=0.25, seed=5)
    hits = [i for i in range(4000) if seeded.hits(i)]
    assert 0 not in hits and 850 < len(hits) < 1150  # ~1000 of 3999, binomial sd ~27
    assert hits == [i for i in range(4000) if FaultPick(skip=1, probability=0.25, seed=5).hits(i)]
    assert hits != [i for i in range(4000) if FaultPick(skip=1, probability=0.25, seed=6).hits(i)]
    assert not FaultPick().enabled and not any(FaultPick().hits(i) for i in range(100))


@pytest.mark.parametrize("kw", [{"skip": -1}, {"count": -2}, {"probability": 1.5}])
def test_a_bad_pick_is_refused_naming_the_value(kw: dict) -> None:
    with pytest.raises(ValueError, match="FaultPick"):
        FaultPick(**kw)


def test_a_delay_without_seconds_is_refused() -> None:
    with pytest.raises(ValueError, match="read_delay_s"):
        FaultConfig(delay_reads=FaultPick(count=1))


def test_the_dropper_drops_the_picked_events_across_calls() -> None:
    d = EventDropper(FaultPick(skip=3, count=2))
    assert d.keep(list(range(4))) == (0, 1, 2)  # event #3 dropped
    assert d.keep([4, 5, 6]) == (5, 6)  # #4 dropped, then nothing more
    assert (d.seen, d.dropped) == (7, 2)


class _Read:
    """A READ that lands on its second poll."""

    def __init__(self) -> None:
        self.posted = self.closed = False
        self.polls = 0

    def post(self) -> None:
        self.posted = True

    def done(self) -> bool:
        self.polls += 1
        return self.polls >= 2

    def close(self) -> None:
        self.closed = True


class _Transport:
    def __init__(self) -> None:
        self.reads: list[_Read] = []

    def prepare(self, peer: str, plan: object) -> _Read:
        self.reads.append(_Read())
        return self.reads[-1]


def test_the_transport_wrapper_fails_and_delays_the_planned_reads() -> None:
    now = [0.0]
    plan = FaultConfig(fail_reads=FaultPick(skip=1, count=1), delay_reads=FaultPick(skip=2, count=1), read_delay_s=5)
    hooks = FaultHooks(plan=plan)
    inner = _Transport()
    t = FaultyTransport(inner, hooks, clock=lambda: now[0])
    ok = t.prepare("p", None)
    ok.post()
    assert not ok.done() and ok.done()  # READ #0: untouched
    failing = t.prepare("p", None)
    with pytest.raises(TransferFailed, match="READ #1 .*injected failure"):
        failing.post()
    assert not inner.reads[1].posted  # no byte moved
    late = t.prepare("p", None)
    late.post()
    assert not late.done() and not late.done()  # landed at t=0, reported only from t=5
    now[0] = 4.9
    assert not late.done()
    now[0] = 5.0
    assert late.done()
    assert (hooks.reads, hooks.failed, hooks.delayed) == (3, 1, 1)


FAULTS = {"transfer": {"fail": {"count": 2}, "delay": {"skip": 3, "probability": 0.5, "seed": 9}, "delay_s": 2},
          "kv_events": {"drop": {"skip": 1, "count": 1}}}


def _data(**extra: object) -> dict:
    data = load_spec("deploy/local.yaml").model_dump(mode="json")
    data.pop("faults", None)
    return data | extra


def test_faults_are_off_unless_the_spec_says_so() -> None:
    spec = parse_spec(_data())
    for role in (Role.PREFILL, Role.DECODE):
        cfg = instance_plan(spec, role, "x-0").configs[0].faults
        assert cfg == FaultConfig() and not cfg.reads_enabled and not cfg.drop_kv_events.enabled


def test_the_spec_faults_reach_every_rank_config() -> None:
    spec = parse_spec(_data(faults=FAULTS))
    cfg = instance_plan(spec, Role.DECODE, "decode-0").configs[0].faults
    assert cfg == FaultConfig(fail_reads=FaultPick(count=2), delay_reads=FaultPick(skip=3, probability=0.5, seed=9),
                              read_delay_s=2.0, drop_kv_events=FaultPick(skip=1, count=1))
    assert instance_plan(spec, Role.PREFILL, "prefill-0").configs[0].faults == cfg


@pytest.mark.parametrize(("faults", "where"), [
    ({"transfer": {"delay": {"count": 1}}}, "delay_s is 0"),
    ({"transfer": {"fail": {"probability": 2}}}, "faults.transfer.fail.probability"),
    ({"kv_events": {"drop": {"every": 3}}}, "faults.kv_events.drop.every: unknown field"),
])
def test_a_bad_faults_section_names_the_field(faults: dict, where: str) -> None:
    with pytest.raises(SpecError, match=where):
        parse_spec(_data(faults=faults))
