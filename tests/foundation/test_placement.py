"""Placement: one group per instance inside one NVLink domain; a clear error when it cannot fit."""

from __future__ import annotations

import time

import pytest

from orchestrator.placement import CPU_SLIVER, PlacementError, Strategy, group_requests, place
from orchestrator.spec import B300HgxTopology, CpuTopology, Gb200Nvl72Topology, PoolSpec

pytestmark = pytest.mark.foundation


def test_cpu_ranks_take_slivers_so_two_cores_never_block() -> None:
    [req] = group_requests("decode-0", PoolSpec(instances=1, ep_ranks=4, gpus_per_rank=0),
                           CpuTopology(kind="cpu"), {"CPU": 2.0})
    assert req.bundles == tuple({"CPU": CPU_SLIVER} for _ in range(4)) and req.domain == "local"


def test_b300_instance_is_one_node() -> None:
    [req] = group_requests("prefill-1", PoolSpec(instances=2, ep_ranks=4), B300HgxTopology(kind="b300-hgx", nodes=2),
                           {"GPU": 16.0})
    assert req.strategy is Strategy.STRICT_PACK and len(req.bundles) == 4
    assert req.bundles[0] == {"GPU": 1.0, "CPU": 1.0}


def test_nvl72_instance_stays_in_one_rack_most_free_first() -> None:
    cluster = {"GPU": 144.0, "nvl72_rack_0": 8.0, "nvl72_rack_1": 72.0, "CPU": 1000.0}
    reqs = group_requests("decode-0", PoolSpec(instances=1, ep_ranks=48), Gb200Nvl72Topology(kind="gb200-nvl72", racks=2),
                          cluster)
    assert [r.domain for r in reqs] == ["nvl72_rack_1", "nvl72_rack_0"]
    assert all(b == {"GPU": 1.0, "CPU": 1.0, "nvl72_rack_1": 1.0} for b in reqs[0].bundles)


def test_nvl72_without_rack_resources_says_what_to_set() -> None:
    with pytest.raises(PlacementError, match=r"nvl72_rack_<id>' resource .*ray start --resources"):
        group_requests("decode-0", PoolSpec(instances=1, ep_ranks=8), Gb200Nvl72Topology(kind="gb200-nvl72", racks=1),
                       {"GPU": 8.0})


def test_unplaceable_group_times_out_with_a_clear_error(ray_session) -> None:  # noqa: ANN001
    reqs = group_requests("prefill-0", PoolSpec(instances=1, ep_ranks=2), B300HgxTopology(kind="b300-hgx", nodes=1),
                          {})
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"instance prefill-0: no placement within 1 s for 2 x \{'GPU': 1.0"):
        place(reqs, timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    # The failed group was removed: a CPU group still places at once.
    [cpu] = group_requests("decode-0", PoolSpec(instances=1, ep_ranks=3, gpus_per_rank=0), CpuTopology(kind="cpu"), {})
    pg = place([cpu], timeout_s=30.0)
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)
