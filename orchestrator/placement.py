"""Where a worker instance's ranks go: one placement group per instance, inside one NVLink domain.

- `cpu`: every rank is a bundle of a sliver of CPU (`CPU_SLIVER`), so a 2-core machine places any
  number of ranks instead of leaving a group pending forever; the ranks share the cores.
- `b300-hgx`: the NVLink domain is a node: `ep_ranks` bundles of `gpus_per_rank` GPUs, STRICT_PACK.
- `gb200-nvl72`: the NVLink domain is a rack of 18 trays (nodes). Operators give every tray of rack R
  the custom resource `nvl72_rack_R` equal to its GPU count (docs/operations.md); each bundle asks
  for its GPUs and as many units of one rack's resource, so the group lands inside that rack. Racks
  are tried in order of free units.
A group that cannot be placed within the timeout is removed and `PlacementError` says what was
asked for and what the cluster has.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.spec import B300HgxTopology, CpuTopology, Gb200Nvl72Topology, PoolSpec

CPU_SLIVER = 0.01
RACK_PREFIX = "nvl72_rack_"


class PlacementError(RuntimeError):
    """An instance's ranks could not be placed; the message says what is missing."""


class Strategy(enum.Enum):
    PACK = "PACK"
    STRICT_PACK = "STRICT_PACK"


@dataclass(frozen=True)
class GroupRequest:
    """One attempt to place an instance: bundles (one per rank), strategy, and the NVLink domain."""

    instance: str
    bundles: tuple[Mapping[str, float], ...]
    strategy: Strategy
    domain: str  # "local", "node", or the rack resource name

    def describe(self) -> str:
        return f"{len(self.bundles)} x {dict(self.bundles[0])} ({self.strategy.value}, domain {self.domain})"


def group_requests(
    instance: str,
    pool: PoolSpec,
    topology: CpuTopology | B300HgxTopology | Gb200Nvl72Topology,
    cluster_resources: Mapping[str, float],
) -> list[GroupRequest]:
    """The placements to try for one instance, best first (a non-empty list)."""
    n = pool.ep_ranks
    if isinstance(topology, CpuTopology):
        return [GroupRequest(instance, tuple({"CPU": CPU_SLIVER} for _ in range(n)), Strategy.PACK, "local")]
    gpus = float(pool.gpus_per_rank)
    if isinstance(topology, B300HgxTopology):
        bundle = {"GPU": gpus, "CPU": 1.0}
        return [GroupRequest(instance, tuple(dict(bundle) for _ in range(n)), Strategy.STRICT_PACK, "node")]
    racks = sorted((k for k in cluster_resources if k.startswith(RACK_PREFIX)),
                   key=lambda k: (-cluster_resources[k], k))
    if not racks:
        raise PlacementError(
            f"instance {instance}: topology gb200-nvl72 needs nodes labelled with a '{RACK_PREFIX}<id>' "
            "resource (e.g. `ray start --resources '{\"nvl72_rack_0\": 4}'` on each tray of rack 0); "
            f"the cluster has none (resources: {sorted(cluster_resources)})"
        )
    return [
        GroupRequest(instance, tuple({"GPU": gpus, "CPU": 1.0, rack: gpus} for _ in range(n)),
                     Strategy.PACK, rack)
        for rack in racks
    ]


def place(requests: list[GroupRequest], timeout_s: float, *, name_prefix: str = "tandem") -> object:
    """Create the first placement group of `requests` that becomes ready within timeout_s each.

    Returns the ready `PlacementGroup`; raises PlacementError naming what could not be placed.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    tried = []
    for req in requests:
        pg = placement_group([dict(b) for b in req.bundles], strategy=req.strategy.value,
                             name=f"{name_prefix}-{req.instance}")
        try:
            ray.get(pg.ready(), timeout=timeout_s)
            return pg
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            tried.append(req.describe())
    available = {k: v for k, v in ray.available_resources().items() if not k.startswith("node:")}
    raise PlacementError(
        f"instance {requests[0].instance}: no placement within {timeout_s:g} s for "
        f"{'; '.join(tried)}; available now: {available}"
    )
