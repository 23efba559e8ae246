"""The router's gRPC server: tandem.v1.Router/Generate, standard health and reflection.

Every server binds 127.0.0.1 unless told otherwise. With credentials, every call must carry
`authorization: Bearer <token>` of a tenant (UNAUTHENTICATED otherwise; PERMISSION_DENIED for the
admin token alone; health checks stay open so probes work). The caller's tenant and peer host go
to the frontend (cache salt, stream budgets). With TLS files the port is secure, and with a client
CA it requires client certificates. Messages over `max_request_bytes` are refused by grpc with
RESOURCE_EXHAUSTED. Statuses: the `RouterError` codes of the frontend; a client that goes away
cancels the request on its workers (the frontend's cleanup runs when grpc cancels the handler).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.router.frontend import Frontend, RouterError
from orchestrator.router.quotas import DEFAULT_MAX_REQUEST_BYTES
from orchestrator.router.tenancy import Caller, Credentials, Forbidden, Unauthenticated
from tandem.v1 import generate_pb2, generate_pb2_grpc

_SERVICE = "tandem.v1.Router"
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class ServerTls:
    """PEM contents (bytes) for the server's identity, and the CA for client certificates (mTLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None


def _authorization(metadata: object) -> str | None:
    """The `authorization` metadata value of a call (None when absent)."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == "authorization":
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def peer_host(peer: str) -> str:
    """The host part of a grpc peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/p")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return rest or peer


class _BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without a known bearer token before any handler runs (constant-time compare)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN_METHODS):
            return await continuation(details)
        try:
            self._credentials.resolve(_authorization(details.invocation_metadata))
        except Unauthenticated as exc:
            why = str(exc)

            async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

            return grpc.unary_stream_rpc_method_handler(deny) if details.method.endswith("/Generate") \
                else grpc.unary_unary_rpc_method_handler(deny)
        return await continuation(details)


class RouterServicer(generate_pb2_grpc.RouterServicer):
    """Generate over the frontend; RouterError becomes the matching status."""

    def __init__(self, frontend: Frontend, credentials: Credentials) -> None:
        self.frontend = frontend
        self.credentials = credentials

    async def Generate(self, request: generate_pb2.GenerateRequest,  # noqa: N802 (gRPC's name)
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generate_pb2.GenerateChunk]:
        try:
            caller = self._caller(context)
        except Forbidden as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except Unauthenticated as exc:  # the interceptor let it through: the metadata changed?
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        try:
            async for chunk in self.frontend.generate(request, caller):
                yield chunk
        except RouterError as exc:
            self.frontend.metrics.requests.labels(exc.code.value).inc()
            await context.abort(getattr(grpc.StatusCode, exc.code.value), exc.message)
        else:
            self.frontend.metrics.requests.labels("OK").inc()

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        header = _authorization(context.invocation_metadata())
        return self.credentials.caller(header, peer_host(context.peer()))


class RouterHealth:
    """The gRPC health service: "" (the process) SERVING while it serves; `tandem.v1.Router` SERVING
    or NOT_SERVING as the router's readiness says (`set_ready`, called when workers come and go)."""

    def __init__(self, ready: bool = True) -> None:
        self.servicer = health.aio.HealthServicer()
        self.ready = ready

    async def set_ready(self, ready: bool) -> None:
        self.ready = ready
        r = health_pb2.HealthCheckResponse
        await self.servicer.set(_SERVICE, r.SERVING if ready else r.NOT_SERVING)


async def start_server(frontend: Frontend, *, host: str = "127.0.0.1", port: int = 0,
                       token: str | None = None, credentials: Credentials | None = None,
                       tls: ServerTls | None = None,
                       max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                       health_service: RouterHealth | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the port it bound (port 0 picks a free one).

    `token` is shorthand for `Credentials.simple(token)` (one tenant, "default"); give at most one of
    the two. Neither: no authentication (local development only). `health_service`: the caller keeps
    the router service's health up to date (none: always SERVING)."""
    if token is not None and credentials is not None:
        raise ValueError("start_server: give token or credentials, not both")
    creds = credentials if credentials is not None else Credentials.simple(token)
    interceptors = [] if creds.open else [_BearerAuth(creds)]
    options = [("grpc.max_receive_message_length", max_request_bytes)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    generate_pb2_grpc.add_RouterServicer_to_server(RouterServicer(frontend, creds), server)
    health_service = health_service if health_service is not None else RouterHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_service.servicer, server)
    reflection.enable_server_reflection(
        (generate_pb2.DESCRIPTOR.services_by_name["Router"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        ssl = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                          require_client_auth=tls.client_ca is not None)
        bound = server.add_secure_port(address, ssl)
    if bound == 0:
        raise OSError(f"router: cannot bind {address}")
    await server.start()
    await health_service.set_ready(health_service.ready)
    await health_service.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound
