"""Request limits and concurrent-stream budgets: every refusal names its limit, and a stream's slot
is freed however the stream ends (last chunk, deadline, client cancel over gRPC or HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from support.servers import http_server
from support.serving import ServingGateway, serving_frontend

from orchestrator.api.app import create_app
from orchestrator.api.auth import Auth
from orchestrator.router.frontend import Frontend, RouterError
from orchestrator.router.quotas import RequestLimits
from orchestrator.router.server import peer_host, start_server
from orchestrator.router.tenancy import Caller, Credentials, Tenant, TenantToken
from tandem.v1 import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.reliability

SP = generate_pb2.SamplingParams


def _req(prompt: str = "hello", request_id: str = "", **sampling: object) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(prompt=prompt, request_id=request_id, sampling=SP(**sampling))


async def _status(ch: grpc.aio.Channel, req: generate_pb2.GenerateRequest,
                  token: str | None = None) -> tuple[grpc.StatusCode, str]:
    md = (("authorization", f"Bearer {token}"),) if token else None
    try:
        async for _ in generate_pb2_grpc.RouterStub(ch).Generate(req, metadata=md, timeout=10):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def _rest(call: grpc.aio.UnaryStreamCall) -> list[generate_pb2.GenerateChunk]:
    """The remaining chunks of a call already read with `read()` (grpc does not mix read and iteration)."""
    out = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        out.append(chunk)
    return out


def _serve(quotas: RequestLimits, calls: Callable[[grpc.aio.Channel, Frontend, ServingGateway], Awaitable],
           credentials: Credentials | None = None) -> object:
    async def go() -> object:
        frontend, gw = serving_frontend(CollectorRegistry(), quotas)
        server, port = await start_server(frontend, port=0, credentials=credentials,
                                          max_request_bytes=quotas.max_request_bytes)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return await calls(ch, frontend, gw)
        finally:
            await server.stop(None)

    return asyncio.run(go())


def test_size_limits_name_the_field_and_the_limit() -> None:
    quotas = RequestLimits(max_prompt_tokens=100, max_stop_strings=2, max_stop_token_ids=1)

    async def calls(ch: grpc.aio.Channel, *_: object) -> list:
        reqs = [_req("x" * 99), _req("x" * 100), _req(stop=["a", "b"]), _req(stop=["a", "b", "c"]),
                _req(stop_token_ids=[1]), _req(stop_token_ids=[1, 2])]
        return [await _status(ch, r) for r in reqs]

    ok100, long, stop2, stop3, ids1, ids2 = _serve(quotas, calls)  # the tokenizer adds a BOS token
    assert ok100[0] == stop2[0] == ids1[0] == grpc.StatusCode.OK
    assert long == (grpc.StatusCode.INVALID_ARGUMENT, "prompt: 101 tokens; limits.max_prompt_tokens is 100")
    assert stop3 == (grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop: 3 strings; limits.max_stop_strings is 2")
    assert ids2 == (grpc.StatusCode.INVALID_ARGUMENT,
                    "sampling.stop_token_ids: 2 ids; limits.max_stop_token_ids is 1")


def test_grpc_message_size_limit() -> None:
    async def calls(ch: grpc.aio.Channel, *_: object) -> list:
        return [await _status(ch, _req("y" * n)) for n in (3000, 5000)]

    fits, too_big = _serve(RequestLimits(max_request_bytes=4096), calls)
    assert fits[0] == grpc.StatusCode.OK
    assert too_big[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096" in too_big[1]


def test_grpc_streams_per_client_are_bounded_and_a_cancel_frees_the_slot() -> None:
    quotas = RequestLimits(max_streams_per_client=2)

    async def calls(ch: grpc.aio.Channel, frontend: Frontend, gw: ServingGateway) -> None:
        gw.hold.clear()  # every stream stops after its first token
        stub = generate_pb2_grpc.RouterStub(ch)
        open_calls = [stub.Generate(_req(request_id=f"r{i}", max_tokens=4), timeout=10) for i in range(2)]
        for c in open_calls:
            await c.read()
        assert frontend.slots.open_streams(Caller(Tenant("anonymous"), "127.0.0.1")) == (2, 2)
        code, detail = await _status(ch, _req())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert detail.startswith("limits.max_streams_per_client: client 127.0.0.1") and "(limit 2)" in detail
        open_calls[0].cancel()
        for _ in range(200):
            if frontend.slots.open_streams(Caller(Tenant("anonymous"), "127.0.0.1")) == (1, 1):
                break
            await asyncio.sleep(0.01)
        assert frontend.slots.open_streams(Caller(Tenant("anonymous"), "127.0.0.1")) == (1, 1)
        assert gw.cancelled == ["r0"]  # the worker was told to stop as well
        third = stub.Generate(_req(max_tokens=4), timeout=10)
        await third.read()  # the freed slot is usable
        gw.hold.set()
        rest = await _rest(third) + await _rest(open_calls[1])
        assert len(rest) == 6
        assert frontend.slots.open_streams(Caller(Tenant("anonymous"), "127.0.0.1")) == (0, 0)

    _serve(quotas, calls)


def test_grpc_tenant_budget_from_its_spec_and_other_tenants_unaffected() -> None:
    creds = Credentials([TenantToken(Tenant("a", max_streams=1), "ta"), TenantToken(Tenant("b"), "tb")])

    async def calls(ch: grpc.aio.Channel, frontend: Frontend, gw: ServingGateway) -> tuple:
        gw.hold.clear()
        first = generate_pb2_grpc.RouterStub(ch).Generate(_req(max_tokens=2), timeout=10,
                                                          metadata=(("authorization", "Bearer ta"),))
        await first.read()
        second_a = await _status(ch, _req(), "ta")
        gw.hold.set()
        b = await _status(ch, _req(), "tb")
        rest = await _rest(first)
        return second_a, b, len(rest)

    second_a, b, rest = _serve(RequestLimits(), calls, creds)
    assert second_a == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "security.tenants[a].max_concurrent_streams: tenant 'a' has 1 streams open (limit 1)")
    assert b[0] == grpc.StatusCode.OK and rest == 1


def test_client_and_tenant_budgets_are_separate() -> None:
    async def go() -> None:
        frontend, gw = serving_frontend(CollectorRegistry(), RequestLimits(max_streams_per_client=1,
                                                                           max_streams_per_tenant=2))
        gw.hold.clear()
        t = Tenant("t")
        h1 = frontend.generate(_req(max_tokens=2), Caller(t, "10.0.0.1"))
        await anext(h1)
        with pytest.raises(RouterError, match=r"^RESOURCE_EXHAUSTED: limits.max_streams_per_client"):
            await anext(frontend.generate(_req(), Caller(t, "10.0.0.1")))
        h2 = frontend.generate(_req(max_tokens=2), Caller(t, "10.0.0.2"))
        await anext(h2)
        with pytest.raises(RouterError, match=r"limits.max_streams_per_tenant: tenant 't' has 2 streams"):
            await anext(frontend.generate(_req(), Caller(t, "10.0.0.3")))
        other = frontend.generate(_req(max_tokens=1), Caller(Tenant("u"), "10.0.0.1"))
        assert [c.token_ids for c in [c async for c in other]] == [[33]]  # another tenant: its own budget
        await h1.aclose()  # the consumer drops the stream
        assert frontend.slots.open_streams(Caller(t, "10.0.0.1")) == (0, 1)
        gw.hold.set()
        assert len([c async for c in h2]) == 1
        assert frontend.slots.open_streams(Caller(t, "10.0.0.2")) == (0, 0)
        # a stream that ends in an error frees its slot as well
        gw.hold.clear()
        late = frontend.generate(generate_pb2.GenerateRequest(prompt="x", deadline_ms=50, sampling=SP(max_tokens=3)),
                                 Caller(t, "10.0.0.1"))
        with pytest.raises(RouterError, match="DEADLINE_EXCEEDED"):
            async for _ in late:
                pass
        assert frontend.slots.open_streams(Caller(t, "10.0.0.1")) == (0, 0)

    asyncio.run(go())


def test_http_body_limit_and_stream_budget() -> None:
    registry = CollectorRegistry()
    frontend, gw = serving_frontend(registry, RequestLimits(max_streams_per_client=1))
    app = create_app(frontend, model_name="tiny", auth=Auth(), registry=registry, max_request_bytes=2048)
    caller = Caller(Tenant("anonymous"), "127.0.0.1")

    async def chunked(n: int):  # noqa: ANN202 (no content-length: the body is sent in chunks)
        for _ in range(n):
            yield b"x" * 512

    async def go() -> None:
        async with http_server(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                               timeout=10) as c:
            body = {"model": "tiny", "prompt": "p" * 2100, "max_tokens": 2}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 413 and r.json()["error"]["param"] == "max_request_bytes"
            assert "limit 2048" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", content=chunked(5), headers={"content-type": "application/json"})
            assert r.status_code == 413
            assert (await c.post("/v1/completions", json={**body, "prompt": "small"})).status_code == 200
            gw.hold.clear()
            stream_body = {"model": "tiny", "prompt": "stream", "max_tokens": 3, "stream": True}
            async with c.stream("POST", "/v1/completions", json=stream_body) as s:
                assert s.status_code == 200
                lines = s.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                refused = await c.post("/v1/completions", json=body | {"prompt": "small"})
                assert refused.status_code == 429
                assert refused.json()["error"]["message"].startswith("limits.max_streams_per_client")
            for _ in range(300):  # the client hung up mid-stream: the slot comes back
                if frontend.slots.open_streams(caller) == (0, 0):
                    break
                await asyncio.sleep(0.01)
            assert frontend.slots.open_streams(caller) == (0, 0)
            gw.hold.set()
            assert (await c.post("/v1/completions", json={**body, "prompt": "small"})).status_code == 200

    asyncio.run(go())


def test_spec_limits_and_tenants_reach_the_router_settings(tmp_path) -> None:  # noqa: ANN001
    from orchestrator.spec import load_spec
    from orchestrator.worker_plan import model_config, router_settings

    (tmp_path / "x.token").write_text("token-of-x\n")
    spec = yaml.safe_load(Path("deploy/local.yaml").read_text())
    spec["security"] = {"tenants": [{"name": "x", "token_file": str(tmp_path / "x.token"),
                                     "max_concurrent_streams": 2}]}
    spec["limits"] = {"max_tokens": 100, "max_prompt_tokens": 200, "max_stop_strings": 4,
                      "max_request_bytes": 4096, "max_streams_per_client": 3, "max_streams_per_tenant": 5}
    spec["router"] = {**spec.get("router", {}), "default_max_tokens": 256}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    parsed = load_spec(path)
    s = router_settings(parsed, model_config(parsed))
    assert (s.limits.max_tokens, s.limits.default_max_tokens) == (100, 100)  # the default is capped
    assert s.quotas == RequestLimits(max_prompt_tokens=200, max_stop_strings=4, max_request_bytes=4096,
                                     max_streams_per_client=3, max_streams_per_tenant=5)
    creds = s.credentials()
    assert creds.resolve("Bearer token-of-x").tenant == Tenant("x", 2)
    assert creds.resolve(f"Bearer {s.token}").tenant == Tenant("default")  # the generated default token
    assert creds.resolve(f"Bearer {s.admin_token}").admin
    spec["security"]["tenants"][0]["token_file"] = str(tmp_path / "missing")
    path.write_text(yaml.safe_dump(spec))
    parsed = load_spec(path)
    with pytest.raises(FileNotFoundError, match=r"security.tenants\[0\].token_file"):
        router_settings(parsed, model_config(parsed))


@pytest.mark.parametrize(("peer", "host"), [("ipv4:127.0.0.1:5000", "127.0.0.1"), ("ipv6:[::1]:5000", "::1"),
                                            ("ipv6:[fe80::1%eth0]:1", "fe80::1%eth0"), ("unix:/tmp/s", "/tmp/s")])
def test_a_client_is_its_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host  # the port changes per connection; the host names the client
