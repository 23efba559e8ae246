"""Readiness: a router with no decode worker (or, in mode always, no prefill worker) says so on its
gRPC health service and on HTTP /readyz, while the process-wide status and /healthz stay up."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from support.gateways import ReportsOnly, byte_frontend, full_worker

from orchestrator.api.app import create_app
from orchestrator.api.auth import Auth
from orchestrator.router.inputs import DisaggMode, DisaggThresholds, Role, WorkerId, WorkerState
from orchestrator.router.readiness import Readiness, readiness
from orchestrator.router.server import RouterHealth, start_server

pytestmark = pytest.mark.router

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _worker(name: str, role: Role) -> WorkerState:
    return WorkerState(WorkerId(name), role, "local", prefill_rate_tps=1000.0)


@pytest.mark.parametrize(("roles", "mode", "expected"), [
    ((), DisaggMode.CONDITIONAL, Readiness(False, "no decode worker is registered")),
    ((Role.PREFILL,), DisaggMode.CONDITIONAL, Readiness(False, "no decode worker is registered")),
    ((Role.DECODE,), DisaggMode.CONDITIONAL, Readiness(True, "")),
    ((Role.DECODE,), DisaggMode.NEVER, Readiness(True, "")),
    ((Role.DECODE,), DisaggMode.ALWAYS,
     Readiness(False, "no prefill worker is registered and disaggregation mode is always")),
    ((Role.DECODE, Role.PREFILL), DisaggMode.ALWAYS, Readiness(True, "")),
])
def test_readiness_needs_the_workers_a_request_needs(roles: tuple[Role, ...], mode: DisaggMode,
                                                    expected: Readiness) -> None:
    workers = [_worker(f"{r.value}-{i}", r) for i, r in enumerate(roles)]
    assert readiness(workers, DisaggThresholds(mode)) == expected


def test_a_busy_worker_is_still_ready() -> None:
    """Full queues are a RESOURCE_EXHAUSTED answer per request, not an unready router."""
    assert readiness([full_worker("decode-0", Role.DECODE)], DisaggThresholds()).ready


def test_grpc_health_follows_readiness_and_the_process_stays_serving() -> None:
    async def go() -> list[tuple[int, int]]:
        frontend = byte_frontend(ReportsOnly([]), CollectorRegistry())
        health = RouterHealth(ready=False)
        server, port = await start_server(frontend, port=0, health_service=health)
        seen = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)

                async def both() -> tuple[int, int]:
                    router = await stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Router"), timeout=5)
                    process = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    return router.status, process.status

                seen.append(await both())
                await health.set_ready(True)
                seen.append(await both())
                await health.set_ready(False)
                seen.append(await both())
        finally:
            await server.stop(None)
        return seen

    assert asyncio.run(go()) == [(NOT_SERVING, SERVING), (SERVING, SERVING), (NOT_SERVING, SERVING)]


def _get(reports: list[WorkerState], path: str, mode: DisaggMode | None = None) -> httpx.Response:
    registry = CollectorRegistry()
    frontend = byte_frontend(ReportsOnly(reports), registry, mode=mode)
    app = create_app(frontend, model_name="tiny", auth=Auth("client-token", None), registry=registry)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get(path)  # no token: probes need none

    return asyncio.run(go())


def test_http_readyz_is_503_with_the_reason_until_a_decode_is_registered() -> None:
    empty = _get([], "/readyz")
    assert empty.status_code == 503
    assert empty.json() == {"ready": False, "reason": "no decode worker is registered"}
    assert _get([], "/healthz").status_code == 200  # alive all the same
    ok = _get([_worker("decode-0", Role.DECODE)], "/readyz")
    assert (ok.status_code, ok.json()) == (200, {"ready": True})
    always = _get([_worker("decode-0", Role.DECODE)], "/readyz", mode=DisaggMode.ALWAYS)
    assert always.status_code == 503 and "prefill" in always.json()["reason"]
