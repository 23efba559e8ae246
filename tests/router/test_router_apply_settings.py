"""A running router takes changed settings in place (rolling spec updates) and refuses the ones its
listeners were started with; its load snapshot reads the request counters it registered."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from orchestrator.router.host import RouterHost
from orchestrator.router.policy_round_robin import RoundRobinPolicy
from orchestrator.spec import parse_spec
from orchestrator.worker_plan import model_config, router_settings

pytestmark = pytest.mark.router

SPEC = {"name": "inplace", "model": {"preset": "tiny"}, "prefill": {"instances": 1, "gpus_per_rank": 0},
        "decode": {"instances": 1, "gpus_per_rank": 0}, "topology": {"kind": "cpu"},
        "router": {"port": 0, "http_port": 0}}


def _settings(**router: object):  # noqa: ANN202
    spec = parse_spec({**SPEC, "router": {**SPEC["router"], **router}})
    return router_settings(spec, model_config(spec))


def test_settings_change_in_place_and_listeners_are_refused() -> None:
    first = _settings()

    async def go() -> tuple:
        host = RouterHost(first)
        await host.start()
        try:
            snap = await host.load_snapshot()
            new = dataclasses.replace(_settings(policy="round-robin", default_max_tokens=7, max_migrations=0),
                                      token=first.token, admin_token=first.admin_token)
            await host.apply_settings(new)
            applied = (type(host._frontend.router.policy), host._frontend.limits.default_max_tokens,
                       host._frontend.max_migrations, host.settings is new)
            refusals = []
            for change in ({"grpc_port": 1}, {"token": "other"},
                           {"quotas": dataclasses.replace(new.quotas, max_request_bytes=4096)}):
                with pytest.raises(ValueError, match="cannot change on a running router") as err:
                    await host.apply_settings(dataclasses.replace(new, **change))
                refusals.append(str(err.value).split(" cannot")[0])
            return snap, applied, refusals, host.settings is new
        finally:
            await host.stop()

    snap, applied, refusals, unchanged = asyncio.run(go())
    assert snap.ranks == () and snap.counters.arrivals == 0 and snap.counters.finished == 0
    assert applied == (RoundRobinPolicy, 7, 0, True)
    assert refusals == ["router settings: grpc_port", "router settings: token",
                        "router settings: quotas.max_request_bytes"]
    assert unchanged  # a refused change left the settings as they were
