"""DeploymentSpec: what an operator writes to deploy Tandem (YAML in, validated pydantic out).

Every level forbids unknown keys, so a typo is an error, not a silently ignored setting.
`load_spec(path)` returns the spec or raises `SpecError` whose message has one line per mistake:
the field path, what is wrong, and the bad value. Validation checks shapes and ranges only; files
the spec names (checkpoints, certificates, tokens) are checked when the deployment starts.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from orchestrator.spec_autoscale import AutoscaleSpec, check_autoscale
from orchestrator.spec_base import Strict
from orchestrator.spec_faults import FaultsSpec
from orchestrator.spec_limits import LimitsSpec, TenantSpec, check_tenants


class SpecError(ValueError):
    """A deployment spec that cannot be used; str() lists one problem per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid deployment spec {source}:\n" + "\n".join(f"  {p}" for p in problems))


class ModelPreset(StrEnum):
    TINY = "tiny"
    V4_FLASH = "v4-flash"
    V4_PRO = "v4-pro"


class ComputeDtype(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class ModelSpec(Strict):
    """Which model to serve: a preset (random or demo weights) or a checkpoint directory."""

    preset: ModelPreset | None = None
    checkpoint: str | None = Field(default=None, min_length=1)
    dtype: ComputeDtype = ComputeDtype.FLOAT32
    # Simulate the checkpoint's FP8/FP4 numerics on CPU (off only for comparisons with references).
    quant_sim: bool = True
    max_context: int = Field(default=1_048_576, ge=1, le=1_048_576)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("set exactly one of 'preset' and 'checkpoint'")
        return self


class PoolSpec(Strict):
    """One role's worker pool: `instances` groups of `ep_ranks` ranks each."""

    instances: int = Field(ge=0, le=4096)
    ep_ranks: int = Field(default=1, ge=1, le=1024)
    gpus_per_rank: int = Field(default=1, ge=0, le=8)
    max_batch: int = Field(default=64, ge=1, le=65_536)
    max_batched_tokens: int = Field(default=8192, ge=1, le=1_048_576)
    # KV blocks (256 tokens each) per rank; unset = sized from free memory at start-up.
    kv_blocks: int | None = Field(default=None, ge=1)


class SpeculationSpec(Strict):
    """MTP speculative decoding: draft tokens the MTP layer proposes per decode step (0: off).
    Output is the same with it on; the checkpoint must have its MTP layer (mtp.* tensors)."""

    mtp_tokens: int = Field(default=0, ge=0, le=2)


class DecodePoolSpec(PoolSpec):
    """The decode pool: a PoolSpec plus `speculation` (its prefill pool then keeps the MTP state
    each handoff carries, so a request drafts from its first decode step)."""

    speculation: SpeculationSpec = SpeculationSpec()


class CpuTopology(Strict):
    kind: Literal["cpu"]
    # Logical CPUs Ray may hand out; actors get logical resources so 2 cores never stall placement.
    num_cpus: int = Field(default=2, ge=1, le=1024)


class Gb200Nvl72Topology(Strict):
    kind: Literal["gb200-nvl72"]
    racks: int = Field(ge=1, le=1024)
    trays_per_rack: int = Field(default=18, ge=1, le=18)
    gpus_per_tray: int = Field(default=4, ge=1, le=4)

    @property
    def domain_gpus(self) -> int:
        return self.trays_per_rack * self.gpus_per_tray


class B300HgxTopology(Strict):
    kind: Literal["b300-hgx"]
    nodes: int = Field(ge=1, le=4096)
    gpus_per_node: int = Field(default=8, ge=1, le=8)
    # Per-GPU RDMA NIC line rate between nodes.
    nic_gbps: float = Field(default=800.0, gt=0)

    @property
    def domain_gpus(self) -> int:
        return self.gpus_per_node


Topology = Annotated[CpuTopology | Gb200Nvl72Topology | B300HgxTopology, Field(discriminator="kind")]


class RoutingPolicy(StrEnum):
    KV = "kv"
    ROUND_ROBIN = "round-robin"
    SGLANG = "sglang"
    DYNAMO = "dynamo"


class DisaggregationMode(StrEnum):
    # Prefill on the decode worker when the uncached part of the prompt is short.
    CONDITIONAL = "conditional"
    # Every request goes through a prefill worker (the demo shows a real handoff this way).
    ALWAYS = "always"
    # Aggregated serving: decode workers prefill everything.
    NEVER = "never"


class DisaggregationSpec(Strict):
    mode: DisaggregationMode = DisaggregationMode.CONDITIONAL
    # CONDITIONAL: prefill locally when uncached tokens < this ...
    max_local_prefill_tokens: int = Field(default=2048, ge=0)
    # ... and uncached / prompt tokens < this.
    max_local_uncached_fraction: float = Field(default=0.7, ge=0.0, le=1.0)


class KvPolicyWeights(Strict):
    """Weights of the `kv` policy's decode score (each term is normalised to [0, 1])."""

    kv_usage: float = Field(default=1.0, ge=0)
    running: float = Field(default=1.0, ge=0)
    dp_balance: float = Field(default=0.5, ge=0)
    reuse_credit: float = Field(default=1.0, ge=0)


class RouterSpec(Strict):
    host: str = "127.0.0.1"
    # gRPC port; 0 picks a free one (written to the state file).
    port: int = Field(default=50051, ge=0, le=65535)
    # HTTP API (OpenAI-compatible, admin, metrics) port; 0 picks a free one.
    http_port: int = Field(default=8000, ge=0, le=65535)
    policy: RoutingPolicy = RoutingPolicy.KV
    weights: KvPolicyWeights = KvPolicyWeights()
    disaggregation: DisaggregationSpec = DisaggregationSpec()
    # Admission: a worker past either limit takes no more; when all are past, RESOURCE_EXHAUSTED.
    max_queued_requests_per_worker: int = Field(default=256, ge=1)
    max_queued_prefill_tokens_per_worker: int = Field(default=1_048_576, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    # A request whose worker is lost (died, removed) moves to another this many times at most;
    # one more loss ends it UNAVAILABLE.
    max_migrations: int = Field(default=2, ge=0, le=16)


class TransferBackend(StrEnum):
    NIXL_UCX = "nixl-ucx"


class TransferSpec(Strict):
    backend: TransferBackend = TransferBackend.NIXL_UCX
    # A prefill frees a handoff's blocks when no decode claims them within this many seconds.
    lease_s: float = Field(default=10.0, gt=0, le=3600)
    # A READ that has not completed by then is abandoned and the decode recomputes.
    timeout_s: float = Field(default=30.0, gt=0, le=3600)


class TlsSpec(Strict):
    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    # With a CA file the servers require client certificates signed by it (mutual TLS).
    client_ca_file: str | None = Field(default=None, min_length=1)


class SecuritySpec(Strict):
    tls: TlsSpec | None = None
    # Bearer token for generation clients; unset = a random token written to the state file.
    token_file: str | None = Field(default=None, min_length=1)
    # Separate bearer token for admin endpoints (scale, drain, down); it does not generate.
    admin_token_file: str | None = Field(default=None, min_length=1)
    # More tenants besides "default" (token_file's): each with its own token, cache salt, budget.
    tenants: tuple[TenantSpec, ...] = ()

    @model_validator(mode="after")
    def _tenants(self) -> SecuritySpec:
        check_tenants(self.tenants)
        return self


class DeploymentSpec(Strict):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    model: ModelSpec
    prefill: PoolSpec
    decode: DecodePoolSpec
    topology: Topology
    router: RouterSpec = RouterSpec()
    transfer: TransferSpec = TransferSpec()
    security: SecuritySpec = SecuritySpec()
    faults: FaultsSpec = FaultsSpec()  # TEST ONLY fault injection (orchestrator/spec_faults.py)
    limits: LimitsSpec = LimitsSpec()
    autoscale: AutoscaleSpec = AutoscaleSpec()

    @model_validator(mode="after")
    def _autoscale_bounds(self) -> DeploymentSpec:
        check_autoscale(self.autoscale, self.prefill.instances, self.decode.instances,
                        self.router.disaggregation.mode is DisaggregationMode.ALWAYS)
        return self

    @model_validator(mode="after")
    def _fits_topology(self) -> DeploymentSpec:
        if self.decode.instances < 1:
            raise ValueError(f"decode.instances must be at least 1 (got {self.decode.instances})")
        if self.prefill.instances < 1 and self.router.disaggregation.mode is DisaggregationMode.ALWAYS:
            raise ValueError("router.disaggregation.mode 'always' needs prefill.instances >= 1")
        topo = self.topology
        if isinstance(topo, CpuTopology):
            return self
        units = topo.racks if isinstance(topo, Gb200Nvl72Topology) else topo.nodes
        gpus = units * topo.domain_gpus
        need = most = 0
        auto = self.autoscale
        for role, pool in (("prefill", self.prefill), ("decode", self.decode)):
            per_instance = pool.ep_ranks * pool.gpus_per_rank
            if per_instance > topo.domain_gpus:
                raise ValueError(
                    f"{role}: ep_ranks x gpus_per_rank = {per_instance} GPUs does not fit one NVLink "
                    f"domain of {topo.domain_gpus} GPUs ({topo.kind})"
                )
            need += pool.instances * per_instance
            most += getattr(auto, role).max * per_instance
        if need > gpus:
            raise ValueError(f"prefill and decode need {need} GPUs, topology {topo.kind} has {gpus}")
        if auto.enabled and most > gpus:
            raise ValueError(f"autoscale maxima need {most} GPUs, topology {topo.kind} has {gpus}")
        return self


def _format_error(err: dict) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown field (value {err['input']!r})"
    return f"{path}: {msg} (got {err['input']!r})"


def parse_spec(data: object, source: str = "<spec>") -> DeploymentSpec:
    """Validate already-parsed YAML/JSON data."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"(top level): expected a mapping of fields, got {type(data).__name__}"])
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_format_error(e) for e in exc.errors()]) from None
    except RecursionError:
        raise SpecError(source, ["(top level): the data is nested too deeply"]) from None


def load_spec(path: str | Path) -> DeploymentSpec:
    """Read and validate a deployment spec YAML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(p), [f"cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(p), [f"byte {exc.start}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(p), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    except (ValueError, RecursionError) as exc:  # yaml's constructors: a bad date, nesting too deep
        raise SpecError(str(p), [f"not valid YAML ({type(exc).__name__}: {exc})"]) from None
    return parse_spec(data, str(p))
