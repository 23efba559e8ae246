"""A running router takes changed settings in place (rolling spec updates) and refuses the ones its
listeners were started with; its load snapshot (the autoscaler's input) reads the request counters
its metrics registered."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.router.decision import Reason
from orchestrator.router.host import RouterHost
from orchestrator.router.load import RequestCounters, read_counters
from orchestrator.router.metrics import RouterMetrics
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


def test_load_counters_read_what_the_router_metrics_counted() -> None:
    metrics = RouterMetrics(CollectorRegistry())
    metrics.arrivals.inc(3)
    metrics.prompt_tokens.inc(700)
    metrics.output_tokens.inc(40)
    metrics.prompt_blocks.inc(4)
    metrics.cached_blocks.inc(1)
    for reason, n in ((Reason.LOCAL_PREFILL, 2), (Reason.PREFIX_HIT, 1), (Reason.LEAST_LOAD, 1)):
        metrics.decisions.labels(reason.value).inc(n)
    for ttft in (0.25, 0.5):
        metrics.ttft.observe(ttft)
    metrics.tpot.observe(0.125)
    for total in (1.0, 2.0):
        metrics.e2e.observe(total)
    got = read_counters(metrics.registry)
    assert got == RequestCounters(arrivals=3, prompt_tokens=700, finished=2, output_tokens=40, prompt_blocks=4,
                                   cached_blocks=1, ttft_sum_s=0.75, ttft_count=2, tpot_sum_s=0.125, tpot_count=1,
                                   routed=4, local_prefills=2)
    metrics.arrivals.inc()
    assert read_counters(metrics.registry).minus(got).arrivals == 1
    with pytest.raises(ValueError, match="arrivals went down"):
        got.minus(read_counters(metrics.registry))
