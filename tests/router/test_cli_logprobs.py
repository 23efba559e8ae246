"""`tandem generate --logprobs N` over the router's gRPC server: the request asks for them, the JSON
lines carry them per chunk, and the text mode prints one line per token after the text.

The workers are the scripted in-memory gateway; its logprobs are dyadic (exact in float32)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from support.scripted_gateway import ScriptedGateway, Step, idle_worker, scripted_frontend
from support.servers import grpc_router
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.router.inputs import Role
from tandem.stream import TokenLogprob

pytestmark = pytest.mark.router

SCRIPT = (Step((104,), "h", (TokenLogprob(104, -0.5, ((104, -0.5), (105, -1.25), (106, -2.0))),)),
          Step((105,), "i", (TokenLogprob(105, -0.75, ((106, -0.25), (105, -0.75), (107, -3.0))),)))


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, ScriptedGateway]]:
    """A gRPC router over the scripted gateway on a loop in a thread; its address."""
    monkeypatch.setenv("TANDEM_STATE", "/nonexistent/state.json")
    monkeypatch.delenv("TANDEM_TOKEN", raising=False)
    gateway = ScriptedGateway(SCRIPT, [idle_worker("decode-0", Role.DECODE)])
    with grpc_router(scripted_frontend(gateway, CollectorRegistry(), split=False)) as address:
        yield address, gateway


def test_generate_json_lines_carry_the_logprobs(served: tuple[str, ScriptedGateway]) -> None:
    address, gateway = served
    out = CliRunner().invoke(app, ["generate", "--address", address, "--prompt", "hi", "--logprobs", "2",
                                   "--json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.output.splitlines()]
    sp = gateway.requests[0].sampling
    assert (sp.logprobs, sp.top_logprobs) == (True, 2)
    assert [x["logprobs"] for x in lines] == [
        [{"token_id": 104, "logprob": -0.5, "top": [[104, -0.5], [105, -1.25]]}],
        [{"token_id": 105, "logprob": -0.75, "top": [[106, -0.25], [105, -0.75]]}]]


def test_generate_text_prints_a_line_per_token(served: tuple[str, ScriptedGateway]) -> None:
    address, gateway = served
    out = CliRunner().invoke(app, ["generate", "--address", address, "--prompt", "hi", "--logprobs", "0"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == ["hi", "104\t-0.5000", "105\t-0.7500"]
    plain = CliRunner().invoke(app, ["generate", "--address", address, "--prompt", "hi", "--json"])
    assert all("logprobs" not in json.loads(x) for x in plain.output.splitlines())
    assert [r.sampling.logprobs for r in gateway.requests] == [True, False]
    bad = CliRunner().invoke(app, ["generate", "--address", address, "--prompt", "hi", "--logprobs", "21"])
    assert bad.exit_code != 0 and len(gateway.requests) == 2  # refused before any request
