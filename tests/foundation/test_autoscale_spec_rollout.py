"""The spec's autoscale section (validated, off by default) and what a changed spec rolls."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.rollout import plan_update, roll
from orchestrator.spec import DeploymentSpec, SpecError, parse_spec
from orchestrator.worker_plan import model_config, router_settings
from workers.engine.engine import Role

pytestmark = pytest.mark.foundation

BASE = {
    "name": "roll", "model": {"preset": "tiny"},
    "prefill": {"instances": 1, "gpus_per_rank": 0, "max_batch": 4, "kv_blocks": 16},
    "decode": {"instances": 1, "gpus_per_rank": 0, "max_batch": 4, "kv_blocks": 16},
    "topology": {"kind": "cpu"}, "router": {"port": 0, "http_port": 0},
}


def _with(**changes: dict) -> dict:
    out = dict(BASE)
    for key, value in changes.items():
        out[key] = {**BASE.get(key, {}), **value}
    return out


def _problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    return err.value.problems


# --- the autoscale section ----------------------------------------------------------------------
def test_autoscale_is_off_by_default_and_a_full_section_parses() -> None:
    assert parse_spec(BASE).autoscale.enabled is False
    a = parse_spec(_with(autoscale={"enabled": True, "interval_s": 1, "window_s": 5, "ttft_slo_s": 0.5,
                                    "tpot_slo_s": 0.05, "cooldown_s": 3, "prefill": {"min": 1, "max": 3},
                                    "decode": {"min": 1, "max": 2}})).autoscale
    assert (a.interval_s, a.window_s, a.cooldown_s, a.prefill.max, a.decode.max) == (1, 5, 3, 3, 2)


@pytest.mark.parametrize(("section", "expect"), [
    ({"enabled": True, "decode": {"min": 2, "max": 1}}, "autoscale.decode: min (2) is above max (1)"),
    ({"enabled": True, "decode": {"min": 0, "max": 2}}, "autoscale.decode.min must be at least 1 (got 0)"),
    ({"enabled": True, "prefill": {"min": 2, "max": 3}}, "prefill.instances (1) is outside autoscale.prefill [2, 3]"),
    ({"interval_s": 0}, "autoscale.interval_s: Input should be greater than 0"),
    ({"cooldown": 3}, "autoscale.cooldown: unknown field"),
])
def test_autoscale_mistakes_name_the_field(section: dict, expect: str) -> None:
    assert any(expect in p for p in _problems(_with(autoscale=section))), _problems(_with(autoscale=section))


def test_autoscale_prefill_min_zero_is_refused_only_when_every_request_needs_a_prefill() -> None:
    section = {"enabled": True, "prefill": {"min": 0, "max": 2}}
    assert parse_spec(_with(autoscale=section)).autoscale.prefill.min == 0
    always = _with(autoscale=section, router={"disaggregation": {"mode": "always"}})
    assert any("autoscale.prefill.min must be at least 1" in p for p in _problems(always))


def test_autoscale_maxima_must_fit_the_gpus() -> None:
    gpu = {**BASE, "prefill": {"instances": 1, "ep_ranks": 4}, "decode": {"instances": 1, "ep_ranks": 4},
           "topology": {"kind": "b300-hgx", "nodes": 1}}
    assert parse_spec(gpu).autoscale.enabled is False
    auto = {**gpu, "autoscale": {"enabled": True, "prefill": {"min": 1, "max": 1}, "decode": {"min": 1, "max": 2}}}
    assert any("autoscale maxima need 12 GPUs, topology b300-hgx has 8" in p for p in _problems(auto))


# --- what a changed spec does -------------------------------------------------------------------
def _plan(old: dict, new: dict):  # noqa: ANN202
    a, b = parse_spec(old), parse_spec(new)
    return plan_update(a, b, router_settings(a, model_config(a)), lambda: router_settings(b, model_config(b)))


def test_instance_counts_alone_roll_nothing_and_touch_no_router() -> None:
    plan = _plan(BASE, _with(decode={"instances": 3}, prefill={"instances": 2}))
    assert plan.rolls == () and plan.router is None and not plan.autoscale_changed


def test_a_pool_setting_rolls_that_pool_only() -> None:
    plan = _plan(BASE, _with(prefill={"kv_blocks": 32}))
    assert plan.rolls == (Role.PREFILL,) and plan.router is None


def test_decode_max_batch_rolls_decode_and_updates_the_routers_rank_limits() -> None:
    plan = _plan(BASE, _with(decode={"max_batch": 8}))
    assert plan.rolls == (Role.DECODE,)
    assert plan.router is not None and plan.router.rank_limits.max_running == 8


def test_model_and_transfer_settings_roll_both_pools() -> None:
    assert _plan(BASE, _with(transfer={"lease_s": 5})).rolls == (Role.PREFILL, Role.DECODE)
    assert _plan(BASE, _with(model={"quant_sim": False})).rolls == (Role.PREFILL, Role.DECODE)


def test_router_only_settings_apply_in_place_with_the_running_tokens() -> None:
    old = parse_spec(BASE)
    current = router_settings(old, model_config(old))
    new = parse_spec(_with(router={"policy": "round-robin", "default_max_tokens": 7},
                           limits={"max_streams_per_client": 3}))
    plan = plan_update(old, new, current, lambda: router_settings(new, model_config(new)))
    assert plan.rolls == () and plan.router is not None
    assert plan.router.policy.value == "round-robin" and plan.router.limits.default_max_tokens == 7
    assert plan.router.quotas.max_streams_per_client == 3
    assert (plan.router.token, plan.router.admin_token) == (current.token, current.admin_token)


def test_autoscale_changes_are_reported() -> None:
    plan = _plan(BASE, _with(autoscale={"enabled": True, "decode": {"min": 1, "max": 2}}))
    assert plan.rolls == () and plan.autoscale_changed


@pytest.mark.parametrize(("change", "field"), [
    ({"name": "other"}, "name: the cluster runs deployment 'roll'"),
    ({"router": {**BASE["router"], "port": 9000}}, "router.port: clients connect to 0"),
    ({"security": {"token_file": "/nonexistent/token"}}, "security: the tokens and certificates"),
    ({"limits": {"max_request_bytes": 4096}}, "limits.max_request_bytes: the servers were started with"),
])
def test_what_cannot_change_on_a_running_deployment_is_refused_by_name(change: dict, field: str) -> None:
    old: DeploymentSpec = parse_spec(BASE)
    new = parse_spec({**BASE, **change})
    s = router_settings(old, model_config(old))
    with pytest.raises(ValueError, match=field):  # before the new settings are built (token files read)
        plan_update(old, new, s, lambda: pytest.fail("built the settings of a refused spec"))


def test_roll_starts_each_new_instance_before_removing_an_old_one() -> None:
    events: list[str] = []
    ready = {"count": 2}

    async def add() -> None:
        await asyncio.sleep(0)
        ready["count"] += 1
        events.append(f"add ({ready['count']} ready)")

    async def remove(name: str) -> None:
        ready["count"] -= 1
        events.append(f"remove {name} ({ready['count']} ready)")

    asyncio.run(roll(["decode-0", "decode-1"], add, remove))
    assert events == ["add (3 ready)", "remove decode-0 (2 ready)", "add (3 ready)", "remove decode-1 (2 ready)"]
