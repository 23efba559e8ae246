"""A local deployment for fault tests, a bounded load against it, and the checks that follow a fault.

`start(spec)` runs one deployment from a spec built in the test (a controller with a short health
interval, so dead ranks and a dead router are replaced within about a second). `Load` sends a
fixed set of greedy requests from threads and records, per request, its tokens and final chunk or
its gRPC status; the test injects its fault while the load runs. `wait_idle` then checks that
every rank is back to zero used KV blocks, nothing queued or running, and no handoff held.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from orchestrator.router.client import generate, make_request, open_channel
from orchestrator.spec import DeploymentSpec
from tandem.v1 import generate_pb2

NAMESPACE = "tandem"


@dataclass
class Deployment:
    ray: object  # the ray module of the test session
    ctl: object
    status: dict
    token: str
    admin_token: str

    def refresh(self, ray) -> dict:  # noqa: ANN001
        self.status = ray.get(self.ctl.status.remote(), timeout=30)
        return self.status

    def rank(self, ray, instance: str):  # noqa: ANN001, ANN201
        """The rank-0 actor of `instance`."""
        return ray.get_actor(f"tandem/{instance}/r0", namespace=NAMESPACE)

    def instances(self, role: str) -> list[str]:
        """The instances of `role` now (the controller may have replaced one since the last look)."""
        self.refresh(self.ray)
        return [i["id"] for i in self.status["instances"] if i["role"] == role]

    def metric(self, name: str) -> float:
        """A sample of the router's /metrics (0 when absent)."""
        with urllib.request.urlopen(self.status["http_address"] + "/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0


def start(ray, spec: DeploymentSpec, *, health_interval_s: float = 0.5) -> Deployment:  # noqa: ANN001
    """Start `spec` under a new controller (checkpoint path made absolute, as the deploy entry does)."""
    from orchestrator.controller import CONTROLLER_NAME, ControllerActor

    ckpt = spec.model.checkpoint
    if ckpt is not None:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"checkpoint": str(Path(ckpt).resolve())})})
    ctl = ControllerActor.options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                                  max_concurrency=1000).remote(spec.model_dump(mode="json"), placement_timeout_s=60,
                                                               health_interval_s=health_interval_s)
    status = ray.get(ctl.start.remote(), timeout=180)
    tokens = ray.get(ctl.tokens.remote())
    return Deployment(ray, ctl, status, tokens["token"], tokens["admin_token"])


def stop(ray, dep: Deployment) -> None:  # noqa: ANN001
    try:
        ray.get(dep.ctl.down.remote(), timeout=60)
    finally:
        ray.kill(dep.ctl)


@dataclass
class Outcome:
    """One request's stream: every chunk, or the gRPC status it ended with."""

    chunks: list[generate_pb2.GenerateChunk] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def last(self) -> generate_pb2.GenerateChunk:
        return self.chunks[-1]


class Load:
    """`prompts` sent at once (one thread each) as ignore_eos requests of `max_tokens`: greedy, or
    as `extra` says (e.g. temperature and seed)."""

    def __init__(self, dep: Deployment, prompts: list[list[int]], *, max_tokens: int, salt: str,
                 address: str | None = None, extra: dict | None = None) -> None:
        self.dep, self.prompts, self.max_tokens, self.salt = dep, prompts, max_tokens, salt
        self.address = address or dep.status["router_address"]
        self.extra = extra or {}
        self.outcomes = [Outcome() for _ in prompts]
        self._lock = threading.Lock()
        self._streamed = 0
        self._pool = ThreadPoolExecutor(len(prompts))
        self._futures: list[Future[None]] = []

    def start(self) -> Load:
        self._futures = [self._pool.submit(self._one, i) for i in range(len(self.prompts))]
        return self

    def _one(self, i: int) -> None:
        req = make_request(token_ids=self.prompts[i], max_tokens=self.max_tokens, ignore_eos=True,
                           cache_salt=self.salt, request_id=f"{self.salt}-{i}", **self.extra)
        out = self.outcomes[i]
        try:
            with open_channel(self.address) as ch:
                for chunk in generate(ch, req, token=self.dep.token, timeout_s=120):
                    out.chunks.append(chunk)
                    with self._lock:
                        self._streamed += len(chunk.token_ids)
        except grpc.RpcError as exc:
            out.code, out.details = exc.code(), exc.details()

    @property
    def streamed(self) -> int:
        with self._lock:
            return self._streamed

    def wait_streamed(self, tokens: int, timeout_s: float = 60) -> None:
        """Block until the clients have received `tokens` tokens in all (the fault lands mid-stream)."""
        end = time.monotonic() + timeout_s
        while self.streamed < tokens:
            if time.monotonic() > end:
                raise TimeoutError(f"only {self.streamed} of {tokens} tokens streamed in {timeout_s} s")
            time.sleep(0.005)

    def finish(self, timeout_s: float = 150) -> list[Outcome]:
        for f in self._futures:
            f.result(timeout=timeout_s)
        self._pool.shutdown()
        return self.outcomes


