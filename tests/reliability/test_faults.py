"""Real faults during a running load on one local deployment (2 prefill + 2 decode instances of
deploy/local.yaml; leases, transfer timeouts and health checks of 1 s or less).

Each test sends a bounded set of greedy (for the decode kill also seeded) ignore_eos requests,
injects its fault mid-run (a decode killed with ray.kill, a prefill SIGKILLed mid-prefill, a decode
drained past its timeout, the router actor killed), and checks that every request streamed exactly
the tokens of a fault-free run of the same prompts (or, for streams the dead router itself carried,
ended with a clear gRPC status), that the controller put the fleet back, and that afterwards every
rank is back to zero used KV blocks, nothing running or queued, and no handoff held.
"""

from __future__ import annotations

import os
import random
import signal
import time

import grpc
import pytest
from support import fault_load as fl

from orchestrator.spec import load_spec
from tandem.v1 import generate_pb2

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

MAX_TOKENS = 24
SHORT = [random.Random(i).choices(range(256), k=40 + 60 * i) for i in range(6)]  # 40..340 tokens
LONG = [random.Random(100 + i).choices(range(256), k=1000 + 100 * i) for i in range(4)]  # 1000..1300 tokens
LONG_MAX_TOKENS = 8
SEEDED = {"temperature": 0.8, "seed": 4242}


def _spec():  # noqa: ANN202
    spec = load_spec("deploy/local.yaml")
    return spec.model_copy(update={
        "prefill": spec.prefill.model_copy(update={"instances": 2}),
        "decode": spec.decode.model_copy(update={"instances": 2}),
        "transfer": spec.transfer.model_copy(update={"lease_s": 1.0, "timeout_s": 1.0}),
    })


@pytest.fixture(scope="module")
def dep(ray_session):  # noqa: ANN001, ANN201
    d = fl.start(ray_session, _spec())
    yield d
    fl.stop(ray_session, d)


@pytest.fixture(scope="module")
def reference(dep):  # noqa: ANN001, ANN201
    """Fault-free tokens of both prompt sets, from the same deployment before any fault."""
    short = fl.run(dep, SHORT, max_tokens=MAX_TOKENS, salt="ref")
    seeded = fl.run(dep, SHORT[:3], max_tokens=MAX_TOKENS, salt="ref", extra=SEEDED)
    long = fl.run(dep, LONG, max_tokens=LONG_MAX_TOKENS, salt="ref")
    for o in short + seeded + long:
        assert o.code is None, o.details
    return {"short": [o.tokens for o in short], "seeded": [o.tokens for o in seeded],
            "long": [o.tokens for o in long]}


def _assert_same_tokens(outcomes: list[fl.Outcome], want: list[list[int]], max_tokens: int) -> None:
    for i, (o, w) in enumerate(zip(outcomes, want, strict=True)):
        assert o.code is None, f"request {i} ended {o.code}: {o.details}"
        assert o.tokens == w, f"request {i}: tokens differ from the fault-free run"
        finals = [c for c in o.chunks if c.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED]
        assert finals == [o.last] and o.last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert o.last.usage.completion_tokens == max_tokens == len(w)


def _assert_idle(ray, dep: fl.Deployment) -> None:  # noqa: ANN001
    usage = fl.wait_idle(ray, dep)
    assert all(v == (0, 0, 0, 0) for v in usage.values()), f"(blocks, running, queued, handoffs): {usage}"


def test_decode_killed_mid_stream_requests_migrate(dep, reference, ray_session) -> None:  # noqa: ANN001
    before = dep.metric("tandem_router_migrations_total")
    seeded = fl.Load(dep, SHORT[:3], max_tokens=MAX_TOKENS, salt="kill-decode-seeded", extra=SEEDED).start()
    load = fl.Load(dep, SHORT, max_tokens=MAX_TOKENS, salt="kill-decode").start()
    load.wait_streamed(30)
    victim = fl.busiest(ray_session, dep, "decode")
    ray_session.kill(dep.rank(ray_session, victim), no_restart=True)
    outcomes = load.finish()
    _assert_same_tokens(outcomes, reference["short"], MAX_TOKENS)
    _assert_same_tokens(seeded.finish(), reference["seeded"], MAX_TOKENS)  # sampled, seeded: same too
    assert dep.metric("tandem_router_migrations_total") - before >= 1
    fl.wait_ready(ray_session, dep, 2, 2)  # the health loop replaced the dead instance
    assert victim not in dep.instances("decode")
    _assert_idle(ray_session, dep)


