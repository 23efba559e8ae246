"""The router's gRPC server: tandem.v1.Router/Generate, standard health and reflection.

Every server binds 127.0.0.1 unless told otherwise. With a token, every call must carry
`authorization: Bearer <token>` (UNAUTHENTICATED otherwise; health checks stay open so probes
work). With TLS files the port is secure, and with a client CA it requires client certificates.
Statuses: the `RouterError` codes of the frontend; a client that goes away cancels the request
on its workers (the frontend's cleanup runs when grpc cancels the handler).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.router.frontend import Frontend, RouterError
from tandem.v1 import generate_pb2, generate_pb2_grpc

_SERVICE = "tandem.v1.Router"
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class ServerTls:
    """PEM contents (bytes) for the server's identity, and the CA for client certificates (mTLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None


class _BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without the right bearer token (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN_METHODS):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._want):
            return await continuation(details)

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return grpc.unary_stream_rpc_method_handler(deny) if details.method.endswith("/Generate") \
            else grpc.unary_unary_rpc_method_handler(deny)


class RouterServicer(generate_pb2_grpc.RouterServicer):
    """Generate over the frontend; RouterError becomes the matching status."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def Generate(self, request: generate_pb2.GenerateRequest,  # noqa: N802 (gRPC's name)
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generate_pb2.GenerateChunk]:
        try:
            async for chunk in self.frontend.generate(request):
                yield chunk
        except RouterError as exc:
            self.frontend.metrics.requests.labels(exc.code.value).inc()
            await context.abort(getattr(grpc.StatusCode, exc.code.value), exc.message)
        else:
            self.frontend.metrics.requests.labels("OK").inc()


async def start_server(frontend: Frontend, *, host: str = "127.0.0.1", port: int = 0,
                       token: str | None = None, tls: ServerTls | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the port it bound (port 0 picks a free one)."""
    interceptors = [_BearerAuth(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors)
    generate_pb2_grpc.add_RouterServicer_to_server(RouterServicer(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (generate_pb2.DESCRIPTOR.services_by_name["Router"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                            require_client_auth=tls.client_ca is not None)
        bound = server.add_secure_port(address, creds)
    if bound == 0:
        raise OSError(f"router: cannot bind {address}")
    await server.start()
    await health_servicer.set(_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound
