"""The frontend's migration logic against scripted workers (tests/support/faulty_gateway.py): a worker
lost while it holds a request moves the request to another, and the client's stream is exactly
the fault-free one: the same tokens in order, none twice, none missing, one final chunk whose usage
counts them all. Past the per-request limit the request ends UNAVAILABLE, naming the losses."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from support.faulty_gateway import FaultyWorkers, faulty_frontend, scripted_tokens

from orchestrator.router.frontend import ErrorCode, RouterError
from orchestrator.router.inputs import DisaggMode, WorkerId
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.reliability

PROMPT = list(range(40, 90))
P0, P1, D0, D1 = WorkerId("prefill-0"), WorkerId("prefill-1"), WorkerId("decode-0"), WorkerId("decode-1")


def _run(gw: FaultyWorkers, max_tokens: int = 12, **kw) -> tuple[list[generate_pb2.GenerateChunk], CollectorRegistry]:  # noqa: ANN003
    registry = CollectorRegistry()
    fe = faulty_frontend(gw, registry, **kw)
    msg = generate_pb2.GenerateRequest(request_id="r1", token_ids=PROMPT,
                                       sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    async def collect() -> list[generate_pb2.GenerateChunk]:
        return [c async for c in fe.generate(msg)]

    return asyncio.run(collect()), registry


def _tokens(chunks: list[generate_pb2.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _migrations(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("tandem_router_migrations_total") or 0.0


def test_fault_free_run_streams_the_script() -> None:
    gw = FaultyWorkers()
    chunks, registry = _run(gw)
    assert _tokens(chunks) == scripted_tokens(PROMPT, 12)
    assert [k for k, _, _ in gw.calls] == ["prefill", "decode"] and _migrations(registry) == 0


@pytest.mark.parametrize("decoded", [0, 1, 5, 10])  # tokens the first decode streams before it dies
def test_decode_lost_mid_stream_resumes_after_the_streamed_tokens(decoded: int) -> None:
    gw = FaultyWorkers()
    gw.lose_after[D0] = decoded
    chunks, registry = _run(gw)
    want = scripted_tokens(PROMPT, 12)
    assert _tokens(chunks) == want  # no token twice, none missing, in order
    resumes = [c for c in gw.calls if c[0] == "resume"]
    assert resumes == [("resume", D1, tuple(want[: 1 + decoded]))]  # prefill's first + decoded
    finals = [c for c in chunks if c.finish_reason]
    assert len(finals) == 1 and finals[0] is chunks[-1]
    last = chunks[-1]
    assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens == len(PROMPT)
    assert (last.prefill_worker, last.decode_worker) == ("prefill-0/r0", "decode-1/r0")
    assert _migrations(registry) == 1
    assert ("cancel", D0, ()) not in gw.calls  # the lost worker is not called again


def test_decode_lost_taking_the_handoff_resumes_after_the_first_token() -> None:
    gw = FaultyWorkers()
    gw.fail_take.add(D0)
    chunks, _ = _run(gw)
    want = scripted_tokens(PROMPT, 12)
    assert _tokens(chunks) == want
    assert [c for c in gw.calls if c[0] == "resume"] == [("resume", D1, (want[0],))]


def test_prefill_lost_mid_prefill_is_prefilled_again_elsewhere() -> None:
    gw = FaultyWorkers()
    gw.fail_prefill.add(P0)
    chunks, registry = _run(gw)
    assert _tokens(chunks) == scripted_tokens(PROMPT, 12)
    assert [c[:2] for c in gw.calls] == [("prefill", P0), ("prefill", P1), ("decode", D0)]
    assert chunks[-1].prefill_worker == "prefill-1/r0" and _migrations(registry) == 1


def test_local_prefill_lost_before_any_token_starts_over_on_the_other_decode() -> None:
    gw = FaultyWorkers(prefills=0)
    gw.lose_after[D0] = 0
    chunks, _ = _run(gw, mode=DisaggMode.NEVER)
    assert _tokens(chunks) == scripted_tokens(PROMPT, 12)
    assert [c[:2] for c in gw.calls] == [("decode", D0), ("decode", D1)]  # nothing streamed: no resume


def test_two_losses_in_one_request_within_the_limit() -> None:
    gw = FaultyWorkers(decodes=3)
    gw.lose_after[D0], gw.lose_after[D1] = 3, 4
    chunks, registry = _run(gw, max_tokens=16)
    want = scripted_tokens(PROMPT, 16)
    assert _tokens(chunks) == want
    resumes = [c for c in gw.calls if c[0] == "resume"]
    assert resumes == [("resume", D1, tuple(want[:4])), ("resume", WorkerId("decode-2"), tuple(want[:8]))]
    assert chunks[-1].usage.completion_tokens == 16 and _migrations(registry) == 2


@pytest.mark.parametrize("limit", [0, 1])
def test_past_the_migration_limit_the_request_ends_unavailable(limit: int) -> None:
    gw = FaultyWorkers(decodes=3)
    for d in ("decode-0", "decode-1", "decode-2"):
        gw.lose_after[WorkerId(d)] = 2
    with pytest.raises(RouterError) as err:
        _run(gw, max_migrations=limit)
    assert err.value.code is ErrorCode.UNAVAILABLE
    assert f"request r1 lost its worker {limit + 1} times" in err.value.message
    assert "decode-" in err.value.message and "died" in err.value.message


def test_no_survivor_ends_unavailable_without_hanging() -> None:
    gw = FaultyWorkers(decodes=1)
    gw.lose_after[D0] = 2
    with pytest.raises(RouterError) as err:
        _run(gw)
    assert err.value.code is ErrorCode.UNAVAILABLE
