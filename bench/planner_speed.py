"""Planner simulator speed: simulated requests per second of wall time on 72-GPU fleets.

Every simulated request is routed, prefilled, handed off and decoded. Two engines replay the same
requests: the native core (`orchestrator.planner.native_sim.NativeSimulator`, C) and the Python
reference (`orchestrator.planner.sim.Simulator`, which routes with the router's own `Router`,
`KvIndex` and policy objects). Every row checks that both give the same `SimResult` bit for bit.

Fleets (72 GPUs each):
- `pro-nvl72`: deploy/gb200-nvl72-v4-pro.yaml, V4-Pro on one GB200 NVL72 rack: 3 prefill
  instances of EP8 and one EP48 decode instance (4 router workers);
- `flash-nvl72`: V4-Flash on one NVL72 rack, 10 prefill and 8 decode instances of EP4 (18 router
  workers), the fleet of docs/planner.md's examples.

Traces: the Mooncake synthetic trace (3,993 requests, 15K-token prompts on average) and a
generated multi-turn load (`generators.multi_turn`, 5 turns per session, sessions so that the
total is `--requests`), at a rate each fleet serves without refusals.

Baseline, measured in the same run on the same requests: the Python reference simulator. The
timed span is building the simulator (marshalling included for the native one) plus `run()`; the
native library is built once before (a one-time install step, cached by source hash). CPU time
(`req/cpu-s`) is reported next to wall time: on a machine whose cores are shared with other jobs
it is the steadier figure. Target: 50,000 simulated req/s (wall) for the native engine.

    python -P bench/planner_speed.py [--json PATH] [--requests N] [--fleet NAME ...] [--policy NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.planner.cost import Parallelism
from orchestrator.planner.engines import Replay
from orchestrator.planner.fleet import FleetConfig, PoolConfig, fleet_from_spec
from orchestrator.planner.generators import multi_turn
from orchestrator.planner.hardware import GpuKind
from orchestrator.planner.models import ModelName, Precision
from orchestrator.planner.native.lib import load
from orchestrator.planner.native_sim import NativeSimulator
from orchestrator.planner.results import SimResult
from orchestrator.planner.sim import Simulator
from orchestrator.planner.trace import TraceRequest, load_mooncake
from orchestrator.router.policy import PolicyName
from orchestrator.spec import load_spec

TARGET = 50_000
ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake-synthetic.jsonl"
PRO_SPEC = ROOT / "deploy" / "gb200-nvl72-v4-pro.yaml"


def pro_nvl72(policy: PolicyName) -> FleetConfig:
    return fleet_from_spec(load_spec(PRO_SPEC), policy, model_name=ModelName.V4_PRO)


def flash_nvl72(policy: PolicyName) -> FleetConfig:
    return FleetConfig(
        model=ModelName.V4_FLASH, gpu=GpuKind.GB200, precision=Precision.FP4, domain_gpus=72,
        prefill=PoolConfig(instances=10, par=Parallelism(4, 1, 4), max_batch=8, max_batched_tokens=16384),
        decode=PoolConfig(instances=8, par=Parallelism(4, 1, 4), max_batch=256, max_batched_tokens=8192),
        policy=policy)


@dataclass(frozen=True)
class Fleet:
    name: str
    build: Callable[[PolicyName], FleetConfig]
    multi_turn_rps: float  # session start rate of the generated load that this fleet serves


FLEETS = (Fleet("pro-nvl72", pro_nvl72, 2.0), Fleet("flash-nvl72", flash_nvl72, 8.0))


def generated(requests: int, sessions_per_s: float) -> list[TraceRequest]:
    """Multi-turn conversations: 5 turns, 2K-token first prompts, 512 new tokens and 200 output
    tokens a turn, 20 s mean think time (the 5th turn's prompt is about 5K tokens)."""
    return multi_turn(sessions=max(requests // 5, 1), turns=5, first_prompt_tokens=2048, turn_tokens=512,
                      output_tokens=200, rate_rps=sessions_per_s, think_time_s=20.0, seed=1)


def timed(make: Callable[[], Replay]) -> tuple[SimResult, float, float]:
    """(result, wall s, cpu s) of building a simulator and running it."""
    t, c = time.perf_counter(), time.process_time()
    res = make().run()
    return res, time.perf_counter() - t, time.process_time() - c


def measure(fleet: Fleet, trace: str, requests: list[TraceRequest], policy: PolicyName) -> dict:
    """One row: the native engine, then the Python reference on the same requests."""
    config = fleet.build(policy)
    res, wall, cpu = timed(lambda: NativeSimulator(config, requests))
    ref, ref_wall, ref_cpu = timed(lambda: Simulator(config, requests))
    n = len(requests)
    return {
        "fleet": fleet.name, "trace": trace, "policy": policy.value, "requests": n, "gpus": config.gpus,
        "router_workers": config.prefill.instances + config.decode.instances,
        "wall_s": wall, "cpu_s": cpu, "sim_req_per_s": n / wall, "sim_req_per_cpu_s": n / cpu,
        "python_wall_s": ref_wall, "python_req_per_s": n / ref_wall, "python_req_per_cpu_s": n / ref_cpu,
        "speedup": ref_wall / wall, "same_result": res == ref,
        "hit_rate": res.hit_rate, "completed": res.completed, "rejected": res.rejected,
        "ttft_p99_s": res.ttft_pct(99), "tpot_p99_s": res.tpot_pct(99), "target_req_per_s": TARGET,
    }


def table(rows: list[dict]) -> str:
    head = (f"{'fleet':<12} {'trace':<11} {'policy':<12} {'requests':>8} {'wall s':>7} {'sim req/s':>9} "
            f"{'req/cpu-s':>9} {'python req/s':>12} {'x python':>8} {'same':>5} {'hit rate':>8} {'rejected':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['fleet']:<12} {r['trace']:<11} {r['policy']:<12} {r['requests']:>8} {r['wall_s']:>7.3f} "
                     f"{r['sim_req_per_s']:>9.0f} {r['sim_req_per_cpu_s']:>9.0f} {r['python_req_per_s']:>12.0f} "
                     f"{r['speedup']:>8.1f} {str(r['same_result']):>5} {r['hit_rate']:>8.3f} {r['rejected']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--requests", type=int, default=50_000, help="size of the generated trace")
    parser.add_argument("--fleet", action="append", choices=[f.name for f in FLEETS], help="repeatable")
    parser.add_argument("--policy", action="append", choices=[p.value for p in PolicyName], help="repeatable")
    parser.add_argument("--no-generated", action="store_true", help="the Mooncake trace only")
    args = parser.parse_args(argv)
    fleets = [f for f in FLEETS if args.fleet is None or f.name in args.fleet]
    policies = [p for p in PolicyName if args.policy is None or p.value in args.policy]
    mooncake = load_mooncake(TRACE)
    load()  # build the native library now (once per source version), not inside a timed span
    rows = []
    for fleet in fleets:
        traces = [("mooncake", mooncake)]
        if not args.no_generated:
            traces.append(("multi-turn", generated(args.requests, fleet.multi_turn_rps)))
        for name, requests in traces:
            for policy in policies:
                print(f"{fleet.name} {name} {policy.value} ...", file=sys.stderr, flush=True)
                rows.append(measure(fleet, name, requests, policy))
    print(table(rows))
    slowest = min(r["sim_req_per_s"] for r in rows)
    same = all(r["same_result"] for r in rows)
    print(f"target {TARGET} simulated req/s at 72 GPUs: {'met' if slowest >= TARGET else 'NOT met'} "
          f"(slowest row {slowest:.0f} req/s); native results == Python reference: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
