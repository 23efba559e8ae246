"""The router's final chunk carries the decode's speculation counts (GenerateChunk.speculation) and
adds them to the acceptance-rate counters; a request that was not speculated has neither."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client import CollectorRegistry
from support.scripted_gateway import ScriptedGateway, Step, idle_worker, scripted_frontend

from orchestrator.router.inputs import Role
from tandem.request import GenerationRequest
from tandem.stream import TokenDelta
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.router

STEPS = (Step((104,), "h"), Step((105, 33, 10), "i!\n"), Step((257,), ""))


class SpeculatingGateway(ScriptedGateway):
    """The script, with a final summary reporting `drafted` / `accepted` draft tokens."""

    def __init__(self, drafted: int, accepted: int, split: bool) -> None:
        workers = [idle_worker("prefill-0", Role.PREFILL)] if split else []
        super().__init__(STEPS, [*workers, idle_worker("decode-0", Role.DECODE)])
        self.drafted, self.accepted = drafted, accepted

    def _delta(self, request: GenerationRequest, i: int) -> TokenDelta:
        d = super()._delta(request, i)
        if d.summary is None:
            return d
        summary = dataclasses.replace(d.summary, drafted_tokens=self.drafted, accepted_tokens=self.accepted)
        return dataclasses.replace(d, summary=summary)


def _run(gw: ScriptedGateway, registry: CollectorRegistry, split: bool) -> list[generate_pb2.GenerateChunk]:
    frontend = scripted_frontend(gw, registry, split=split)
    msg = generate_pb2.GenerateRequest(request_id="s", prompt="hello")

    async def go() -> list[generate_pb2.GenerateChunk]:
        return [c async for c in frontend.generate(msg)]

    return asyncio.run(go())


@pytest.mark.parametrize("split", [False, True])
def test_final_chunk_and_metrics_carry_the_speculation_counts(split: bool) -> None:
    registry = CollectorRegistry()
    chunks = _run(SpeculatingGateway(6, 4, split), registry, split)
    assert [list(c.token_ids) for c in chunks] == [list(s.token_ids) for s in STEPS]
    assert not any(c.HasField("speculation") for c in chunks[:-1])
    last = chunks[-1]
    assert (last.speculation.drafted_tokens, last.speculation.accepted_tokens) == (6, 4)
    assert registry.get_sample_value("tandem_router_spec_drafted_tokens_total") == 6
    assert registry.get_sample_value("tandem_router_spec_accepted_tokens_total") == 4


def test_no_speculation_no_counts() -> None:
    registry = CollectorRegistry()
    chunks = _run(SpeculatingGateway(0, 0, False), registry, False)
    assert chunks[-1].finish_reason and not chunks[-1].HasField("speculation")
    assert registry.get_sample_value("tandem_router_spec_drafted_tokens_total") == 0
