"""The router's gRPC front door refuses what it must, with the right status and the field named.

No worker is needed: every request here is refused before any worker is called (the gateway
fails the test if it is).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from support.gateways import full_worker, refusing_frontend

from orchestrator.router.inputs import Role, WorkerState
from orchestrator.router.server import start_server
from tandem.v1 import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.router






def _run(reports: Sequence[WorkerState], calls, token: str | None = None):  # noqa: ANN001, ANN202
    async def go():  # noqa: ANN202
        frontend = refusing_frontend(reports, CollectorRegistry())
        server, port = await start_server(frontend, port=0, token=token)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return await calls(ch)
        finally:
            await server.stop(None)

    return asyncio.run(go())


async def _status(ch: grpc.aio.Channel, req: generate_pb2.GenerateRequest,
                  metadata: tuple = ()) -> tuple[grpc.StatusCode, str]:
    stub = generate_pb2_grpc.RouterStub(ch)
    try:
        async for _ in stub.Generate(req, metadata=metadata or None, timeout=10):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


BAD = [
    ("empty", generate_pb2.GenerateRequest(), "prompt: give exactly one of prompt, token_ids and messages (none is set)"),
    ("both", generate_pb2.GenerateRequest(prompt="a", token_ids=[1]), "(prompt and token_ids are set)"),
    ("over context", generate_pb2.GenerateRequest(token_ids=[1] * 1024), "prompt: 1024 tokens; the model's context is 1024"),
    ("token outside vocab", generate_pb2.GenerateRequest(token_ids=[1, 259]), "token_ids[1]: 259 is not below the vocabulary size 259"),
    ("temperature", generate_pb2.GenerateRequest(prompt="a", sampling=generate_pb2.SamplingParams(temperature=-0.5)), "sampling.temperature"),
    ("top_p", generate_pb2.GenerateRequest(prompt="a", sampling=generate_pb2.SamplingParams(top_p=2)), "sampling.top_p"),
    ("max_tokens past context", generate_pb2.GenerateRequest(prompt="a", sampling=generate_pb2.SamplingParams(max_tokens=1023)), "sampling.max_tokens: must be <= 512"),
    ("long request id", generate_pb2.GenerateRequest(prompt="a", request_id="x" * 200), "request_id: at most 128"),
]


@pytest.mark.parametrize(("what", "req", "detail"), BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_invalid_argument_naming_the_field(what: str, req, detail: str) -> None:  # noqa: ANN001
    code, msg = _run([full_worker("decode-0", Role.DECODE)], lambda ch: _status(ch, req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in msg


def test_no_workers_is_unavailable() -> None:
    code, msg = _run([], lambda ch: _status(ch, generate_pb2.GenerateRequest(prompt="hello")))
    assert code == grpc.StatusCode.UNAVAILABLE and "no decode worker" in msg


def test_full_queues_are_resource_exhausted_at_once() -> None:
    reports = [full_worker("decode-0", Role.DECODE), full_worker("prefill-0", Role.PREFILL)]
    code, msg = _run(reports, lambda ch: _status(ch, generate_pb2.GenerateRequest(prompt="hello" * 100)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg


def test_token_is_required_but_health_stays_open() -> None:
    async def calls(ch: grpc.aio.Channel):  # noqa: ANN202
        req = generate_pb2.GenerateRequest(prompt="hi")
        missing = await _status(ch, req)
        wrong = await _status(ch, req, (("authorization", "Bearer nope"),))
        right = await _status(ch, req, (("authorization", "Bearer s3cret"),))
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="tandem.v1.Router"), timeout=5)
        return missing, wrong, right, health.status

    missing, wrong, right, status = _run([], calls, token="s3cret")
    assert missing[0] == wrong[0] == grpc.StatusCode.UNAUTHENTICATED
    assert right[0] == grpc.StatusCode.UNAVAILABLE  # authenticated; then refused for lack of workers
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_router_service() -> None:
    async def calls(ch: grpc.aio.Channel):  # noqa: ANN202
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        async for resp in stub.ServerReflectionInfo(iter([req]), timeout=5):
            return [s.name for s in resp.list_services_response.service]

    names = _run([], calls)
    assert "tandem.v1.Router" in names and "grpc.health.v1.Health" in names
