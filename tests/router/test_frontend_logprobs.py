"""The router's request path copies each delta's logprobs into GenerateChunk.logprobs, in order,
for the prefill's first token as for the decode's tokens, and leaves them empty when none came."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support.scripted_gateway import ScriptedGateway, Step, idle_worker, scripted_frontend

from orchestrator.router.inputs import Role
from tandem.stream import TokenLogprob
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.router

STEPS = (
    Step((104,), "h", (TokenLogprob(104, -0.25, ((104, -0.25), (105, -1.75))),)),
    Step((105,), "i", (TokenLogprob(105, -0.123456789, ((33, -0.1), (105, -0.123456789))),)),
    Step((257,), "", (TokenLogprob(257, -3.0, ((10, -0.5), (11, -0.75))),)),
)


def _chunks(gateway: ScriptedGateway, prompt: str, split: bool) -> list[generate_pb2.GenerateChunk]:
    frontend = scripted_frontend(gateway, CollectorRegistry(), split=split)
    msg = generate_pb2.GenerateRequest(request_id="lp", prompt=prompt,
                                       sampling=generate_pb2.SamplingParams(logprobs=True, top_logprobs=2))

    async def go() -> list[generate_pb2.GenerateChunk]:
        return [c async for c in frontend.generate(msg)]

    return asyncio.run(go())


def _f32(x: float) -> float:
    return float(np.float32(x))


@pytest.mark.parametrize("split", [False, True])
def test_chunks_carry_every_tokens_logprobs(split: bool) -> None:
    gw = ScriptedGateway(STEPS, [idle_worker("prefill-0", Role.PREFILL), idle_worker("decode-0", Role.DECODE)])
    chunks = _chunks(gw, "hello", split)
    assert gw.prefills == int(split)  # split: the first token came from the prefill worker
    assert gw.requests[0].sampling.logprobs and gw.requests[0].sampling.top_logprobs == 2
    assert [list(c.token_ids) for c in chunks] == [list(s.token_ids) for s in STEPS]
    for c, s in zip(chunks, STEPS, strict=True):
        (want,) = s.logprobs
        (got,) = c.logprobs
        assert (got.token_id, got.logprob) == (want.token_id, _f32(want.logprob))
        assert [(t.token_id, t.logprob) for t in got.top] == [(i, _f32(v)) for i, v in want.top]


def test_no_logprobs_from_the_workers_means_none_in_the_chunks() -> None:
    steps = [Step(s.token_ids, s.text) for s in STEPS]
    chunks = _chunks(ScriptedGateway(steps, [idle_worker("decode-0", Role.DECODE)]), "hello", False)
    assert [len(c.logprobs) for c in chunks] == [0, 0, 0] and chunks[-1].finish_reason