def run(dep: Deployment, prompts: list[list[int]], *, max_tokens: int, salt: str,
        extra: dict | None = None) -> list[Outcome]:
    """A load with no fault: the reference a faulted run must match."""
    return Load(dep, prompts, max_tokens=max_tokens, salt=salt, extra=extra).start().finish()


def busiest(ray, dep: Deployment, role: str) -> str:  # noqa: ANN001
    """The instance of `role` with the most requests queued or running now."""
    def load(inst: str) -> int:
        s = ray.get(dep.rank(ray, inst).stats.remote(), timeout=10)
        return s.running_requests + s.queued_requests

    return max(dep.instances(role), key=load)


def wait_busy(ray, dep: Deployment, role: str, requests: int, timeout_s: float = 60) -> str:  # noqa: ANN001
    """The first instance of `role` seen with at least `requests` queued or running (polled)."""
    handles = {inst: dep.rank(ray, inst) for inst in dep.instances(role)}
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for inst, h in handles.items():
            s = ray.get(h.stats.remote(), timeout=10)
            if s.running_requests + s.queued_requests >= requests:
                return inst
    raise TimeoutError(f"no {role} instance had {requests} requests within {timeout_s} s")


def wait_ready(ray, dep: Deployment, prefill: int, decode: int, timeout_s: float = 90) -> dict:  # noqa: ANN001
    """Wait until the deployment is ready with these instance counts (dead ones replaced)."""
    end = time.monotonic() + timeout_s
    while True:
        st = dep.refresh(ray)
        if st["ready"] and len(dep.instances("prefill")) == prefill and len(dep.instances("decode")) == decode:
            return st
        if time.monotonic() > end:
            raise TimeoutError(f"deployment not back to {prefill}P + {decode}D: {st}")
        time.sleep(0.2)


def rank_usage(ray, dep: Deployment) -> dict[str, tuple[int, int, int, int]]:  # noqa: ANN001
    """(KV blocks used, running, queued, handoffs held) of every rank."""
    out = {}
    for inst in dep.instances("prefill") + dep.instances("decode"):
        h = dep.rank(ray, inst)
        s = ray.get(h.stats.remote(), timeout=10)
        held = ray.get(h.handoffs_held.remote(), timeout=10) if inst.startswith("prefill") else 0
        out[inst] = (s.kv_blocks_used, s.running_requests, s.queued_requests, held)
    return out


def wait_idle(ray, dep: Deployment, timeout_s: float = 20) -> dict[str, tuple[int, int, int, int]]:  # noqa: ANN001
    """Wait until every rank has no KV block in use, nothing running or queued and no handoff held
    (leases are short in these specs); returns the last reading, which the caller asserts on."""
    end = time.monotonic() + timeout_s
    while True:
        usage = rank_usage(ray, dep)
        if all(v == (0, 0, 0, 0) for v in usage.values()) or time.monotonic() > end:
            return usage
        time.sleep(0.2)
