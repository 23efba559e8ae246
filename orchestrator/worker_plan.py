"""From the pydantic DeploymentSpec to what the parts run with: frozen WorkerConfigs per rank, and
the router's settings. Workers never see the spec; this is the one translation.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from orchestrator.router.admission import Limits
from orchestrator.router.host import RouterSettings, TlsPaths
from orchestrator.router.inputs import DisaggMode, DisaggThresholds, FleetParams, Link, Topology
from orchestrator.router.policy import PolicyName
from orchestrator.router.policy_kv import KvParams
from orchestrator.router.quotas import RequestLimits
from orchestrator.router.ray_gateway import RankLimits
from orchestrator.router.tenancy import Tenant, TenantToken
from orchestrator.spec import (
    ComputeDtype,
    CpuTopology,
    DeploymentSpec,
    PoolSpec,
)
from orchestrator.spec_faults import FaultPickSpec, FaultsSpec
from workers.actor_common import ModelSource, PagedPoolsConfig, WorkerConfig
from workers.engine.engine import Role
from workers.engine.scheduler import SchedulerConfig
from workers.engine.speculate import SpeculationConfig
from workers.ep.group import Backend, EpConfig
from workers.faults import FaultConfig, FaultPick
from workers.kv.geometry import KvGeometry
from workers.kv.presets import kv_shape
from workers.model.config import ModelConfig, load_config
from workers.model.presets import preset

DEFAULT_KV_BLOCKS = 256
# Measured NIXL UCX DRAM pulls between two processes here (docs/transfer.md); NVLink and RDMA as
# published (peers.md): 900 GB/s NVLink 5 per GPU at ~80%, 800 Gb/s NIC at ~85%.
_LINKS = {
    "cpu": (Link(8e9, 2e-4), Link(8e9, 2e-4)),
    "gb200-nvl72": (Link(720e9, 2e-5), Link(42.5e9, 3e-5)),
    "b300-hgx": (Link(720e9, 2e-5), Link(85e9, 3e-5)),
}
# Before a rank has measured its prefill rate, the router assumes this many tokens per second.
_INITIAL_PREFILL_TPS = {"cpu": 2_000.0, "gb200-nvl72": 20_000.0, "b300-hgx": 20_000.0}


def model_config(spec: DeploymentSpec) -> ModelConfig:
    """The model's configuration (from the checkpoint's config.json or the preset)."""
    if spec.model.checkpoint is not None:
        path = Path(spec.model.checkpoint)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.checkpoint: {path} has no config.json")
        return load_config(path)
    assert spec.model.preset is not None
    return preset(spec.model.preset.value)


def model_source(spec: DeploymentSpec) -> ModelSource:
    name = spec.model.preset.value if spec.model.preset is not None else "tiny"
    return ModelSource(checkpoint=spec.model.checkpoint, preset=name, quant_sim=spec.model.quant_sim,
                       bf16=spec.model.dtype is ComputeDtype.BFLOAT16)


def paged_pools(pool: PoolSpec) -> PagedPoolsConfig:
    """Pages per pool for a rank: `kv_blocks` 256-token blocks; window pages for every running
    request (the paged cache reserves up to 4 each) plus one per block for cached boundaries; a
    compressor-state page per running request."""
    blocks = pool.kv_blocks or DEFAULT_KV_BLOCKS
    return PagedPoolsConfig(block_pages=blocks, window_pages=4 * pool.max_batch + blocks,
                            state_pages=pool.max_batch + 1)


@dataclass(frozen=True)
class InstancePlan:
    """One worker instance: its id, role and the configs of its ranks (rank i = configs[i])."""

    instance: str
    role: Role
    configs: tuple[WorkerConfig, ...]


def instance_plan(spec: DeploymentSpec, role: Role, instance: str, *, nvlink_domain: str = "local",
                  master_addr: str = "127.0.0.1", master_port: int = 0) -> InstancePlan:
    """The rank configs of one instance of `role` (PREFILL or DECODE)."""
    pool: PoolSpec = spec.prefill if role is Role.PREFILL else spec.decode
    n = pool.ep_ranks
    backend = Backend.GLOO if isinstance(spec.topology, CpuTopology) else Backend.NCCL
    configs = tuple(
        WorkerConfig(
            instance=instance, role=role, rank=r, model=model_source(spec),
            sched=SchedulerConfig(max_num_seqs=pool.max_batch, max_batched_tokens=pool.max_batched_tokens,
                                  prefill_chunk=min(512, pool.max_batched_tokens), prefix_caching=True),
            kv=paged_pools(pool),
            ep=EpConfig(r, n, master_addr, master_port, backend) if n > 1 else None,
            handoff_lease_s=spec.transfer.lease_s, handoff_timeout_s=spec.transfer.timeout_s,
            nvlink_domain=nvlink_domain, faults=fault_config(spec.faults),
            # Both roles: the prefill keeps the MTP state that a speculating decode drafts from.
            speculation=SpeculationConfig(spec.decode.speculation.mtp_tokens),
        )
        for r in range(n)
    )
    return InstancePlan(instance, role, configs)


def fault_config(faults: FaultsSpec) -> FaultConfig:
    """The ranks' frozen form of the spec's test-only `faults:` section."""
    def pick(p: FaultPickSpec) -> FaultPick:
        return FaultPick(p.skip, p.count, p.probability, p.seed)

    t = faults.transfer
    return FaultConfig(fail_reads=pick(t.fail), delay_reads=pick(t.delay), read_delay_s=t.delay_s,
                       drop_kv_events=pick(faults.kv_events.drop))


def _read_token(path: str | None, field: str) -> str:
    if path is None:
        return secrets.token_urlsafe(24)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{field}: token file {p} does not exist")
    token = p.read_text().strip()
    if not token:
        raise ValueError(f"{field}: token file {p} is empty")
    return token


def router_settings(spec: DeploymentSpec, cfg: ModelConfig) -> RouterSettings:
    """The router's settings: policy, fleet (KV bytes per block from the real page layout), limits."""
    topo = spec.topology
    intra, cross = _LINKS[topo.kind]
    block_bytes = KvGeometry.of(kv_shape(cfg, with_mtp=False)).block.nbytes
    d = spec.router.disaggregation
    fleet = FleetParams(
        kv_bytes_per_block=block_bytes, topology=Topology(intra, cross),
        disagg=DisaggThresholds(DisaggMode(d.mode.value), d.max_local_prefill_tokens,
                                d.max_local_uncached_fraction),
    )
    max_context = min(spec.model.max_context, cfg.max_position)
    lim = spec.limits
    max_tokens = min(lim.max_tokens or max_context - 1, max_context - 1)
    limits = Limits(max_context=max_context, max_tokens=max_tokens,
                    default_max_tokens=min(spec.router.default_max_tokens, max_tokens))
    quotas = RequestLimits(max_prompt_tokens=lim.max_prompt_tokens, max_stop_strings=lim.max_stop_strings,
                           max_stop_token_ids=lim.max_stop_token_ids, max_request_bytes=lim.max_request_bytes,
                           max_streams_per_client=lim.max_streams_per_client,
                           max_streams_per_tenant=lim.max_streams_per_tenant)
    rank_limits = RankLimits(max_running=spec.decode.max_batch,
                             queue_limit=spec.router.max_queued_requests_per_worker,
                             initial_prefill_rate_tps=_INITIAL_PREFILL_TPS[topo.kind])
    sec = spec.security
    w = spec.router.weights
    tls = TlsPaths(sec.tls.cert_file, sec.tls.key_file, sec.tls.client_ca_file) if sec.tls else None
    for f in (tls.cert, tls.key, tls.client_ca) if tls else ():
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"security.tls: file {f} does not exist")
    return RouterSettings(
        host=spec.router.host, grpc_port=spec.router.port, http_port=spec.router.http_port,
        policy=PolicyName(spec.router.policy.value), fleet=fleet, limits=limits, rank_limits=rank_limits,
        model_name=spec.name, checkpoint=spec.model.checkpoint,
        token=_read_token(sec.token_file, "security.token_file"),
        admin_token=_read_token(sec.admin_token_file, "security.admin_token_file"), tls=tls,
        max_migrations=spec.router.max_migrations,
        kv_params=KvParams(w_kv=w.kv_usage, w_running=w.running, w_dp=w.dp_balance,
                           reuse_credit=w.reuse_credit),
        tenants=tuple(TenantToken(Tenant(t.name, t.max_concurrent_streams),
                                  _read_token(t.token_file, f"security.tenants[{i}].token_file"))
                      for i, t in enumerate(sec.tenants)),
        quotas=quotas,
    )

