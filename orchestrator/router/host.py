"""The router process: a Ray actor serving gRPC Generate and the HTTP API from one event loop.

The controller starts it with `RouterSettings` (frozen, torch-free: everything the router needs
that comes from the spec or the model), then registers each worker rank as it becomes ready.
`start` binds both servers (port 0 picks a free one) and returns their addresses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from orchestrator.router.admission import Limits
from orchestrator.router.frontend import Frontend
from orchestrator.router.inputs import FleetParams, Role, WorkerId
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.load import LoadSnapshot, read_counters
from orchestrator.router.metrics import RouterMetrics
from orchestrator.router.policy import PolicyName
from orchestrator.router.policy_kv import KvParams, KvPolicy
from orchestrator.router.quotas import RequestLimits
from orchestrator.router.ray_gateway import RankLimits, RayGateway
from orchestrator.router.router import Router
from orchestrator.router.server import RouterHealth, ServerTls, start_server
from orchestrator.router.tenancy import Credentials, Tenant, TenantToken
from orchestrator.router.worker_metrics import WorkerStatsCollector
from tandem.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsPaths:
    """PEM files of the servers' identity; with client_ca both servers require client certificates."""

    cert: str
    key: str
    client_ca: str | None = None

    def for_grpc(self) -> ServerTls:
        def read(p: str) -> bytes:
            with open(p, "rb") as f:
                return f.read()

        return ServerTls(read(self.cert), read(self.key), read(self.client_ca) if self.client_ca else None)

    def for_uvicorn(self) -> dict:
        import ssl

        out: dict = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca:
            out |= {"ssl_ca_certs": self.client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return out


@dataclass(frozen=True)
class RouterSettings:
    """Everything the router process needs (built by the controller from the spec and the model)."""

    host: str
    grpc_port: int
    http_port: int
    policy: PolicyName
    fleet: FleetParams
    limits: Limits
    rank_limits: RankLimits
    model_name: str
    checkpoint: str | None  # tokenizer source; None = the byte tokenizer
    token: str | None = None
    admin_token: str | None = None
    tls: TlsPaths | None = None
    report_interval_s: float = 0.25
    kv_params: KvParams = KvParams()  # the `kv` policy's weights (spec router.weights)
    tenants: tuple[TenantToken, ...] = ()  # besides "default" (whose token is `token`)
    quotas: RequestLimits = RequestLimits()  # the spec's limits: section
    max_migrations: int = 2  # worker losses a request survives (spec router.max_migrations)

    def credentials(self) -> Credentials:
        """Who may call: `token` is the "default" tenant's, then the spec's tenants, and the admin token."""
        default = [TenantToken(Tenant("default"), self.token)] if self.token is not None else []
        return Credentials([*default, *self.tenants], self.admin_token)


# What a running router cannot change in place (its listeners and identity).
_FIXED_SETTINGS = ("host", "grpc_port", "http_port", "tls", "token", "admin_token", "tenants", "model_name")


@dataclass(frozen=True)
class RouterAddresses:
    grpc: str  # host:port
    http: str  # http://host:port


class RouterHost:
    """Async Ray actor body. One per deployment (replicas later, fed by the same events)."""

    def __init__(self, settings: RouterSettings, admin_actor: object | None = None) -> None:
        self.settings = settings
        self.admin_actor = admin_actor
        self.registry = CollectorRegistry()
        self.index = KvIndex()
        self._started: RouterAddresses | None = None
        self._start_lock = asyncio.Lock()  # a second caller (health check, test) waits for the first
        self._admin = None
        self._grpc = None
        self._http = None
        self.gateway: RayGateway | None = None
        self._frontend: Frontend | None = None
        self._health = RouterHealth(ready=False)  # NOT_SERVING until a decode worker is registered

    async def start(self) -> RouterAddresses:
        """Bind and serve; idempotent, also for concurrent callers."""
        async with self._start_lock:
            if self._started is None:
                self._started = await self._start()
            return self._started

    async def _start(self) -> RouterAddresses:
        s = self.settings
        metrics = RouterMetrics(self.registry)
        self.gateway = RayGateway(self.index, s.rank_limits, report_interval_s=s.report_interval_s,
                                  metrics=metrics)
        self.registry.register(WorkerStatsCollector(self.gateway.rank_reports))  # tandem_worker_* series
        frontend = Frontend(tokenizer=load_tokenizer(s.checkpoint), limits=s.limits,
                            router=self._router(), index=self.index, gateway=self.gateway, metrics=metrics,
                            max_migrations=s.max_migrations, quotas=s.quotas)
        self._frontend = frontend
        self._grpc, grpc_port = await start_server(frontend, host=s.host, port=s.grpc_port,
                                                   credentials=s.credentials(),
                                                   tls=s.tls.for_grpc() if s.tls else None,
                                                   max_request_bytes=s.quotas.max_request_bytes,
                                                   health_service=self._health)
        http_port = await self._start_http(frontend)
        scheme = "https" if s.tls else "http"
        return RouterAddresses(f"{s.host}:{grpc_port}", f"{scheme}://{s.host}:{http_port}")

    def _router(self) -> Router:
        s = self.settings
        if s.policy is PolicyName.KV:  # Tandem's policy takes the spec's weights
            return Router(KvPolicy(s.fleet, s.kv_params), s.fleet)
        return Router.named(s.policy, s.fleet)  # the peers' policies run at their published defaults

    async def _start_http(self, frontend: Frontend) -> int:
        import uvicorn

        from orchestrator.api.admin_client import ControllerAdmin
        from orchestrator.api.app import create_app
        from orchestrator.api.auth import Auth

        s = self.settings
        admin = ControllerAdmin(self.admin_actor) if self.admin_actor is not None else None
        self._admin = admin
        app = create_app(frontend, model_name=s.model_name, auth=Auth(credentials=s.credentials()),
                         registry=self.registry, admin=admin, max_request_bytes=s.quotas.max_request_bytes)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((s.host, s.http_port))
        port = sock.getsockname()[1]
        kwargs = s.tls.for_uvicorn() if s.tls is not None else {}
        config = uvicorn.Config(app, log_level="warning", lifespan="off", **kwargs)
        self._http = uvicorn.Server(config)
        asyncio.ensure_future(self._http.serve(sockets=[sock]))
        for _ in range(200):
            if self._http.started:
                break
            await asyncio.sleep(0.01)
        return port

    async def set_controller(self, controller: object) -> None:
        """A restarted controller takes over the admin routes."""
        self.admin_actor = controller
        if self._admin is not None:
            self._admin.controller = controller

    async def add_worker(self, instance: str, rank: int, role: str, handle: object) -> None:
        """Route to a ready rank from now on (role: "prefill" or "decode"). Its KV index entries
        start from its snapshot, so a restarted router routes cached prefixes as before."""
        assert self.gateway is not None, "start() first"
        stats = await handle.stats.remote()
        snapshot = await handle.kv_snapshot.remote()
        self.gateway.add(WorkerId(instance, rank), Role(role), handle, stats, snapshot)
        await self._update_health()

    async def _update_health(self) -> None:
        """Keep the gRPC health of the router service equal to its readiness; log each change."""
        if self._frontend is None:
            return
        now = self._frontend.readiness()
        if now.ready != self._health.ready:
            log.info("router %s", "ready: workers registered" if now.ready else f"not ready: {now.reason}")
        await self._health.set_ready(now.ready)

    async def kv_holdings(self, instance: str, rank: int) -> frozenset[int]:
        """The block hashes this router's KV index holds for a rank (operators, tests)."""
        return frozenset(self.index.holdings(WorkerId(instance, rank)))

    async def drain_worker(self, instance: str, rank: int) -> None:
        """No new requests for a rank; its running ones finish."""
        if self.gateway is not None:
            self.gateway.drain(WorkerId(instance, rank))
            await self._update_health()

    async def remove_worker(self, instance: str, rank: int) -> None:
        """Stop routing to a rank (drain or death)."""
        if self.gateway is not None:
            self.gateway.remove(WorkerId(instance, rank), "removed by the controller")
            await self._update_health()

    async def load_snapshot(self) -> LoadSnapshot:
        """Request counters and every rank's last report, for the controller's autoscaler."""
        assert self.gateway is not None, "start() first"
        return LoadSnapshot(time.monotonic(), read_counters(self.registry), self.gateway.loads())

    async def apply_settings(self, settings: RouterSettings) -> None:
        """Take changed settings in place, without dropping a request: policy and its weights,
        disaggregation thresholds, limits and quotas, rank limits, migrations, tokenizer source.
        Requests in flight finish under the router they were booked with. The listeners (host,
        ports, TLS, message size limit, tokens) and the served model name cannot change in place:
        ValueError naming the field."""
        assert self.gateway is not None and self._frontend is not None, "start() first"
        fixed = [(n, getattr(self.settings, n), getattr(settings, n)) for n in _FIXED_SETTINGS]
        fixed.append(("quotas.max_request_bytes", self.settings.quotas.max_request_bytes,
                      settings.quotas.max_request_bytes))
        for name, was, now in fixed:
            if was != now:
                raise ValueError(f"router settings: {name} cannot change on a running router "
                                 f"({was!r} -> {now!r})")
        old, self.settings = self.settings, settings
        self.gateway.limits = settings.rank_limits
        self._frontend.limits = settings.limits
        self._frontend.quotas = self._frontend.slots.limits = settings.quotas  # open streams stay counted
        self._frontend.max_migrations = settings.max_migrations
        if settings.checkpoint != old.checkpoint:  # a real tokenizer takes a while to parse: only if it moved
            self._frontend.tokenizer = load_tokenizer(settings.checkpoint)
        self._frontend.router = self._router()
        await self._update_health()  # the disaggregation mode may have changed what ready needs
        log.info("router settings applied in place (policy %s)", settings.policy.value)

    async def stop(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(1.0)
