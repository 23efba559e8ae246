"""Online autoscaling and a rolling spec update on one local deployment (the tiny model on this CPU).

The deployment starts at 1 prefill + 1 decode with the autoscaler on (bounds 1..2 each, decisions
every 0.5 s, cooldown 2.5 s). A bounded client pool drives a step in load: the pools must grow
within a deadline and shrink back after the load stops, with every request completed. Then a spec
with changed pool settings is applied while load runs: no request fails and every instance ends
on the new config generation, with the new settings in force.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import threading
import time

import pytest
from support.deployments import module_deployment
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.deploy import controller_for
from orchestrator.router.client import generate, make_request, open_channel
from orchestrator.spec import parse_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = {
    "name": "autoscale", "model": {"checkpoint": "deploy/models/tiny-demo", "max_context": 4096},
    "prefill": {"instances": 1, "gpus_per_rank": 0, "max_batch": 2, "max_batched_tokens": 1024,
                "kv_blocks": 32},
    "decode": {"instances": 1, "gpus_per_rank": 0, "max_batch": 2, "max_batched_tokens": 1024,
               "kv_blocks": 32},
    "topology": {"kind": "cpu", "num_cpus": 2},
    "router": {"port": 0, "http_port": 0, "disaggregation": {"mode": "always"}},
    "autoscale": {"enabled": True, "interval_s": 0.5, "window_s": 3.0, "ttft_slo_s": 0.3, "tpot_slo_s": 1.0,
                  "cooldown_s": 2.5, "prefill": {"min": 1, "max": 2}, "decode": {"min": 1, "max": 2}},
}
MAX_TOKENS = 16
CLIENTS = 8


@pytest.fixture(scope="module")
def deployment(ray_session):  # noqa: ANN001, ANN201
    for dep in module_deployment(ray_session, parse_spec(BASE, "test")):
        yield {**dep, "address": dep["status"]["router_address"], "http": dep["status"]["http_address"]}


class Load:
    """CLIENTS threads sending requests back to back until stopped; counts what each one got."""

    def __init__(self, dep: dict, prompt_len: int) -> None:
        self.dep, self.prompt_len = dep, prompt_len
        self.stop = threading.Event()
        self.pool = cf.ThreadPoolExecutor(CLIENTS)
        self.futures: list[cf.Future] = []

    def _client(self, c: int) -> list[int]:
        got = []
        with open_channel(self.dep["address"]) as ch:
            i = 0
            while not self.stop.is_set():
                prompt = [(c * 31 + i * 7 + k) % 250 + 1 for k in range(self.prompt_len)]  # no shared prefix
                chunks = list(generate(ch, make_request(token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True),
                                       token=self.dep["token"], timeout_s=120))
                got.append(sum(len(x.token_ids) for x in chunks))
                i += 1
        return got

    def __enter__(self) -> Load:
        self.futures = [self.pool.submit(self._client, c) for c in range(CLIENTS)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True)

    def results(self) -> list[int]:
        """Every request's token count (raises the first client's error)."""
        return [n for f in self.futures for n in f.result(timeout=180)]


def _sizes(status: dict) -> tuple[int, int]:
    live = [i for i in status["instances"] if i["state"] in ("ready", "starting")]
    return sum(i["role"] == "prefill" for i in live), sum(i["role"] == "decode" for i in live)


def _wait_for(ray, ctl, ok, timeout_s: float) -> dict:  # noqa: ANN001
    end = time.monotonic() + timeout_s
    while True:
        st = ray.get(ctl.status.remote())
        if ok(st) or time.monotonic() > end:
            return st
        time.sleep(0.5)


def test_pools_follow_a_step_in_load_and_no_request_fails(deployment, ray_session) -> None:  # noqa: ANN001
    ctl = deployment["ctl"]
    assert _sizes(ray_session.get(ctl.status.remote())) == (1, 1)
    with Load(deployment, prompt_len=450) as load:
        grown = _wait_for(ray_session, ctl, lambda st: _sizes(st) == (2, 2), 90)
    served = load.results()
    changes = grown["autoscale"]["changes"]
    assert _sizes(grown) == (2, 2), (grown["instances"], changes, grown["autoscale"]["last"])
    assert served and served == [MAX_TOKENS] * len(served)
    ups = {(r[p]["reason"], p) for r in changes for p in ("prefill", "decode") if r[p]["target"] > r[p]["current"]}
    assert {p for _, p in ups} == {"prefill", "decode"} and {r for r, _ in ups} <= {"burst", "load", "slo"}
    # No load now: after the cooldown each pool steps back down to its minimum.
    shrunk = _wait_for(ray_session, ctl, lambda st: _sizes(st) == (1, 1), 40)
    assert _sizes(shrunk) == (1, 1), (shrunk["instances"], shrunk["autoscale"]["last"])
    downs = [r for r in shrunk["autoscale"]["changes"] for p in ("prefill", "decode")
             if r[p]["target"] < r[p]["current"]]
    assert downs and all(r[p]["reason"] == "shrink" for r in downs for p in ("prefill", "decode")
                         if r[p]["target"] < r[p]["current"])
    # The operator's view (HTTP admin status through the CLI) carries the decisions and generations.
    env = {"TANDEM_STATE": "/nonexistent/state.json", "TANDEM_HTTP_ADDRESS": deployment["http"],
           "TANDEM_ADMIN_TOKEN": deployment["admin_token"]}
    out = CliRunner().invoke(app, ["status"], env=env, terminal_width=300)
    assert out.exit_code == 0, out.output
    # The latest decision: the step down to 1 itself, or a steady one after it.
    assert "┃ gen ┃" in out.output and re.search(r"autoscale decode: [12] -> 1 \((shrink|steady)", out.output), out.output
    js = CliRunner().invoke(app, ["status", "--json"], env=env)
    as_json = json.loads(js.output)
    assert as_json["autoscale"]["enabled"] and as_json["autoscale"]["changes"] == shrunk["autoscale"]["changes"]
    assert {i["generation"] for i in as_json["instances"]} == {1}


def test_a_changed_spec_rolls_every_instance_under_load_and_no_request_fails(deployment, ray_session) -> None:  # noqa: ANN001
    ctl = deployment["ctl"]
    before = ray_session.get(ctl.status.remote())
    assert before["generation"] == 1 and _sizes(before) == (1, 1)
    new = {**BASE, "prefill": {**BASE["prefill"], "kv_blocks": 48}, "decode": {**BASE["decode"], "kv_blocks": 48},
           "router": {**BASE["router"], "default_max_tokens": 5}, "autoscale": {"enabled": False}}
    with pytest.raises(ValueError, match="security"):  # refused before anything is touched
        ray_session.get(ctl.apply.remote({**new, "security": {"token_file": "/nonexistent"}}))
    ready_seen: list[tuple[int, int]] = []
    with Load(deployment, prompt_len=100) as load, cf.ThreadPoolExecutor(1) as operator:
        # The operator's path: `python -m orchestrator.deploy SPEC` on the running deployment.
        applying = operator.submit(controller_for, parse_spec(new, "update"))
        while not applying.done():
            time.sleep(0.3)
            st = ray_session.get(ctl.status.remote())
            ready = [i for i in st["instances"] if i["state"] == "ready"]
            ready_seen.append((sum(i["role"] == "prefill" for i in ready), sum(i["role"] == "decode" for i in ready)))
        after = applying.result()[1]
    served = load.results()
    assert served and served == [MAX_TOKENS] * len(served)  # every request of the load completed
    assert ready_seen and min(p for p, _ in ready_seen) >= 1 and min(d for _, d in ready_seen) >= 1
    old_ids = {i["id"] for i in before["instances"]}
    assert after["generation"] == 2 and _sizes(after) == (1, 1) and after["autoscale"] == {"enabled": False}
    assert all(i["generation"] == 2 and i["id"] not in old_ids for i in after["instances"])
    assert [i["kv_blocks_total"] for i in after["instances"]] == [48, 48]  # the new pools' size
    again = controller_for(parse_spec(new, "again"))[1]  # the same spec again: nothing to roll
    assert again["generation"] == 2 and [i["id"] for i in again["instances"]] == [i["id"] for i in after["instances"]]
    # The router took its new settings in place: a request without max_tokens gets the new default.
    with open_channel(deployment["address"]) as ch:
        chunks = list(generate(ch, make_request(prompt="defaults", ignore_eos=True), token=deployment["token"],
                               timeout_s=60))
    assert sum(len(c.token_ids) for c in chunks) == 5
