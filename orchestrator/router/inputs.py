"""What a routing policy sees: the request, each worker's state, the fleet's topology.

All frozen dataclasses, validated on construction (errors name the field and the bad value). The
router's unit is a worker = (instance, dp rank): attention is data parallel, so each dp rank owns
its own requests and KV blocks. Times are seconds, rates tokens per second, sizes bytes; nothing
here reads a clock or does I/O, so the planner's fleet simulator can build these directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from tandem.blocks import BLOCK_SIZE


def _require(ok: bool, where: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"{where} = {value!r}: {why}")


class Role(enum.Enum):
    """What a worker does. A decode worker can also prefill locally (conditional disaggregation)."""

    PREFILL = "prefill"
    DECODE = "decode"


class _WorkerIdFields(NamedTuple):
    instance: str
    dp_rank: int


class WorkerId(_WorkerIdFields):
    """One routable unit: a dp rank of a worker instance. Ordered (instance, dp_rank) for tie-breaks.

    A (named) tuple rather than a frozen dataclass: it is hashed and compared on every lookup of
    the routing hot path, and a tuple does both in C. Immutable all the same, and checked here.
    """

    __slots__ = ()

    def __new__(cls, instance: str, dp_rank: int = 0) -> WorkerId:
        _require(
            isinstance(instance, str) and bool(instance),
            "WorkerId.instance",
            instance,
            "must be a non-empty str",
        )
        _require(
            isinstance(dp_rank, int) and dp_rank >= 0, "WorkerId.dp_rank", dp_rank, "must be an int >= 0"
        )
        return super().__new__(cls, instance, dp_rank)

    def __str__(self) -> str:
        return f"{self.instance}/{self.dp_rank}"


@dataclass(frozen=True)
class WorkerState:
    """A worker's last report, as measured by the worker itself.

    Contract: a report stamped `reported_at_s` reflects every booking the router made strictly
    before that time; bookings made at or after it are added on top by the `LoadBook`.
    - prefill_rate_tps: measured prefill throughput of this worker (tokens/s), > 0. For a decode
      worker this is its rate when it prefills locally.
    - queued_prefill_tokens: uncomputed prompt tokens already waiting or running on it.
    - kv_blocks_used / kv_blocks_total: KV blocks (of `block_size` tokens) in use / in the pool.
    - running_requests / max_running_requests: requests in the running batch / batch slots.
    - queue_length / queue_limit: requests waiting to start / the most that may wait. Requests
      booked past the batch slots (running_requests > max_running_requests once bookings are
      folded in) wait too. Admission: a worker whose waiting count reaches queue_limit, or whose
      queued_prefill_tokens reach max_queued_prefill_tokens, takes no new request.
    - nvlink_domain: the NVLink domain (NVL72 rack, HGX node, or "local") the worker sits in.
    """

    worker: WorkerId
    role: Role
    nvlink_domain: str
    prefill_rate_tps: float
    queued_prefill_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 1
    running_requests: int = 0
    max_running_requests: int = 1
    queue_length: int = 0
    queue_limit: int = 1
    max_queued_prefill_tokens: int = 1_048_576
    reported_at_s: float = 0.0

    def __post_init__(self) -> None:
        # the common case in one expression (states are rebuilt on every report and every routing
        # decision of the planner's simulator); the checks below name the bad field otherwise
        if (
            self.prefill_rate_tps > 0
            and min(self.queued_prefill_tokens, self.kv_blocks_used, self.running_requests,
                    self.queue_length) >= 0
            and min(self.kv_blocks_total, self.max_running_requests, self.queue_limit,
                    self.max_queued_prefill_tokens) >= 1
            and self.nvlink_domain
        ):
            return
        w = f"WorkerState({self.worker})"
        _require(self.prefill_rate_tps > 0, f"{w}.prefill_rate_tps", self.prefill_rate_tps, "must be > 0")
        for name in ("queued_prefill_tokens", "kv_blocks_used", "running_requests", "queue_length"):
            value = getattr(self, name)
            _require(value >= 0, f"{w}.{name}", value, "must be >= 0")
        for name in ("kv_blocks_total", "max_running_requests", "queue_limit", "max_queued_prefill_tokens"):
            value = getattr(self, name)
            _require(value >= 1, f"{w}.{name}", value, "must be >= 1")
        _require(bool(self.nvlink_domain), f"{w}.nvlink_domain", self.nvlink_domain, "must be non-empty")

    @property
    def admits(self) -> bool:
        """True while the worker is under both admission limits (requests waiting, prefill tokens queued)."""
        overflow = max(self.running_requests - self.max_running_requests, 0)
        return (
            self.queue_length + overflow < self.queue_limit
            and self.queued_prefill_tokens < self.max_queued_prefill_tokens
        )


@dataclass(frozen=True)
class RouteRequest:
    """A request as the router sees it after tokenising.

    block_hashes are the chained hashes of the prompt's FULL blocks (`tandem.blocks.block_hashes`),
    so len(block_hashes) == prompt_tokens // block_size. session_id groups the turns of one
    conversation (affinity); None when the client gave none.
    """

    request_id: str
    prompt_tokens: int
    block_hashes: tuple[int, ...] = ()
    session_id: str | None = None

    def __post_init__(self) -> None:
        r = f"RouteRequest({self.request_id!r})"
        _require(self.prompt_tokens >= 1, f"{r}.prompt_tokens", self.prompt_tokens, "must be >= 1")


@dataclass(frozen=True)
class Link:
    """A KV transfer path: time(bytes) = latency_s + bytes / bandwidth_bytes_per_s."""

    bandwidth_bytes_per_s: float
    latency_s: float

    def __post_init__(self) -> None:
        _require(
            self.bandwidth_bytes_per_s > 0,
            "Link.bandwidth_bytes_per_s",
            self.bandwidth_bytes_per_s,
            "must be > 0",
        )
        _require(self.latency_s >= 0, "Link.latency_s", self.latency_s, "must be >= 0")

    def seconds(self, nbytes: int) -> float:
        """Time to move nbytes over this link; 0 when there is nothing to move."""
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class Topology:
    """KV transfer links: within one NVLink domain, and across domains (RDMA)."""

    intra_domain: Link
    cross_domain: Link

    def link(self, a: WorkerState, b: WorkerState) -> Link:
        """The link KV takes from worker a to worker b."""
        return self.intra_domain if a.nvlink_domain == b.nvlink_domain else self.cross_domain


class DisaggMode(enum.Enum):
    """When requests go through a prefill worker (mirrors the spec's router.disaggregation.mode)."""

    CONDITIONAL = "conditional"  # the decode prefills locally when the uncached part is short
    ALWAYS = "always"  # every request goes through a prefill worker
    NEVER = "never"  # aggregated serving: decode workers prefill everything


@dataclass(frozen=True)
class DisaggThresholds:
    """Conditional disaggregation (the spec's router.disaggregation): with mode CONDITIONAL, a decode
    worker prefills a request itself iff the tokens it would compute are fewer than
    max_local_prefill_tokens AND less than max_local_uncached_fraction of the prompt."""

    mode: DisaggMode = DisaggMode.CONDITIONAL
    max_local_prefill_tokens: int = 2048
    max_local_uncached_fraction: float = 0.7

    def __post_init__(self) -> None:
        _require(
            isinstance(self.mode, DisaggMode), "DisaggThresholds.mode", self.mode, "must be a DisaggMode"
        )
        _require(
            self.max_local_prefill_tokens >= 0,
            "DisaggThresholds.max_local_prefill_tokens",
            self.max_local_prefill_tokens,
            "must be >= 0",
        )
        _require(
            0.0 <= self.max_local_uncached_fraction <= 1.0,
            "DisaggThresholds.max_local_uncached_fraction",
            self.max_local_uncached_fraction,
            "must be in [0, 1]",
        )

    def local(self, uncached: int, prompt_tokens: int) -> bool:
        """Whether a decode that would compute `uncached` of `prompt_tokens` tokens prefills locally."""
        if self.mode is DisaggMode.CONDITIONAL:
            return (
                uncached < self.max_local_prefill_tokens
                and uncached < self.max_local_uncached_fraction * prompt_tokens
            )
        return self.mode is DisaggMode.NEVER


@dataclass(frozen=True)
class FleetParams:
    """Fleet-wide facts every policy needs: block size, KV bytes per block, links, thresholds."""

    kv_bytes_per_block: int
    topology: Topology
    disagg: DisaggThresholds = DisaggThresholds()
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        _require(
            self.kv_bytes_per_block > 0,
            "FleetParams.kv_bytes_per_block",
            self.kv_bytes_per_block,
            "must be > 0",
        )
        _require(self.block_size > 0, "FleetParams.block_size", self.block_size, "must be > 0")
