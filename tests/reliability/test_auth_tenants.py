"""Tokens, tenants and the admin role on both front doors, and the per-tenant prefix-cache salt.

The serving gateway (support.serving) is a worker with a real prefix cache of block hashes, so
"tenant B's identical prompt gets no cached block" is measured the way a worker would measure it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry
from support.serving import serving_frontend

from orchestrator.api.admin import DeploymentStatus
from orchestrator.api.app import create_app
from orchestrator.api.auth import Auth
from orchestrator.router.server import start_server
from orchestrator.router.tenancy import Caller, Credentials, Tenant, TenantToken, tenant_salt
from tandem.blocks import BLOCK_SIZE, block_hashes
from tandem.tokenizer import ByteTokenizer
from tandem.v1 import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.reliability

A, B = Tenant("a"), Tenant("b")
CREDS = Credentials([TenantToken(A, "token-a"), TenantToken(B, "token-b")], admin_token="token-admin")
PROMPT = "the same long prompt from two tenants " * 14  # 532 bytes: two full 256-token blocks


async def _last(frontend, msg: generate_pb2.GenerateRequest, caller: Caller):  # noqa: ANN001, ANN202
    chunks = [c async for c in frontend.generate(msg, caller)]
    return chunks[-1]


def test_tenants_never_share_prefix_blocks_and_a_tenants_repeat_does() -> None:
    async def go() -> None:
        frontend, gw = serving_frontend(CollectorRegistry())
        msg = generate_pb2.GenerateRequest(prompt=PROMPT)
        first_a = await _last(frontend, msg, Caller(A, "10.0.0.1"))
        again_a = await _last(frontend, msg, Caller(A, "10.0.0.2"))  # another client of the same tenant
        first_b = await _last(frontend, msg, Caller(B, "10.0.0.1"))
        forged = generate_pb2.GenerateRequest(prompt=PROMPT, cache_salt=tenant_salt("a", ""))
        forged_b = await _last(frontend, forged, Caller(B, "10.0.0.1"))
        narrowed = generate_pb2.GenerateRequest(prompt=PROMPT, cache_salt="private")
        narrowed_a = await _last(frontend, narrowed, Caller(A, "10.0.0.1"))
        narrowed_again = await _last(frontend, narrowed, Caller(A, "10.0.0.1"))
        ra1, ra2, rb, rforged, rnarrow, _ = gw.requests
        ids = ByteTokenizer().encode(PROMPT)
        assert len(ra1.block_hashes) == 2 == len(ids) // BLOCK_SIZE
        assert first_a.usage.cached_tokens == 0 and again_a.usage.cached_tokens == 2 * BLOCK_SIZE
        assert ra1.block_hashes == ra2.block_hashes
        assert first_b.usage.cached_tokens == 0 and not set(rb.block_hashes) & set(ra1.block_hashes)
        # a client salt cannot reach into another tenant's blocks: the tenant part comes first
        assert forged_b.usage.cached_tokens == 0 and not set(rforged.block_hashes) & set(ra1.block_hashes)
        # ... and within a tenant it narrows sharing to requests that carry the same salt
        assert narrowed_a.usage.cached_tokens == 0 and narrowed_again.usage.cached_tokens == 2 * BLOCK_SIZE
        # the workers hash with the request's cache_salt: router and workers agree bit for bit
        for r in gw.requests:
            assert r.block_hashes == tuple(block_hashes(r.prompt_ids, salt=r.cache_salt))
        assert rnarrow.cache_salt == "tenant:1:a|private"

    asyncio.run(go())


def test_tenant_salt_is_injective() -> None:
    pairs = [("a", "b|c"), ("a|b", "c"), ("ab", "c"), ("a", "bc"), ("", "tenant:1:a|"), ("a", "")]
    assert len({tenant_salt(t, c) for t, c in pairs}) == len(pairs)


async def _grpc_call(ch: grpc.aio.Channel, token: str | None) -> tuple[grpc.StatusCode, str]:
    md = (("authorization", f"Bearer {token}"),) if token is not None else None
    req = generate_pb2.GenerateRequest(prompt=PROMPT, sampling=generate_pb2.SamplingParams(max_tokens=2))
    try:
        async for _ in generate_pb2_grpc.RouterStub(ch).Generate(req, metadata=md, timeout=10):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_grpc_token_picks_the_tenant_and_the_admin_token_does_not_generate() -> None:
    async def go() -> tuple:
        frontend, gw = serving_frontend(CollectorRegistry())
        server, port = await start_server(frontend, port=0, credentials=CREDS)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                out = [await _grpc_call(ch, t) for t in ("token-a", "token-b", None, "token-c", "token-admin",
                                                          "")]
        finally:
            await server.stop(None)
        return out, [r.cache_salt for r in gw.requests]

    (a, b, missing, wrong, admin, empty), salts = asyncio.run(go())
    assert a[0] == b[0] == grpc.StatusCode.OK
    assert salts == [tenant_salt("a", ""), tenant_salt("b", "")]  # only the two tenants' calls ran
    assert missing[0] == wrong[0] == empty[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "wrong bearer token" in wrong[1] and "missing bearer token" in missing[1]
    assert admin[0] == grpc.StatusCode.PERMISSION_DENIED and "admin token does not generate" in admin[1]


class RecordingAdmin:
    """An Admin that records what it was asked to do."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _status(self) -> DeploymentStatus:
        return DeploymentStatus(name="t", ready=True, router_address="r", http_address="h", instances=[])

    async def status(self) -> DeploymentStatus:
        self.calls.append("status")
        return self._status()

    async def scale(self, prefill: int | None, decode: int | None) -> DeploymentStatus:
        self.calls.append(f"scale {prefill} {decode}")
        return self._status()

    async def drain(self, worker: str, timeout_s: float) -> DeploymentStatus:
        self.calls.append(f"drain {worker}")
        return self._status()

    async def down(self) -> None:
        self.calls.append("down")


