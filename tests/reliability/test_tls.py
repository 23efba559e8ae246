"""TLS and mutual TLS on both front doors, with certificates made for the session (support.certs).

gRPC: the real server of `start_server` over a serving in-memory gateway. HTTP and the spec path:
the real `RouterHost` built from `RouterSettings` (TLS paths as the spec names them), so the same
code a deployment runs binds, loads the certificates and checks tokens. Every failure case is a
real handshake or a real refusal: a plain-text client, a client that trusts another CA, no client
certificate, a client certificate from another CA, a wrong or missing token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry
from support.certs import Pem, Pki
from support.gateways import FLEET
from support.servers import settle
from support.serving import serving_frontend

from orchestrator.router.admission import Limits
from orchestrator.router.host import RouterHost, RouterSettings, TlsPaths
from orchestrator.router.policy import PolicyName
from orchestrator.router.ray_gateway import RankLimits
from orchestrator.router.server import ServerTls, start_server
from tandem.v1 import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.reliability

TOKEN = "tls-client-token"
REQ = generate_pb2.GenerateRequest(prompt="over TLS", sampling=generate_pb2.SamplingParams(max_tokens=3))


async def _generate(ch: grpc.aio.Channel, token: str | None = TOKEN) -> tuple[grpc.StatusCode, int]:
    """(status, tokens received) of one Generate call."""
    md = (("authorization", f"Bearer {token}"),) if token else None
    n = 0
    try:
        async for chunk in generate_pb2_grpc.RouterStub(ch).Generate(REQ, metadata=md, timeout=10):
            n += len(chunk.token_ids)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), n
    return grpc.StatusCode.OK, n


def _creds(pki: Pki, root: object = None, identity: Pem | None = None) -> grpc.ChannelCredentials:
    root_pem = (root or pki.ca).read_bytes()
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=root_pem)
    cert, key = identity.read()
    return grpc.ssl_channel_credentials(root_certificates=root_pem, private_key=key, certificate_chain=cert)


def _grpc(pki: Pki, mtls: bool, calls: Callable[[int], Awaitable[object]]) -> object:
    async def go() -> object:
        frontend, _ = serving_frontend(CollectorRegistry())
        cert, key = pki.server.read()
        tls = ServerTls(cert, key, pki.ca.read_bytes() if mtls else None)
        server, port = await start_server(frontend, port=0, token=TOKEN, tls=tls)
        try:
            return await calls(port)
        finally:
            await server.stop(None)

    return asyncio.run(go())


def _secure(port: int, creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


def test_grpc_tls_serves_and_refuses_plain_text_and_the_wrong_ca(pki: Pki) -> None:
    async def calls(port: int) -> tuple:
        async with _secure(port, _creds(pki)) as ch:
            ok = await _generate(ch)
            no_token = await _generate(ch, None)
            wrong_token = await _generate(ch, "not-the-token")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            plain = await _generate(ch)
        async with _secure(port, _creds(pki, root=pki.other_ca)) as ch:
            untrusted = await _generate(ch)
        return ok, no_token, wrong_token, plain, untrusted

    ok, no_token, wrong_token, plain, untrusted = _grpc(pki, False, calls)
    assert ok == (grpc.StatusCode.OK, 3)
    assert no_token[0] == wrong_token[0] == grpc.StatusCode.UNAUTHENTICATED
    assert plain == (grpc.StatusCode.UNAVAILABLE, 0)  # no TLS handshake: nothing served
    assert untrusted == (grpc.StatusCode.UNAVAILABLE, 0)  # the server's certificate is not from other_ca


def test_grpc_mtls_needs_a_client_certificate_from_the_ca(pki: Pki) -> None:
    async def calls(port: int) -> tuple:
        out = []
        for identity in (None, pki.stranger, pki.client):
            async with _secure(port, _creds(pki, identity=identity)) as ch:
                out.append(await _generate(ch))
        async with _secure(port, _creds(pki, identity=pki.client)) as ch:
            out.append(await _generate(ch, "not-the-token"))
        return tuple(out)

    none, stranger, right, right_cert_wrong_token = _grpc(pki, True, calls)
    assert none == (grpc.StatusCode.UNAVAILABLE, 0)
    assert stranger == (grpc.StatusCode.UNAVAILABLE, 0)
    assert right == (grpc.StatusCode.OK, 3)
    assert right_cert_wrong_token[0] == grpc.StatusCode.UNAUTHENTICATED  # a certificate is not a token


def _settings(tls: TlsPaths | None, host: str = "127.0.0.1") -> RouterSettings:
    return RouterSettings(host=host, grpc_port=0, http_port=0, policy=PolicyName.KV, fleet=FLEET,
                          limits=Limits(max_context=1024, default_max_tokens=16, max_tokens=512),
                          rank_limits=RankLimits(8, 8, 1000.0), model_name="tiny", checkpoint=None,
                          token=TOKEN, admin_token="tls-admin-token", tls=tls)


def _ctx(pki: Pki, identity: Pem | None = None, root: object = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(root or pki.ca))
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
    return ctx


async def _models(url: str, verify: ssl.SSLContext | bool, token: str | None = TOKEN) -> int:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(verify=verify, timeout=10) as c:
        return (await c.get(url + "/v1/models", headers=headers)).status_code


def _host(settings: RouterSettings, calls: Callable[[RouterHost], Awaitable[object]]) -> object:
    async def go() -> object:
        host = RouterHost(settings)
        await host.start()
        try:
            return await calls(host)
        finally:
            await host.stop()
            await settle()

    return asyncio.run(go())


async def _refused(url: str, verify: ssl.SSLContext | bool) -> str:
    """The transport error of a GET that must not get through (fails the test if it does)."""
    try:
        status = await _models(url, verify)
    except httpx.TransportError as exc:
        return type(exc).__name__
    raise AssertionError(f"{url} answered {status}")


def test_http_tls_from_settings(pki: Pki) -> None:
    tls = TlsPaths(str(pki.server.cert), str(pki.server.key))

    async def calls(host: RouterHost) -> tuple:
        url = host._started.http
        assert url.startswith("https://127.0.0.1:")
        plain = await _refused(url.replace("https://", "http://"), False)
        untrusted = await _refused(url, _ctx(pki, root=pki.other_ca))
        return (await _models(url, _ctx(pki)), await _models(url, _ctx(pki), None),
                await _models(url, _ctx(pki), "wrong"), plain, untrusted)

    ok, missing, wrong, plain, untrusted = _host(_settings(tls), calls)
    assert (ok, missing, wrong) == (200, 401, 401)
    assert plain and untrusted


def test_http_mtls_from_settings(pki: Pki) -> None:
    tls = TlsPaths(str(pki.server.cert), str(pki.server.key), str(pki.ca))

    async def calls(host: RouterHost) -> tuple:
        url = host._started.http
        none = await _refused(url, _ctx(pki))
        stranger = await _refused(url, _ctx(pki, pki.stranger))
        return none, stranger, await _models(url, _ctx(pki, pki.client))

    none, stranger, right = _host(_settings(tls), calls)
    assert none and stranger and right == 200


def _listening(port: int) -> set[str]:
    """The local addresses anything on this machine listens on at TCP `port` (the kernel's socket
    tables, /proc/net/tcp and tcp6: state 0A is LISTEN, addresses are hex in host byte order)."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            rows = [line.split() for line in f.readlines()[1:]]
        for row in rows:
            addr, _, hex_port = row[1].partition(":")
            if row[3] != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(addr)
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))  # each 32-bit word is LE
            ip = ipaddress.ip_address(words)
            mapped = getattr(ip, "ipv4_mapped", None)  # grpc listens on a v6 socket bound to ::ffff:127.0.0.1
            found.add(str(mapped or ip))
    return found


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
def test_both_servers_bind_only_the_settings_host(host: str) -> None:
    async def calls(h: RouterHost) -> tuple:
        grpc_port = int(h._started.grpc.rsplit(":", 1)[1])
        http_port = int(h._started.http.rsplit(":", 1)[1])
        return h._started, _listening(grpc_port), _listening(http_port)

    addresses, grpc_bound, http_bound = _host(_settings(None, host), calls)
    assert addresses.grpc.startswith(f"{host}:") and addresses.http.startswith(f"http://{host}:")
    assert grpc_bound == {host} and http_bound == {host}  # nothing on 0.0.0.0, :: or another interface


