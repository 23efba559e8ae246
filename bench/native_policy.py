"""Native routing policies: per-request cost of `ts_route` against the router's Python policies.

For each policy and fleet, the same requests (random prompt sizes, prefix matches, held blocks,
session affinity) on the same worker states are routed three ways, and every answer is checked
equal first:
- `python us`: the baseline, the router's own `policy.choose(view)` (what `Router.route` calls);
- `ctypes us`: `policy_params.route` on prebuilt structures (one ctypes call per request);
- `C ns`: `ts_route` called back to back from C (bench/native_policy_loop.c, compiled with
  the simulator core's flags): the figure the native simulator pays per request.

Fleets: `flash-18` (10 prefill in 2 NVLink domains + 8 decode, the V4-Flash NVL72 fleet's router
workers), `mixed-20` (8 prefill + 12 decode over 3 domains), `wide-256` (128 + 128 over 8
domains, the most ts_route takes). Each figure is the best of 3 timed rounds (shared cores).

    python -P bench/native_policy.py [--json PATH] [--requests N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.planner.native import lib as native_lib
from orchestrator.planner.native.policy_params import (
    LOCAL_PREFILL,
    TsPolicy,
    TsRequestView,
    TsWorker,
    policy_struct,
    request_view,
    route,
    worker_struct,
)
from orchestrator.router.decision import RouteDecision
from orchestrator.router.inputs import FleetParams, Link, Role, RouteRequest, Topology, WorkerId, WorkerState
from orchestrator.router.policy import PolicyName, make_policy
from orchestrator.router.view import RoutingView, WorkerPair

ROOT = Path(__file__).resolve().parents[1]
FLEETS = {"flash-18": (10, 8, 2), "mixed-20": (8, 12, 3), "wide-256": (128, 128, 8)}


def build_loop() -> ctypes.CDLL:
    """policy.c plus the timing loop, one library in a temp dir, built with the core's flags."""
    out = Path(tempfile.mkdtemp(prefix="tandem-bench-")) / "policy_loop.so"
    src = native_lib.SOURCE_DIR
    cmd = [native_lib.compiler(), *native_lib.CFLAGS, f"-I{src}", "-o", str(out), str(src / "policy.c"),
           str(ROOT / "bench" / "native_policy_loop.c")]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(out))
    lib.ts_bench_route.argtypes = [ctypes.POINTER(TsPolicy), ctypes.POINTER(TsWorker), ctypes.c_int32,
                                   ctypes.POINTER(TsRequestView), ctypes.c_int32, ctypes.c_int64,
                                   ctypes.POINTER(ctypes.c_int64)]
    lib.ts_bench_route.restype = ctypes.c_double
    return lib


def fleet_states(rng: random.Random, n_pre: int, n_dec: int, n_dom: int) -> tuple[WorkerState, ...]:
    """Admitting workers with moderate random loads, sorted by WorkerId."""
    out = []
    for i in range(n_pre + n_dec):
        role = Role.PREFILL if i < n_pre else Role.DECODE
        out.append(WorkerState(WorkerId(f"{role.value}-{i:03d}"), role, f"nvl{i % n_dom}",
                               rng.uniform(8000, 20000), rng.randrange(0, 40000), rng.randrange(0, 4000), 8000,
                               rng.randrange(0, 48), 64, rng.randrange(0, 4), 64))
    return tuple(sorted(out, key=lambda w: w.worker))


def views(rng: random.Random, fleet: FleetParams, states: tuple[WorkerState, ...], n: int) -> list[RoutingView]:
    out = []
    for k in range(n):
        prompt = rng.randint(200, 30000)
        full = prompt // fleet.block_size
        matches = {w.worker: rng.randint(0, full) for w in states if rng.random() < 0.3}
        held = {w: rng.randint(m, full) for w, m in matches.items() if rng.random() < 0.3}
        ids = [w.worker for w in states]
        aff = WorkerPair(rng.choice([None, *ids]), rng.choice(ids)) if rng.random() < 0.5 else None
        out.append(RoutingView(RouteRequest(f"r{k}", prompt), states, matches, fleet, aff, k, held=held))
    return out


def best_of(rounds: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(rounds))


def per_call(calls: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    calls()
    return (time.perf_counter() - t0) / n


def measure(core: ctypes.CDLL, loop: ctypes.CDLL, name: PolicyName, shape: tuple[int, int, int],
            n_req: int) -> dict:
    rng = random.Random(f"{name.value}-{shape}")
    fleet = FleetParams(kv_bytes_per_block=1 << 20, topology=Topology(Link(9e11, 2e-6), Link(4e10, 8e-6)))
    states = fleet_states(rng, *shape)
    policy = make_policy(name, fleet)
    vs = views(rng, fleet, states, n_req)
    tp, tw = policy_struct(name, fleet, policy), worker_struct(states)
    tv = [request_view(states, v.request.prompt_tokens, fleet.block_size, v.matches, v.held, v.affinity,
                       v.decisions_made) for v in vs]
    index = {w.worker: i for i, w in enumerate(states)}
    for v, t in zip(vs, tv, strict=True):  # the same answers, or the timings compare nothing
        want = policy.choose(v)
        got = route(core, tp, tw, t)
        assert isinstance(want, RouteDecision) and not got.refused, (want, got.refused)
        pre = LOCAL_PREFILL if want.prefill is None else index[want.prefill]
        assert (got.prefill, got.decode, got.uncached_tokens) == (pre, index[want.decode], want.uncached_tokens)

    def python_round() -> None:
        for v in vs:
            policy.choose(v)

    def ctypes_round() -> None:
        for t in tv:
            route(core, tp, tw, t)

    arr = (TsRequestView * len(tv))(*tv)
    checksum = ctypes.c_int64()
    reps = 200_000 if shape[0] + shape[1] <= 32 else 20_000
    c_ns = best_of(3, lambda: loop.ts_bench_route(ctypes.byref(tp), tw, len(tw), arr, len(arr), reps,
                                                  ctypes.byref(checksum)))
    py = best_of(3, lambda: per_call(python_round, n_req)) * 1e6
    ct = best_of(3, lambda: per_call(ctypes_round, n_req)) * 1e6
    return {"policy": name.value, "workers": len(states), "python_us": py, "ctypes_us": ct, "c_ns": c_ns,
            "speedup_c_vs_python": py * 1e3 / c_ns}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--requests", type=int, default=256, help="distinct requests per fleet and policy")
    args = ap.parse_args()
    core, loop = native_lib.load(), build_loop()
    rows = []
    print(f"{'policy':12} {'fleet':9} {'workers':>7} {'python us':>10} {'ctypes us':>10} {'C ns':>8} {'C speedup':>10}")
    for fleet_name, shape in FLEETS.items():
        for name in PolicyName:
            r = measure(core, loop, name, shape, args.requests) | {"fleet": fleet_name}
            rows.append(r)
            print(f"{r['policy']:12} {fleet_name:9} {r['workers']:>7} {r['python_us']:>10.2f} "
                  f"{r['ctypes_us']:>10.2f} {r['c_ns']:>8.1f} {r['speedup_c_vs_python']:>9.0f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