ADMIN_CALLS = [("GET", "/v1/status", None), ("POST", "/v1/scale", {"decode": 2}),
               ("POST", "/v1/drain", {"worker": "decode-0"}), ("POST", "/v1/down", None)]


def test_http_admin_endpoints_need_the_admin_token_and_it_does_not_generate() -> None:
    registry = CollectorRegistry()
    frontend, gw = serving_frontend(registry)
    admin = RecordingAdmin()
    app = create_app(frontend, model_name="tiny", auth=Auth(credentials=CREDS), registry=registry, admin=admin)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}

    async def go() -> dict:
        out: dict = {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.1.2.3", 999)),
                                     base_url="http://t") as c:
            for token in ("token-a", "token-admin", "nope", None):
                headers = {"authorization": f"Bearer {token}"} if token else {}
                out[token] = [(await c.request(m, p, json=j, headers=headers)).status_code
                              for m, p, j in ADMIN_CALLS]
                out[token].append((await c.post("/v1/completions", json=body, headers=headers)).status_code)
        return out

    got = asyncio.run(go())
    assert got["token-a"] == [403, 403, 403, 403, 200]
    assert got["token-admin"] == [200, 200, 200, 200, 403]
    assert got["nope"] == got[None] == [401] * 5
    assert admin.calls == ["status", "scale None 2", "drain decode-0", "down"]  # the admin's calls only
    assert [r.cache_salt for r in gw.requests] == [tenant_salt("a", "")]


def test_one_token_for_both_roles_has_both() -> None:
    both = Credentials([TenantToken(Tenant("default"), "same")], admin_token="same")
    p = both.resolve("Bearer same")
    assert p.admin and p.tenant == Tenant("default")
    with pytest.raises(ValueError, match="share one token"):
        Credentials([TenantToken(A, "x"), TenantToken(B, "x")])
    with pytest.raises(ValueError, match="unique"):
        Credentials([TenantToken(A, "x"), TenantToken(Tenant("a"), "y")])


def test_no_code_turns_ray_token_auth_off() -> None:
    """Nothing Tandem runs sets Ray's authentication mode or token: a cluster started with
    RAY_AUTH_MODE=token keeps it (tests/e2e/test_ray_job_submit.py deploys onto such a head)."""
    root = Path(__file__).parents[2]
    hits = [f"{p.relative_to(root)}: {needle}" for top in ("orchestrator", "workers", "kernels", "proto/tandem")
            for p in (root / top).rglob("*.py") for needle in ("RAY_AUTH", "auth_mode", "AuthenticationMode")
            if needle in p.read_text(encoding="utf-8")]
    assert hits == []
