"""Tracing and the workers' metrics through one local deployment (deploy/local.yaml on this CPU):
a request's trace id is in the router's, the prefill's and the decode's log lines (read from each
actor process's own log file) and in its final chunk, with no prompt text at INFO; the router's
/metrics carries the decode rank's KV-pull bytes equal to what the final chunks reported, and the
ranks' block gauges equal to their pools."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.deployments import module_deployment

from orchestrator.controller import NAMESPACE, ROUTER_NAME
from orchestrator.router.client import generate, make_request, open_channel
from orchestrator.spec import load_spec
from tandem.v1 import generate_pb2
from workers.actor_common import actor_name

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = "deploy/local.yaml"
MARKER = "Zebra quartz 7781 marmalade"  # a prompt no log line may repeat


@pytest.fixture(scope="module")
def deployment(ray_session):  # noqa: ANN001, ANN201
    yield from module_deployment(ray_session, load_spec(SPEC))


def _actor_log_file(ray, handle) -> str:  # noqa: ANN001
    """The file the actor's process writes its stderr to (Ray redirects it into the session's logs)."""
    return ray.get(handle.__ray_call__.remote(lambda _self: os.readlink("/proc/self/fd/2")), timeout=30)


def _final(dep: dict, **kw) -> generate_pb2.GenerateChunk:  # noqa: ANN003
    with open_channel(dep["status"]["router_address"]) as ch:
        chunks = list(generate(ch, make_request(**kw), token=dep["token"], timeout_s=120))
    return chunks[-1]


def _lines_with(path: str, needle: str, deadline_s: float = 15.0, want: int = 1) -> list[str]:
    """Lines of `path` containing `needle`, waiting (the actor may still be writing) for `want` of them."""
    end = time.monotonic() + deadline_s
    while True:
        with open(path, errors="replace") as f:
            got = [ln.rstrip("\n") for ln in f if needle in ln]
        if len(got) >= want or time.monotonic() > end:
            return got
        time.sleep(0.2)


def _stage(line: str) -> str:
    m = re.search(r" stage=(\S+)", line)
    assert m, line
    return m.group(1)


def test_one_trace_id_in_router_prefill_and_decode_logs_and_the_final_chunk(deployment, ray_session) -> None:  # noqa: ANN001
    last = _final(deployment, prompt=MARKER * 12, max_tokens=5, ignore_eos=True)
    tid = last.trace_id
    assert re.fullmatch(r"[0-9a-f]{32}", tid), tid
    assert (last.prefill_worker, last.decode_worker) == ("prefill-0/r0", "decode-0/r0")
    router = ray_session.get_actor(ROUTER_NAME, namespace=NAMESPACE)
    files = {"router": _actor_log_file(ray_session, router)}
    for inst in ("prefill-0", "decode-0"):
        files[inst] = _actor_log_file(ray_session, ray_session.get_actor(actor_name(inst, 0), namespace=NAMESPACE))
    assert len(set(files.values())) == 3, files  # three processes, three files
    want_stages = {"router": ["admitted", "routed", "finished"],
                   "prefill-0": ["admitted", "prefill_done"],
                   "decode-0": ["admitted", "handoff_pulled", "finished"]}
    for who, path in files.items():
        lines = _lines_with(path, f"trace_id={tid} ", want=len(want_stages[who]))
        assert [_stage(ln) for ln in lines] == want_stages[who], (who, lines)
        assert all(f"request_id={last.request_id} " in ln for ln in lines)
        with open(path, errors="replace") as f:
            assert "Zebra quartz" not in f.read()  # no prompt text in any line of the process
    decode_end = _lines_with(files["decode-0"], f"trace_id={tid} ", want=3)[-1]
    assert f"kv_transfer_bytes={last.kv_transfer_bytes}" in decode_end and last.kv_transfer_bytes > 0
    assert last.usage.completion_tokens == 5 and "completion_tokens=5 " in decode_end + " "


def _scrape(dep: dict) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(dep["status"]["http_address"] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, s.labels.get("worker", "")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _settled(dep: dict, key: tuple[str, str], deadline_s: float = 20.0) -> float:
    """The series' value once three scrapes 0.5 s apart agree (earlier requests' reports are in)."""
    seen: list[float] = []
    end = time.monotonic() + deadline_s
    while len(seen) < 3 or len(set(seen[-3:])) > 1:
        assert time.monotonic() < end, (key, seen)
        seen.append(_scrape(dep)[key])  # KeyError if the series is missing: it exists from the first report
        time.sleep(0.5)
    return seen[-1]


def test_metrics_show_the_decode_ranks_pulled_bytes_and_block_gauges(deployment, ray_session) -> None:  # noqa: ANN001
    before = _settled(deployment, ("tandem_worker_kv_transfer_bytes_total", "decode-0/r0"))
    reported = sum(_final(deployment, prompt=f"metrics probe {i} " * (20 + 30 * i), max_tokens=3,
                          ignore_eos=True).kv_transfer_bytes for i in range(3))
    assert reported > 0
    end = time.monotonic() + 15
    while True:  # the rank reports every report_interval_s; wait for the one after the requests
        got = _scrape(deployment)
        if got[("tandem_worker_kv_transfer_bytes_total", "decode-0/r0")] - before == reported:
            break
        assert time.monotonic() < end, (before, reported, got[("tandem_worker_kv_transfer_bytes_total",
                                                               "decode-0/r0")])
        time.sleep(0.3)
    assert got[("tandem_worker_kv_transfers_total", "decode-0/r0")] >= 3
    assert got[("tandem_worker_kv_transfer_seconds_total", "decode-0/r0")] > 0
    assert got[("tandem_worker_kv_transfer_bytes_total", "prefill-0/r0")] == 0
    status = ray_session.get(deployment["ctl"].status.remote())
    for inst in status["instances"]:  # used + free = the pool the controller reports, per rank
        w = f"{inst['id']}/r0"
        total = got[("tandem_worker_kv_blocks_used", w)] + got[("tandem_worker_kv_blocks_free", w)]
        assert total == inst["kv_blocks_total"] > 0
    assert got[("tandem_worker_prefill_tokens_per_second", "prefill-0/r0")] >= 0


def test_the_dashboards_worker_panels_name_series_the_router_exports(deployment) -> None:  # noqa: ANN001
    with open("deploy/grafana/tandem-dashboard.json") as f:
        exprs = [t["expr"] for p in json.load(f)["panels"] for t in p["targets"]]
    named = {m for e in exprs for m in re.findall(r"tandem_worker_[a-z_]+", e)}
    exported = {name for name, _ in _scrape(deployment)}
    assert len(named) >= 10 and named <= exported, sorted(named - exported)
