"""Prompts, prompt token ids and generated text never reach a log record at INFO or above.

Requests with a distinctive prompt, distinctive token ids and chat content go through the real gRPC
server and the HTTP API over the serving gateway, on the OK path and the refusal, deadline and
unauthenticated paths, with every logger at DEBUG; then every INFO+ record is searched.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry
from support.serving import serving_frontend

from orchestrator.api.app import create_app
from orchestrator.api.auth import Auth
from orchestrator.router.server import start_server
from orchestrator.router.tenancy import Credentials, Tenant, TenantToken
from tandem.v1 import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.reliability

SECRET = "zq-SECRET-prompt-7f3a9"
IDS = [211, 222, 233, 244, 255]
OUTPUT = "".join(chr((i % 200) + 32) for i in range(1, 9))  # the serving gateway's text for 8 tokens
FORBIDDEN = [SECRET, OUTPUT, "211, 222", "211 222", "211,222"]


def _requests() -> list[generate_pb2.GenerateRequest]:
    sp = generate_pb2.SamplingParams(max_tokens=8)
    return [
        generate_pb2.GenerateRequest(prompt=SECRET * 20, sampling=sp),  # > 256 tokens: hashed blocks too
        generate_pb2.GenerateRequest(token_ids=IDS, sampling=sp),
        generate_pb2.GenerateRequest(prompt=SECRET, token_ids=IDS),  # refused: both forms
        generate_pb2.GenerateRequest(token_ids=IDS + [999]),  # refused: outside the vocabulary
        generate_pb2.GenerateRequest(messages=[generate_pb2.ChatMessage(role="user", content=SECRET)],
                                     sampling=sp),
        generate_pb2.GenerateRequest(prompt=SECRET, deadline_ms=1, sampling=sp),
    ]


def test_no_prompt_or_token_at_info_or_above(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    registry = CollectorRegistry()
    frontend, gw = serving_frontend(registry)
    creds = Credentials([TenantToken(Tenant("t"), "tok")], admin_token="adm")
    app = create_app(frontend, model_name="tiny", auth=Auth(credentials=creds), registry=registry)

    async def go() -> list:
        codes = []
        server, port = await start_server(frontend, port=0, credentials=creds)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = generate_pb2_grpc.RouterStub(ch)
                for token in ("tok", "wrong"):
                    for req in _requests():
                        if req.deadline_ms:  # the worker stalls after its first token: the deadline must end it
                            gw.hold.clear()
                        try:
                            async for _ in stub.Generate(req, metadata=(("authorization", f"Bearer {token}"),),
                                                         timeout=10):
                                pass
                            codes.append(grpc.StatusCode.OK)
                        except grpc.aio.AioRpcError as exc:
                            codes.append(exc.code())
                        gw.hold.set()
        finally:
            await server.stop(None)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            h = {"authorization": "Bearer tok"}
            for body in ({"model": "tiny", "prompt": SECRET, "max_tokens": 8},
                         {"model": "tiny", "prompt": IDS, "max_tokens": 8, "stream": True},
                         {"model": "tiny", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 8},
                         {"model": "tiny", "prompt": SECRET, "temperature": 9}):
                codes.append((await c.post("/v1/" + ("chat/completions" if "messages" in body else "completions"),
                                           json=body, headers=h)).status_code)
        return codes

    codes = asyncio.run(go())
    ok = grpc.StatusCode.OK
    assert codes[:6] == [ok, ok, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, ok,
                         grpc.StatusCode.DEADLINE_EXCEEDED]
    assert codes[6:12] == [grpc.StatusCode.UNAUTHENTICATED] * 6 and codes[12:] == [200, 200, 200, 400]
    assert len(gw.requests) >= 6  # the prompts did reach the workers' side
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    for r in loud:
        text = r.getMessage() + (r.exc_text or "")
        for bad in FORBIDDEN:
            assert bad not in text, f"{r.name} {r.levelname}: {text[:300]}"
