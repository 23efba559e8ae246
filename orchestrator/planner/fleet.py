"""The fleet a simulation runs: pools, GPU kind, placement, router settings, as frozen dataclasses.

`fleet_from_spec` reads the operator's `DeploymentSpec` (the only pydantic the planner touches):
the GPU kind follows the topology (gb200-nvl72 -> GB200, b300-hgx -> B300); an instance is
ep_ranks x gpus_per_rank GPUs with attention TP over a rank's GPUs and experts over its ranks.
The router's `FleetParams` (KV bytes per block, transfer links) come from the cost model's page
geometry and the hardware's measured link numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from types import MappingProxyType

from orchestrator.planner.cost import CostModel, Parallelism
from orchestrator.planner.hardware import (
    LINK_LATENCY_S,
    GpuKind,
    LinkKind,
    gpu,
    link_bytes_per_s,
)
from orchestrator.planner.kv_layout import block_bytes
from orchestrator.planner.models import ModelName, Precision, model
from orchestrator.router.inputs import DisaggMode, DisaggThresholds, FleetParams, Link, Topology
from orchestrator.router.policy import PolicyName
from orchestrator.spec import (
    B300HgxTopology,
    DeploymentSpec,
    DisaggregationMode,
    Gb200Nvl72Topology,
    ModelPreset,
    PoolSpec,
)

_MODELS = MappingProxyType({ModelPreset.V4_FLASH: ModelName.V4_FLASH, ModelPreset.V4_PRO: ModelName.V4_PRO})
_DISAGG = MappingProxyType({
    DisaggregationMode.CONDITIONAL: DisaggMode.CONDITIONAL,
    DisaggregationMode.ALWAYS: DisaggMode.ALWAYS,
    DisaggregationMode.NEVER: DisaggMode.NEVER,
})


@dataclass(frozen=True)
class PoolConfig:
    """One role's instances. kv_blocks: KV pool per instance in 256-token blocks (None: from HBM)."""

    instances: int
    par: Parallelism
    max_batch: int
    max_batched_tokens: int
    kv_blocks: int | None = None

    def __post_init__(self) -> None:
        for name in ("instances", "max_batch", "max_batched_tokens"):
            value = getattr(self, name)
            if value < (0 if name == "instances" else 1):
                raise ValueError(f"PoolConfig.{name} = {value}: out of range")

    @property
    def gpus(self) -> int:
        return self.instances * self.par.gpus


@dataclass(frozen=True)
class FleetConfig:
    model: ModelName
    gpu: GpuKind
    precision: Precision
    domain_gpus: int
    prefill: PoolConfig
    decode: PoolConfig
    policy: PolicyName
    disagg: DisaggThresholds = DisaggThresholds()
    queue_limit: int = 256

    def __post_init__(self) -> None:
        if self.decode.instances < 1:
            raise ValueError(f"FleetConfig.decode.instances = {self.decode.instances}: need at least 1")
        for role, pool in (("prefill", self.prefill), ("decode", self.decode)):
            if pool.par.gpus > self.domain_gpus:
                raise ValueError(f"FleetConfig.{role}: {pool.par.gpus}-GPU instances do not fit an NVLink "
                                 f"domain of {self.domain_gpus}")

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus

    def cost_model(self, pool: PoolConfig) -> CostModel:
        """The cost model of one of this fleet's instances; shared by every fleet with the same GPU,
        model, layout and precision, so the runs of a goodput search reuse its memoised prices."""
        return _cost_model(self.gpu, self.model, pool.par, self.precision)

    def fleet_params(self) -> FleetParams:
        """What the router's policies are told about the fleet."""
        g = gpu(self.gpu)

        def link(kind: LinkKind) -> Link:
            return Link(bandwidth_bytes_per_s=link_bytes_per_s(g, kind), latency_s=LINK_LATENCY_S[kind])

        return FleetParams(kv_bytes_per_block=block_bytes(model(self.model)),
                           topology=Topology(intra_domain=link(LinkKind.NVLINK),
                                             cross_domain=link(LinkKind.RDMA)),
                           disagg=self.disagg)

    def with_policy(self, policy: PolicyName) -> FleetConfig:
        return dataclasses.replace(self, policy=policy)


@functools.lru_cache(maxsize=64)
def _cost_model(kind: GpuKind, name: ModelName, par: Parallelism, precision: Precision) -> CostModel:
    return CostModel(gpu(kind), model(name), par, precision)


def _pool(p: PoolSpec) -> PoolConfig:
    gpus = p.ep_ranks * p.gpus_per_rank
    if gpus < 1:
        raise ValueError(f"pool ep_ranks x gpus_per_rank = {gpus}: the planner needs GPU instances")
    kv = None if p.kv_blocks is None else p.kv_blocks * p.ep_ranks
    return PoolConfig(instances=p.instances, par=Parallelism(gpus=gpus, tp=p.gpus_per_rank, ep=p.ep_ranks),
                      max_batch=p.max_batch, max_batched_tokens=p.max_batched_tokens, kv_blocks=kv)


def fleet_from_spec(spec: DeploymentSpec, policy: PolicyName | None = None,
                    precision: Precision = Precision.FP4, model_name: ModelName | None = None) -> FleetConfig:
    """The simulated fleet of a deployment spec; policy overrides the spec's router.policy.

    model_name says which model the spec serves when it names a checkpoint rather than a preset
    (a checkpoint path says nothing reliable about the model); it overrides a preset too."""
    topo = spec.topology
    if isinstance(topo, Gb200Nvl72Topology):
        kind = GpuKind.GB200
    elif isinstance(topo, B300HgxTopology):
        kind = GpuKind.B300
    else:
        raise ValueError(f"topology.kind = {topo.kind!r}: the planner simulates gb200-nvl72 or b300-hgx "
                         "fleets")
    preset = spec.model.preset
    if model_name is None:
        if preset is None:
            raise ValueError(f"model.checkpoint = {spec.model.checkpoint!r}: say which model it is "
                             f"(--model {'|'.join(m.value for m in ModelName)})")
        if preset not in _MODELS:
            raise ValueError(f"model.preset = {preset.value!r}: the planner knows "
                             f"{[p.value for p in _MODELS]}")
        model_name = _MODELS[preset]
    d = spec.router.disaggregation
    return FleetConfig(
        model=model_name, gpu=kind, precision=precision, domain_gpus=topo.domain_gpus,
        prefill=_pool(spec.prefill), decode=_pool(spec.decode),
        policy=policy if policy is not None else PolicyName(spec.router.policy.value),
        disagg=DisaggThresholds(mode=_DISAGG[d.mode], max_local_prefill_tokens=d.max_local_prefill_tokens,
                                max_local_uncached_fraction=d.max_local_uncached_fraction),
        queue_limit=spec.router.max_queued_requests_per_worker,
    )