def test_spec_tls_tenants_and_tokens_end_to_end(pki: Pki, tmp_path) -> None:  # noqa: ANN001
    """From a spec's security section to running servers: mTLS from its files, its tenant's token."""
    import yaml

    from orchestrator.spec import load_spec
    from orchestrator.worker_plan import model_config, router_settings

    (tmp_path / "team.token").write_text("team-token\n")
    spec = yaml.safe_load(Path("deploy/local.yaml").read_text())
    spec["router"] = {**spec.get("router", {}), "port": 0, "http_port": 0}
    spec["security"] = {"tls": {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
                                "client_ca_file": str(pki.ca)},
                        "tenants": [{"name": "team", "token_file": str(tmp_path / "team.token")}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    parsed = load_spec(tmp_path / "spec.yaml")
    settings = router_settings(parsed, model_config(parsed))

    async def calls(host: RouterHost) -> tuple:
        url = host._started.http
        port = int(host._started.grpc.rsplit(":", 1)[1])
        async with _secure(port, _creds(pki, identity=pki.client)) as ch:
            grpc_status = await _generate(ch, "team-token")
        return (await _models(url, _ctx(pki, pki.client), "team-token"),
                await _refused(url, _ctx(pki)), grpc_status)

    http_ok, no_cert, (grpc_code, _) = _host(settings, calls)
    assert http_ok == 200 and no_cert
    assert grpc_code == grpc.StatusCode.UNAVAILABLE  # through mTLS and the token; no workers registered
