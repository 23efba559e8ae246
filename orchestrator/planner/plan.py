"""`tandem plan`: the P:D split and instance (EP) sizes with the best goodput per GPU.

Candidates within a GPU budget: instance sizes tp x ep_ranks for ep_ranks a power of two (tp as
in the spec), fitting one NVLink domain and leaving at least `MIN_KV_SHARE` of the instance's
usable HBM for KV after the weights, the smallest `max_sizes` of them per role; for each pair of
sizes, prefill shares of the GPUs from 1/(splits+1) to splits/(splits+1). Each candidate's
goodput comes from the simulator (`goodput`), with the spec's routing policy deciding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator.planner.cost import Parallelism
from orchestrator.planner.engines import SimEngine
from orchestrator.planner.fleet import FleetConfig, PoolConfig
from orchestrator.planner.goodput import Slo, goodput
from orchestrator.planner.hardware import MEMORY_UTILISATION, gpu
from orchestrator.planner.trace import TraceRequest

MIN_KV_SHARE = 0.25


@dataclass(frozen=True)
class PlanRow:
    prefill_instances: int
    prefill_gpus_each: int
    decode_instances: int
    decode_gpus_each: int
    gpus: int
    goodput_rps: float
    goodput_rps_per_gpu: float
    ttft_p99: float | None  # at the goodput rate; None when no rate met the target
    tpot_p99: float | None


@dataclass(frozen=True)
class Plan:
    rows: tuple[PlanRow, ...]  # best first

    @property
    def best(self) -> PlanRow:
        return self.rows[0]


def instance_sizes(base: FleetConfig, pool: PoolConfig, budget: int, max_sizes: int) -> list[int]:
    """GPU counts an instance of this role may have (see module docstring), smallest first."""
    tp, out, ranks = pool.par.tp, [], 1
    g = gpu(base.gpu)
    while tp * ranks <= min(base.domain_gpus, budget) and len(out) < max_sizes:
        size = tp * ranks
        cm = base.cost_model(dataclasses.replace(pool, par=Parallelism(size, tp, ranks)))
        usable = size * g.hbm_bytes * MEMORY_UTILISATION
        if usable - cm.arch.weight_bytes(cm.precision) >= MIN_KV_SHARE * usable:
            out.append(size)
        ranks *= 2
    return out


def candidates(base: FleetConfig, gpus: int, splits: int = 5, max_sizes: int = 3) -> list[FleetConfig]:
    """Fleets within `gpus` GPUs (see module docstring), deduplicated."""
    if gpus < 2:
        raise ValueError(f"plan gpus = {gpus}: need at least 2 (one prefill and one decode GPU)")
    if splits < 1:
        raise ValueError(f"plan splits = {splits}: must be >= 1")
    seen, out = set(), []
    for sp in instance_sizes(base, base.prefill, gpus, max_sizes):
        for sd in instance_sizes(base, base.decode, gpus, max_sizes):
            for k in range(1, splits + 1):
                n_p = max(1, round(k / (splits + 1) * gpus / sp))
                n_d = (gpus - n_p * sp) // sd
                if n_d < 1 or (n_p, sp, n_d, sd) in seen:
                    continue
                seen.add((n_p, sp, n_d, sd))
                pre = dataclasses.replace(base.prefill, instances=n_p,
                                          par=Parallelism(sp, base.prefill.par.tp, sp // base.prefill.par.tp))
                dec = dataclasses.replace(base.decode, instances=n_d,
                                          par=Parallelism(sd, base.decode.par.tp, sd // base.decode.par.tp))
                out.append(dataclasses.replace(base, prefill=pre, decode=dec))
    if not out:
        raise ValueError(f"no prefill/decode split of {gpus} {base.gpu.value} GPUs fits {base.model.value}")
    return out


def plan(base: FleetConfig, requests: Sequence[TraceRequest], gpus: int, slo: Slo, splits: int = 5,
         max_sizes: int = 3, bisections: int = 6, progress: Callable[[str], None] | None = None,
         engine: SimEngine = SimEngine.NATIVE) -> Plan:
    """Simulate every candidate; rows sorted by goodput per GPU, best first. Ties go to fewer GPUs,
    then to the lower TPOT p99 and TTFT p99 at the goodput rate."""
    rows = []
    for fleet in candidates(base, gpus, splits, max_sizes):
        if progress is not None:
            progress(f"{fleet.prefill.instances} x {fleet.prefill.par.gpus}-GPU prefill, "
                     f"{fleet.decode.instances} x {fleet.decode.par.gpus}-GPU decode")
        g = goodput(fleet, requests, slo, bisections=bisections, engine=engine)
        res = g.result
        rows.append(PlanRow(
            prefill_instances=fleet.prefill.instances, prefill_gpus_each=fleet.prefill.par.gpus,
            decode_instances=fleet.decode.instances, decode_gpus_each=fleet.decode.par.gpus, gpus=fleet.gpus,
            goodput_rps=g.rate_rps, goodput_rps_per_gpu=g.rate_rps / fleet.gpus,
            ttft_p99=None if res is None else res.ttft_pct(99),
            tpot_p99=None if res is None else res.tpot_pct(99)))
    inf = float("inf")
    rows.sort(key=lambda r: (-r.goodput_rps_per_gpu, r.gpus, inf if r.tpot_p99 is None else r.tpot_p99,
                             inf if r.ttft_p99 is None else r.ttft_p99, r.prefill_instances))
    return Plan(tuple(rows))
