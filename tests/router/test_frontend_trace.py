"""The router's trace lines: one trace id per request, the one the final chunk carries; a refused
request ends `aborted` with its status; no prompt text in any line."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from prometheus_client import CollectorRegistry
from support.gateways import full_worker, refusing_frontend
from support.scripted_gateway import ScriptedGateway, Step, idle_worker, scripted_frontend

from orchestrator.router.frontend import ErrorCode, RouterError
from orchestrator.router.inputs import Role
from tandem.tracing import TRACE_LOGGER
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.router

PROMPT = "Secret prompt words"
STEPS = (Step((104,), "h"), Step((105,), "i"), Step((33,), "!"))


def _trace_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TRACE_LOGGER and "trace_id=" in r.getMessage()]


def test_a_served_request_logs_admitted_routed_finished_under_the_chunks_trace_id(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=TRACE_LOGGER)
    gw = ScriptedGateway(STEPS, [idle_worker("prefill-0", Role.PREFILL), idle_worker("decode-0", Role.DECODE)])
    frontend = scripted_frontend(gw, CollectorRegistry(), split=True)
    msg = generate_pb2.GenerateRequest(request_id="r1", prompt=PROMPT)

    async def go() -> list[generate_pb2.GenerateChunk]:
        return [c async for c in frontend.generate(msg)]

    last = asyncio.run(go())[-1]
    lines = _trace_lines(caplog)
    assert re.fullmatch(r"[0-9a-f]{32}", last.trace_id)
    assert [re.search(r"stage=(\S+)", ln).group(1) for ln in lines] == ["admitted", "routed", "finished"]
    assert all(ln.startswith(f"trace_id={last.trace_id} request_id=r1 component=router ") for ln in lines)
    assert "prefill=prefill-0/r0" in lines[1] and "decode=decode-0/r0" in lines[1]
    assert "reason=length" in lines[2] and "completion_tokens=3" in lines[2]
    assert not any("Secret" in ln for ln in lines)
    assert frontend.tracer.following() == 0


def test_a_refused_request_ends_aborted_with_its_status(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=TRACE_LOGGER)
    frontend = refusing_frontend([full_worker("prefill-0", Role.PREFILL), full_worker("decode-0", Role.DECODE)],
                                 CollectorRegistry())
    msg = generate_pb2.GenerateRequest(request_id="r2", prompt=PROMPT)

    async def go() -> None:
        async for _ in frontend.generate(msg):
            pass

    with pytest.raises(RouterError) as err:
        asyncio.run(go())
    assert err.value.code is ErrorCode.RESOURCE_EXHAUSTED
    lines = _trace_lines(caplog)
    assert [re.search(r"stage=(\S+)", ln).group(1) for ln in lines] == ["admitted", "aborted"]
    assert lines[1].endswith("stage=aborted error=RESOURCE_EXHAUSTED")
    assert lines[0].split()[0] == lines[1].split()[0] != "trace_id=-"
    assert frontend.tracer.following() == 0
