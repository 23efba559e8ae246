"""The autoscaler's GPU capacity comes from the planner's cost model; checked against the cost model
priced directly (a linear scan over batch sizes rather than the bisection)."""

from __future__ import annotations

import pytest

from orchestrator.autoscale.capacity import (
    MeasuredCapacity,
    PlannerCapacity,
    capacity_model_for,
    planner_model,
)
from orchestrator.autoscale.policy import CapacitySource
from orchestrator.autoscale.signals import PoolLoad, Signals
from orchestrator.planner.fleet import fleet_from_spec
from orchestrator.planner.models import ModelName
from orchestrator.spec import parse_spec
from orchestrator.worker_plan import model_config
from workers.model.presets import preset

pytestmark = pytest.mark.planner

IDLE = PoolLoad(1, 0, 0, 0, 0, 0)


def _spec(topology: dict, tpot_slo_s: float = 0.05) -> dict:
    return {"name": "cap", "model": {"preset": "v4-flash"},
            "prefill": {"instances": 1, "ep_ranks": 4, "gpus_per_rank": 1, "max_batched_tokens": 8192},
            "decode": {"instances": 1, "ep_ranks": 4, "gpus_per_rank": 1, "max_batch": 64},
            "topology": topology,
            "autoscale": {"enabled": True, "tpot_slo_s": tpot_slo_s, "prefill": {"min": 1, "max": 2},
                          "decode": {"min": 1, "max": 2}}}


def _sig(prompt: float, output: float | None, hit: float) -> Signals:
    return Signals(10.0, 1.0, prompt, output, 0.0, hit, None, None, IDLE, IDLE)


def test_planner_model_is_found_by_shape_and_refused_when_unknown() -> None:
    assert planner_model(preset("v4-flash")) is ModelName.V4_FLASH
    assert planner_model(preset("v4-pro")) is ModelName.V4_PRO  # V3.2 has Pro's sizes, not its layers
    with pytest.raises(ValueError, match="hidden 128"):
        planner_model(preset("tiny"))


@pytest.mark.parametrize("slo", [0.006, 0.01])
def test_gpu_capacity_is_the_cost_model_at_the_slo(slo: float) -> None:
    spec = parse_spec(_spec({"kind": "b300-hgx", "nodes": 2}, slo))
    model = capacity_model_for(spec, model_config(spec), assumed_prefill_tok_s=1.0)
    assert isinstance(model, PlannerCapacity)
    cap = model.capacity(_sig(prompt=4096, output=512, hit=0.5))
    fleet = fleet_from_spec(spec, model_name=ModelName.V4_FLASH)
    pc, dc = fleet.cost_model(fleet.prefill), fleet.cost_model(fleet.decode)
    assert cap.prefill_tok_s == pytest.approx(2048 / pc.prefill_seconds(4096, 2048, 8192), rel=1e-12)
    context = 4096 + 256
    fits = [b for b in range(1, 4 * 64 + 1) if dc.decode_step_seconds(b, b * context) <= slo]
    assert cap.decode_slots == max(fits, default=1)
    assert 1 < cap.decode_slots < 256  # the SLO, not the batch limit, binds here
    assert cap.prefill_source is cap.decode_source is CapacitySource.PLANNER


def test_cpu_capacity_is_measured() -> None:
    spec = parse_spec({**_spec({"kind": "cpu"}), "model": {"preset": "tiny"},
                       "prefill": {"instances": 1, "gpus_per_rank": 0},
                       "decode": {"instances": 1, "gpus_per_rank": 0, "max_batch": 8}})
    model = capacity_model_for(spec, model_config(spec), assumed_prefill_tok_s=2000.0)
    assert isinstance(model, MeasuredCapacity)
    cap = model.capacity(_sig(100, 10, 0.0))
    assert (cap.prefill_tok_s, cap.decode_slots, cap.decode_source) == (2000.0, 8, CapacitySource.ASSUMED)
