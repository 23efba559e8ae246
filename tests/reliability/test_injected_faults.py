"""Faults configured in the spec's test-only `faults:` section, on one local deployment (1 prefill
+ 1 decode instance of deploy/local.yaml; transfer timeout 1 s; a 5 s lease, so that on a loaded
machine no handoff expires before its claim and shifts the READ numbering the faults count on):
- NIXL READs of the decode rank: READs #6 and #7 fail when posted, #9 and #10 hang (they report
  done 5 s late, past the 1 s transfer timeout); the decode recomputes those prompts;
- KV event #1 of every rank never reaches the event log: the router sees a gap at the next event
  and resyncs (the decode stores blocks only for prompts it recomputes: the faulted READs' four).
The first 6 requests (READs #0-#5) are the fault-free reference; the next 6 must stream exactly the
same tokens, then every rank is back to zero used blocks with no handoff held, and the router's KV
index equals each rank's snapshot.
"""

from __future__ import annotations

import random
import time

import pytest
from support import fault_load as fl

from orchestrator.spec import load_spec
from orchestrator.spec_faults import FaultsSpec

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

PROMPTS = [random.Random(50 + i).choices(range(256), k=300 + 70 * i) for i in range(6)]
MAX_TOKENS = 12
FAULTS = {"transfer": {"fail": {"skip": 6, "count": 2}, "delay": {"skip": 9, "count": 2}, "delay_s": 5.0},
          "kv_events": {"drop": {"skip": 1, "count": 1}}}


@pytest.fixture(scope="module")
def dep(ray_session):  # noqa: ANN001, ANN201
    spec = load_spec("deploy/local.yaml")
    spec = spec.model_copy(update={
        "transfer": spec.transfer.model_copy(update={"lease_s": 5.0, "timeout_s": 1.0}),
        "faults": FaultsSpec.model_validate(FAULTS),
    })
    d = fl.start(ray_session, spec)
    yield d
    fl.stop(ray_session, d)


def test_failed_and_hung_reads_are_recomputed_with_the_same_tokens(dep, ray_session) -> None:  # noqa: ANN001
    decode = dep.rank(ray_session, "decode-0")
    reference = fl.run(dep, PROMPTS, max_tokens=MAX_TOKENS, salt="ref")
    assert all(o.code is None for o in reference), [o.details for o in reference]
    pulls = ray_session.get(decode.pulls.remote())
    assert len(pulls) == 6 and all(err is None for *_, err in pulls), pulls  # READs #0-#5: no fault

    t0 = time.monotonic()
    faulted = fl.run(dep, PROMPTS, max_tokens=MAX_TOKENS, salt="faulted")
    took = time.monotonic() - t0
    for i, (o, r) in enumerate(zip(faulted, reference, strict=True)):
        assert o.code is None, f"request {i}: {o.code} {o.details}"
        assert o.tokens == r.tokens and o.last.usage.completion_tokens == MAX_TOKENS
    errors = [err for *_, err in ray_session.get(decode.pulls.remote())[6:] if err is not None]
    assert len(errors) == 4, errors
    assert sum("injected failure" in e for e in errors) == 2
    assert sum("deadline" in e for e in errors) == 2  # the hung READs ended by the timeout ...
    assert took < 30  # ... not by the 5 s delay each, let alone forever
    usage = fl.wait_idle(ray_session, dep)
    assert all(v == (0, 0, 0, 0) for v in usage.values()), f"(blocks, running, queued, handoffs): {usage}"


def test_dropped_kv_events_are_resynced_from_the_snapshot(dep, ray_session) -> None:  # noqa: ANN001
    # The first test's loads made events well past #1 on both ranks.
    resyncs = dep.metric("tandem_router_kv_resyncs_total")
    assert resyncs >= 4  # one per rank when the router registered it, then one per rank at its gap
    router = ray_session.get_actor("tandem-router", namespace=fl.NAMESPACE)
    for inst in ("prefill-0", "decode-0"):
        snapshot = ray_session.get(dep.rank(ray_session, inst).kv_snapshot.remote())
        end = time.monotonic() + 10
        while ray_session.get(router.kv_holdings.remote(inst, 0)) != frozenset(snapshot.block_hashes):
            assert time.monotonic() < end, f"the router's index of {inst} differs from its snapshot"
            time.sleep(0.2)
            snapshot = ray_session.get(dep.rank(ray_session, inst).kv_snapshot.remote())
        assert snapshot.block_hashes