def test_prefill_sigkilled_mid_prefill_requests_prefill_elsewhere(dep, reference, ray_session) -> None:  # noqa: ANN001
    before = dep.metric("tandem_router_migrations_total")
    load = fl.Load(dep, LONG, max_tokens=LONG_MAX_TOKENS, salt="kill-prefill").start()
    victim = fl.wait_busy(ray_session, dep, "prefill", 2)  # two prompts queued or being prefilled there
    pid = ray_session.get(dep.rank(ray_session, victim).pid.remote(), timeout=10)
    os.kill(pid, signal.SIGKILL)
    outcomes = load.finish()
    _assert_same_tokens(outcomes, reference["long"], LONG_MAX_TOKENS)
    assert dep.metric("tandem_router_migrations_total") - before >= 1
    fl.wait_ready(ray_session, dep, 2, 2)
    assert victim not in dep.instances("prefill")
    _assert_idle(ray_session, dep)


def test_drain_past_its_timeout_migrates_the_running_requests(dep, reference, ray_session) -> None:  # noqa: ANN001
    load = fl.Load(dep, SHORT, max_tokens=MAX_TOKENS, salt="drain").start()
    load.wait_streamed(30)
    victim = fl.busiest(ray_session, dep, "decode")
    t0 = time.monotonic()
    ray_session.get(dep.ctl.drain.remote(victim, 0.3), timeout=60)
    drained_in = time.monotonic() - t0
    outcomes = load.finish()
    _assert_same_tokens(outcomes, reference["short"], MAX_TOKENS)
    assert drained_in < 10 and victim not in [i["id"] for i in dep.refresh(ray_session)["instances"]]
    ray_session.get(dep.ctl.scale.remote(None, 2), timeout=120)
    fl.wait_ready(ray_session, dep, 2, 2)
    _assert_idle(ray_session, dep)


def test_router_killed_is_restarted_with_its_kv_index_rebuilt(dep, reference, ray_session) -> None:  # noqa: ANN001
    prompt = [random.Random(7).randrange(256) for _ in range(700)]  # two full 256-token blocks
    first = fl.run(dep, [prompt], max_tokens=4, salt="router")[0]
    assert first.code is None, first.details
    holder = first.last.prefill_worker.split("/")[0]
    old_router = ray_session.get_actor("tandem-router", namespace=fl.NAMESPACE)
    held = ray_session.get(old_router.kv_holdings.remote(holder, 0))
    assert held, f"the router's index holds nothing for {holder}"

    address = dep.status["router_address"]
    load = fl.Load(dep, SHORT, max_tokens=MAX_TOKENS, salt="router-load").start()
    load.wait_streamed(30)
    ray_session.kill(old_router, no_restart=True)
    for i, o in enumerate(load.finish()):  # streams the dead router carried: completed or a clear status
        assert o.code in (None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (i, o.code, o.details)
        if o.code is None:
            assert o.tokens == reference["short"][i]

    end = time.monotonic() + 30
    while True:  # the controller's health loop starts a new router on the same address
        try:
            router = ray_session.get_actor("tandem-router", namespace=fl.NAMESPACE)
            if router._actor_id != old_router._actor_id and ray_session.get(router.start.remote(), timeout=5):
                break
        except (ValueError, ray_session.exceptions.RayError):
            pass
        assert time.monotonic() < end, "no new router within 30 s"
        time.sleep(0.2)
    assert dep.refresh(ray_session)["router_address"] == address
    end = time.monotonic() + 15
    while True:  # the controller registers every rank with the new router after starting it
        snapshot = ray_session.get(dep.rank(ray_session, holder).kv_snapshot.remote())
        rebuilt = ray_session.get(router.kv_holdings.remote(holder, 0))
        if rebuilt == frozenset(snapshot.block_hashes):
            break
        assert time.monotonic() < end, f"the new router's index of {holder} differs from its snapshot"
        time.sleep(0.2)
    assert held <= rebuilt
    want = {(i, 0) for i in dep.instances("prefill") + dep.instances("decode")}
    end = time.monotonic() + 15
    while True:  # every rank registered again (the controller adds them one after another)
        snap = ray_session.get(router.load_snapshot.remote())
        if {(r.instance, r.rank) for r in snap.ranks} >= want:
            break
        assert time.monotonic() < end, f"the new router has {len(snap.ranks)} of {len(want)} ranks"
        time.sleep(0.2)

    again = fl.run(dep, [prompt], max_tokens=4, salt="router")[0]
    assert again.code is None, again.details
    assert again.tokens == first.tokens and again.last.prefill_worker == first.last.prefill_worker
    assert again.last.usage.cached_tokens >= 512
    _assert_idle(ray_session, dep)
