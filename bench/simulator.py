"""Fleet simulator speed: simulated requests per second of wall time on a 72-GPU GB200 NVL72 fleet.

Replays the Mooncake synthetic trace (3,993 requests) through `Simulator` once per routing policy.
Baseline, measured in the same run: the router alone (`Router.route` + `KvIndex.match`, the code
the simulator must call per request) on the same requests against the fleet's idle worker states,
which bounds how fast any simulator driving these policy objects can go. The simulator's own
share (its events, batching, KV caches, cost model) is reported as `core req/s`: requests over
wall time minus the time spent inside the router during the run. The machine is shared, so the
process CPU time of each run is reported next to wall time (`req/cpu-s`). Target: 50,000 req/s.

    python bench/simulator.py [--json PATH] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from orchestrator.planner.cost import Parallelism
from orchestrator.planner.fleet import FleetConfig, PoolConfig
from orchestrator.planner.hardware import GpuKind
from orchestrator.planner.models import ModelName, Precision
from orchestrator.planner.sim import Simulator
from orchestrator.planner.trace import load_mooncake
from orchestrator.router.inputs import RouteRequest
from orchestrator.router.kv_index import KvIndex
from orchestrator.router.policy import PolicyName
from orchestrator.router.router import Router

TARGET = 50_000
TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake-synthetic.jsonl"


def fleet(policy: PolicyName) -> FleetConfig:
    """72 GB200 GPUs: 10 prefill and 8 decode instances of 4 GPUs (EP4), V4-Flash."""
    return FleetConfig(
        model=ModelName.V4_FLASH, gpu=GpuKind.GB200, precision=Precision.FP4, domain_gpus=72,
        prefill=PoolConfig(instances=10, par=Parallelism(4, 1, 4), max_batch=8, max_batched_tokens=16384),
        decode=PoolConfig(instances=8, par=Parallelism(4, 1, 4), max_batch=256, max_batched_tokens=8192),
        policy=policy)


class _TimedRouter:
    """Wraps the simulator's router to add up the wall time spent inside `route`."""

    def __init__(self, inner: Router) -> None:
        self.inner = inner
        self.seconds = 0.0

    def route(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - a transparent wrapper
        t = time.perf_counter()
        out = self.inner.route(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        return out

    def prefill_done(self, request_id: str) -> None:
        self.inner.prefill_done(request_id)

    def finish(self, request_id: str) -> None:
        self.inner.finish(request_id)


def router_only(policy: PolicyName, requests: list) -> float:
    """Requests per second of the router alone against the fleet's idle states."""
    sim = Simulator(fleet(policy), requests)
    states = sim._states()
    router, index = Router.named(policy, sim.params), KvIndex()
    rreqs = [RouteRequest(r.request_id, r.prompt_tokens, r.block_hashes, r.session_id) for r in requests]
    t = time.perf_counter()
    for r in rreqs:
        router.route(r, states, index.match(r.block_hashes), 0.0)
        router.finish(r.request_id)
    return len(rreqs) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    args = parser.parse_args(argv)
    requests = load_mooncake(TRACE, args.limit)
    rows = []
    for policy in PolicyName:
        sim = Simulator(fleet(policy), requests)
        timed = _TimedRouter(sim.router)
        sim.router = timed
        t, c = time.perf_counter(), time.process_time()
        res = sim.run()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        rows.append({
            "policy": policy.value, "requests": len(requests), "gpus": sim.fleet.gpus, "wall_s": wall,
            "cpu_s": cpu, "sim_req_per_s": len(requests) / wall, "sim_req_per_cpu_s": len(requests) / cpu,
            "router_only_req_per_s": router_only(policy, requests),
            "router_share": timed.seconds / wall, "core_req_per_s": len(requests) / max(wall - timed.seconds, 1e-9),
            "hit_rate": res.hit_rate, "target_req_per_s": TARGET,
        })
    print(f"{'policy':<12} {'requests':>8} {'wall s':>7} {'sim req/s':>10} {'req/cpu-s':>10} "
          f"{'router-only req/s':>18} {'router share':>12} {'core req/s':>11} {'hit rate':>8}")
    for r in rows:
        print(f"{r['policy']:<12} {r['requests']:>8} {r['wall_s']:>7.2f} {r['sim_req_per_s']:>10.0f} "
              f"{r['sim_req_per_cpu_s']:>10.0f} {r['router_only_req_per_s']:>18.0f} {r['router_share']:>12.0%} "
              f"{r['core_req_per_s']:>11.0f} {r['hit_rate']:>8.3f}")
    print(f"target {TARGET} simulated req/s at 72 GPUs: "
          f"{'met' if all(r['sim_req_per_s'] >= TARGET for r in rows) else 'NOT met'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
