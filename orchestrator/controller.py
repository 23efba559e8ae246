"""The controller: a detached, named Ray actor that runs one deployment.

It places each worker instance in its own placement group (one NVLink domain), creates one actor
per rank, starts the router process and registers ready ranks with it, checks the ranks' health
every `health_interval_s` and replaces an instance whose rank died (and the router when it died:
same ports, every ready rank registered again, its KV index rebuilt from their snapshots), scales
pools up and down (scale-down drains: the instance leaves the router first, then goes when its
running requests have finished; past the drain timeout it goes anyway and the router migrates the
requests it still ran), and answers status. Everything it creates is named
under its deployment, so `down` removes exactly what it started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.adopt import find_instances, find_router
from orchestrator.autoscale.loop import AutoscaleTask, ScaleHooks, autoscale_task
from orchestrator.placement import group_requests, place
from orchestrator.rollout import plan_update, pool_shape, roll
from orchestrator.router.host import RouterAddresses, RouterHost
from orchestrator.spec import CpuTopology, DeploymentSpec, parse_spec
from orchestrator.worker_plan import InstancePlan, instance_plan, model_config, router_settings
from workers.actor_common import actor_name
from workers.decode import DecodeActor, NixlPuller
from workers.engine.engine import Role
from workers.prefill import PrefillActor

log = logging.getLogger(__name__)
CONTROLLER_NAME = "tandem-controller"
NAMESPACE = "tandem"
ROUTER_NAME = "tandem-router"


@dataclass
class Instance:
    """A running worker instance: its plan, placement group and rank actors."""

    plan: InstancePlan
    pg: object
    ranks: list = field(default_factory=list)
    state: str = "starting"  # starting | ready | draining | dead
    generation: int = 1  # the controller's config generation it was started with (see `apply`)
    shape: tuple = ()  # what it was started with (rollout.pool_shape); `apply` replaces it when it differs

    @property
    def role_name(self) -> str:
        return "prefill" if self.plan.role is Role.PREFILL else "decode"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Controller:
    """Async actor body (see the module docstring)."""

    def __init__(self, spec_data: dict, *, placement_timeout_s: float = 120.0,
                 health_interval_s: float = 1.0) -> None:
        self.spec: DeploymentSpec = parse_spec(spec_data, "controller")
        self.model_cfg = model_config(self.spec)
        self.placement_timeout_s = placement_timeout_s
        self.health_interval_s = health_interval_s
        self.instances: dict[str, Instance] = {}
        self.router = None
        self.replicas: list = []  # more router processes fed by the same workers and events
        self.addresses: RouterAddresses | None = None
        self.settings = router_settings(self.spec, self.model_cfg)
        self._next = {Role.PREFILL: 0, Role.DECODE: 0}
        self._health: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.generation = 1  # +1 each time `apply` rolls a pool
        self._autoscale: AutoscaleTask | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> dict:
        """Start the router and every instance of the spec; returns the status."""
        async with self._lock:
            if self.router is None:
                await self._adopt()
            if self.router is None:
                me = ray.get_runtime_context().current_actor
                self.router = ray.remote(RouterHost).options(
                    name=ROUTER_NAME, namespace=NAMESPACE, num_cpus=0, lifetime="detached",
                    max_concurrency=1000).remote(self.settings, me)
                self.addresses = await self.router.start.remote()
            want = {Role.PREFILL: self.spec.prefill.instances, Role.DECODE: self.spec.decode.instances}
            await asyncio.gather(*(self._add(role) for role, n in want.items()
                                   for _ in range(n - self._count(role))))
            if self._health is None:
                self._health = asyncio.ensure_future(self._health_loop())
            self._start_autoscale()
        return await self.status()

    def _start_autoscale(self) -> None:
        """Run the spec's autoscaler (orchestrator/autoscale/) when it is enabled and not running."""
        if self._autoscale is not None or not self.spec.autoscale.enabled:
            return
        hooks = ScaleHooks(snapshot=lambda: self.router.load_snapshot.remote(),
                           sizes=lambda: (self._count(Role.PREFILL), self._count(Role.DECODE)),
                           scale=lambda p, d: self.scale(p, d))
        self._autoscale = autoscale_task(self.spec, self.model_cfg, hooks,
                                         self.settings.rank_limits.initial_prefill_rate_tps)
        self._autoscale.start()

    def _stop_autoscale(self) -> None:
        if self._autoscale is not None:
            self._autoscale.stop()
            self._autoscale = None

    async def _adopt(self) -> None:
        """Rebuild state from what a previous controller of this deployment left running."""
        router = find_router(ROUTER_NAME, NAMESPACE)
        if router is None:
            return
        self.router = router
        self.addresses = await router.start.remote()  # idempotent: the addresses it serves on
        await router.set_controller.remote(ray.get_runtime_context().current_actor)
        for found in find_instances(NAMESPACE, self.spec.name):
            role = Role.PREFILL if found.role == "prefill" else Role.DECODE
            local = isinstance(self.spec.topology, CpuTopology)
            plan = instance_plan(self.spec, role, found.instance,
                                 nvlink_domain="local" if local else found.instance)
            shape = pool_shape(self.spec, role)  # taken as the spec's: nothing says otherwise
            self.instances[found.instance] = Instance(plan, found.placement_group, list(found.ranks), "ready",
                                                      shape=shape)
            self._next[role] = max(self._next[role], found.index + 1)
        log.info("adopted router and %d instances", len(self.instances))

    def _count(self, role: Role) -> int:
        return sum(1 for i in self.instances.values() if i.plan.role is role and i.state != "draining")

    async def _add(self, role: Role) -> Instance:
        prefix = "prefill" if role is Role.PREFILL else "decode"
        instance_id = f"{prefix}-{self._next[role]}"
        self._next[role] += 1
        pool = self.spec.prefill if role is Role.PREFILL else self.spec.decode
        reqs = group_requests(instance_id, pool, self.spec.topology, ray.cluster_resources())
        pg = await asyncio.to_thread(place, reqs, self.placement_timeout_s, name_prefix=self.spec.name)
        local = isinstance(self.spec.topology, CpuTopology)
        plan = instance_plan(self.spec, role, instance_id, nvlink_domain="local" if local else instance_id,
                             master_port=_free_port())
        inst = Instance(plan, pg, generation=self.generation, shape=pool_shape(self.spec, role))
        self.instances[instance_id] = inst
        cls = PrefillActor if role is Role.PREFILL else DecodeActor
        for cfg in plan.configs:
            opts = dict(name=actor_name(cfg.instance, cfg.rank), namespace=NAMESPACE, lifetime="detached",
                        max_concurrency=1000, max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, cfg.rank))
            if local:
                opts["num_cpus"] = 0.01
            else:
                opts |= {"num_cpus": 1, "num_gpus": pool.gpus_per_rank}
            args = (cfg,) if role is Role.PREFILL else (cfg, NixlPuller(namespace=NAMESPACE))
            inst.ranks.append(cls.options(**opts).remote(*args))
        await asyncio.gather(*(r.ready.remote() for r in inst.ranks))
        for cfg, handle in zip(plan.configs, inst.ranks, strict=True):
            for r in self._routers():
                await r.add_worker.remote(cfg.instance, cfg.rank, inst.role_name, handle)
        inst.state = "ready"
        log.info("instance %s ready (%d ranks)", instance_id, len(inst.ranks))
        return inst

    async def _remove(self, inst: Instance, drain_timeout_s: float) -> None:
        """Drain: leave the router, wait for running requests to end (or the timeout), then go."""
        inst.state = "draining"
        for cfg in inst.plan.configs:
            for r in self._routers():
                await r.drain_worker.remote(cfg.instance, cfg.rank)
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            try:
                stats = await asyncio.gather(*(r.stats.remote() for r in inst.ranks))
            except ray.exceptions.RayError:
                break
            idle = all(s.running_requests == 0 and s.queued_requests == 0 for s in stats)
            if idle and inst.plan.role is Role.PREFILL:  # handoffs not yet pulled still need it
                idle = sum(await asyncio.gather(*(r.handoffs_held.remote() for r in inst.ranks))) == 0
            if idle:
                break
            await asyncio.sleep(0.1)
        for cfg in inst.plan.configs:
            for r in self._routers():
                await r.remove_worker.remote(cfg.instance, cfg.rank)
        self._kill(inst)

    def _kill(self, inst: Instance) -> None:
        from ray.util.placement_group import remove_placement_group

        for r in inst.ranks:
            ray.kill(r, no_restart=True)
        remove_placement_group(inst.pg)
        self.instances.pop(inst.plan.instance, None)

    def _routers(self) -> list:
        return [r for r in (self.router, *self.replicas) if r is not None]

    async def _register_ready(self, router) -> None:  # noqa: ANN001
        """Register every rank of every ready instance with `router`."""
        for inst in [i for i in self.instances.values() if i.state == "ready"]:
            for cfg, handle in zip(inst.plan.configs, inst.ranks, strict=True):
                await router.add_worker.remote(cfg.instance, cfg.rank, inst.role_name, handle)

    async def add_router(self) -> dict:
        """Start one more router process (free ports) serving the same workers; returns its addresses.
        Each router follows every rank's token stream and KV events on its own."""
        async with self._lock:
            settings = dataclasses.replace(self.settings, grpc_port=0, http_port=0)
            me = ray.get_runtime_context().current_actor
            replica = ray.remote(RouterHost).options(num_cpus=0, max_concurrency=1000).remote(settings, me)
            addresses = await replica.start.remote()
            await self._register_ready(replica)
            self.replicas.append(replica)
        return {"router_address": addresses.grpc, "http_address": addresses.http}

    # --- operator calls ------------------------------------------------------------------------
    async def scale(self, prefill: int | None, decode: int | None, drain_timeout_s: float = 60.0) -> dict:
        """Grow or shrink the pools to the given instance counts (either alone)."""
        if decode is not None and decode < 1:
            raise ValueError(f"scale: decode must be >= 1, got {decode}")
        async with self._lock:
            for role, want in ((Role.PREFILL, prefill), (Role.DECODE, decode)):
                if want is not None:
                    await self._resize(role, want, drain_timeout_s)
        return await self.status()

    async def _resize(self, role: Role, want: int, drain_timeout_s: float) -> None:
        have = [i for i in self.instances.values() if i.plan.role is role and i.state != "draining"]
        if want > len(have):
            await asyncio.gather(*(self._add(role) for _ in range(want - len(have))))
        for inst in sorted(have, key=lambda i: (i.generation, i.plan.instance))[want:][::-1]:
            await self._remove(inst, drain_timeout_s)

    async def apply(self, spec_data: dict, drain_timeout_s: float = 60.0) -> dict:
        """Apply a changed spec of this deployment as a rolling change (orchestrator/rollout.py):
        router settings in place; each pool whose instances' config changed replaced one instance at
        a time, the new one ready before an old one drains; then the new instance counts; the
        autoscaler restarts with the new spec's section. ValueError names a field that cannot change."""
        new = parse_spec(spec_data, "apply")
        cfg = model_config(new)
        plan = plan_update(self.spec, new, self.settings, lambda: router_settings(new, cfg))
        async with self._lock:
            self._stop_autoscale()
            try:
                self.spec, self.model_cfg = new, cfg
                if plan.router is not None:
                    for r in self._routers():
                        own = dataclasses.replace(plan.router, grpc_port=0, http_port=0)
                        await r.apply_settings.remote(plan.router if r is self.router else own)
                    self.settings = plan.router
                # Every instance started unlike the new spec rolls (also those an interrupted apply left).
                stale = {role: sorted(i.plan.instance for i in self.instances.values() if i.plan.role is role
                                      and i.state == "ready" and i.shape != shape)
                         for role, shape in ((r, pool_shape(new, r)) for r in (Role.PREFILL, Role.DECODE))}
                self.generation += 1 if any(stale.values()) else 0
                for role, old in stale.items():
                    await roll(old, lambda role=role: self._add(role),
                               lambda name: self._remove(self.instances[name], drain_timeout_s))
                auto = new.autoscale  # on: the pools keep their sizes, within the new bounds
                for role, pool, b in ((Role.PREFILL, new.prefill, auto.prefill),
                                      (Role.DECODE, new.decode, auto.decode)):
                    want = min(max(self._count(role), b.min), b.max) if auto.enabled else pool.instances
                    await self._resize(role, want, drain_timeout_s)
            finally:
                self._start_autoscale()
        return await self.status()

    async def drain(self, worker: str, timeout_s: float = 60.0) -> dict:
        """Drain one instance ("decode-1" or "decode-1/r0") and remove it."""
        instance_id = worker.split("/")[0]
        inst = self.instances.get(instance_id)
        if inst is None:
            raise KeyError(f"drain: no instance {instance_id!r}; have {sorted(self.instances)}")
        async with self._lock:
            await self._remove(inst, timeout_s)
        return await self.status()

    async def down(self, wait: bool = True) -> None:
        """Remove every instance and the router. With wait=False it returns at once and tears down
        a moment later, so a caller served by the router (the HTTP admin route) gets its answer."""
        if not wait:
            asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(self._down_and_exit()))
            return
        if self._health is not None:
            self._health.cancel()
        self._stop_autoscale()
        for replica in self.replicas:
            await replica.stop.remote()
            ray.kill(replica, no_restart=True)
        self.replicas = []
        if self.router is not None:
            try:
                await self.router.stop.remote()
            finally:
                ray.kill(self.router, no_restart=True)
                self.router = None
        for inst in list(self.instances.values()):
            self._kill(inst)

    async def _down_and_exit(self) -> None:
        await self.down()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def status(self) -> dict:
        """The deployment's state as `tandem status --json` prints it."""
        out = []
        order = sorted(self.instances.values(), key=lambda i: (i.role_name != "prefill", i.plan.instance))
        for inst in order:
            row = {"id": inst.plan.instance, "role": inst.role_name, "ranks": len(inst.ranks),
                   "state": inst.state, "generation": inst.generation}
            if inst.state == "ready":
                try:
                    stats = await asyncio.wait_for(asyncio.gather(*(r.stats.remote() for r in inst.ranks)), 5)
                    row |= {"running": sum(s.running_requests for s in stats),
                            "queued": sum(s.queued_requests for s in stats),
                            "kv_blocks_used": sum(s.kv_blocks_used for s in stats),
                            "kv_blocks_total": sum(s.kv_blocks_used + s.kv_blocks_free for s in stats)}
                except (ray.exceptions.RayError, TimeoutError):
                    row["state"] = "dead"
            out.append(row)
        roles = {r["role"] for r in out if r["state"] == "ready"}
        need = {"decode"} | ({"prefill"} if self.spec.prefill.instances else set())
        ready = bool(out) and all(r["state"] == "ready" for r in out) and need <= roles
        addr = self.addresses
        auto = self._autoscale.status() if self._autoscale is not None else {"enabled": False}
        return {"name": self.spec.name, "ready": ready, "router_address": addr.grpc if addr else "",
                "http_address": addr.http if addr else "", "instances": out, "generation": self.generation,
                "autoscale": auto}

    async def tokens(self) -> dict:
        """The client and admin tokens (for `tandem serve`'s state file)."""
        return {"token": self.settings.token, "admin_token": self.settings.admin_token}

    # --- health --------------------------------------------------------------------------------
    async def _check_router(self) -> None:
        """Restart the router if its actor died; a router that failed to start is retried next round."""
        if self.router is None:
            return
        try:
            await asyncio.wait_for(self.router.start.remote(), max(5.0, 5 * self.health_interval_s))
            return
        except ray.exceptions.RayActorError as exc:
            log.error("the router died (%s): restarting it", type(exc).__name__)
        async with self._lock:
            old = self.addresses
            settings = self.settings
            if old is not None:  # the same listeners: clients reconnect where they were
                settings = dataclasses.replace(settings, grpc_port=int(old.grpc.rsplit(":", 1)[1]),
                                               http_port=int(old.http.rsplit(":", 1)[1]))
            me = ray.get_runtime_context().current_actor
            self.router = ray.remote(RouterHost).options(
                name=ROUTER_NAME, namespace=NAMESPACE, num_cpus=0, lifetime="detached",
                max_concurrency=1000).remote(settings, me)
            try:
                self.addresses = await self.router.start.remote()
                await self._register_ready(self.router)
            except BaseException:  # a half-started router (no ports, missing ranks) is replaced next round
                ray.kill(self.router, no_restart=True)
                raise
            log.info("router restarted at %s", self.addresses.grpc)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self._check_router()
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.error("router check failed (%s): trying again in %.1f s", exc, self.health_interval_s)
            for inst in [i for i in self.instances.values() if i.state == "ready"]:
                try:
                    # health, not stats: stats waits for the engine lock, which a long step holds
                    await asyncio.wait_for(asyncio.gather(*(r.health.remote() for r in inst.ranks)),
                                           max(5.0, 5 * self.health_interval_s))
                except (ray.exceptions.RayError, TimeoutError) as exc:
                    log.error("instance %s failed its health check (%s): replacing it",
                              inst.plan.instance, exc)
                    async with self._lock:
                        for cfg in inst.plan.configs:
                            for r in self._routers():
                                await r.remove_worker.remote(cfg.instance, cfg.rank)
                        self._kill(inst)
                        await self._add(inst.plan.role)


ControllerActor = ray.remote(Controller)
