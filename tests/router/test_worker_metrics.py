"""The workers' series on the router's /metrics, read from the ranks' last WorkerStats at scrape time."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.router.inputs import Role, WorkerId
from orchestrator.router.worker_metrics import SERIES, RankReport, WorkerStatsCollector
from tandem.v1 import worker_pb2

pytestmark = pytest.mark.router


def _stats(**kw: float) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(**kw)


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            if s.name.startswith("tandem_worker_") and not s.name.endswith("_created"):
                out[(s.name, s.labels["worker"], s.labels["role"])] = s.value
    return out


def test_each_rank_exports_its_last_report_exactly() -> None:
    reports = [
        RankReport(WorkerId("decode-0", 0), Role.DECODE, _stats(
            kv_blocks_used=17, kv_blocks_free=47, running_requests=3, queued_requests=2, prefill_tok_s=0.0,
            decode_tok_s=41.5, prefix_hit_rate=0.25, kv_transfer_bytes=123456789012, kv_transfer_seconds=0.75,
            kv_transfers=9, kv_transfer_failures=1)),
        RankReport(WorkerId("prefill-0", 0), Role.PREFILL, _stats(
            kv_blocks_used=5, kv_blocks_free=59, queued_requests=4, prefill_tok_s=812.0, draining=True)),
    ]
    reg = CollectorRegistry()
    reg.register(WorkerStatsCollector(lambda: reports))
    got = _scrape(reg)
    d, p = ("decode-0/r0", "decode"), ("prefill-0/r0", "prefill")
    assert got[("tandem_worker_kv_blocks_used", *d)] == 17 and got[("tandem_worker_kv_blocks_free", *d)] == 47
    assert got[("tandem_worker_running_requests", *d)] == 3 and got[("tandem_worker_queued_requests", *p)] == 4
    assert got[("tandem_worker_decode_tokens_per_second", *d)] == 41.5
    assert got[("tandem_worker_prefill_tokens_per_second", *p)] == 812.0
    assert got[("tandem_worker_prefix_hit_ratio", *d)] == 0.25
    assert got[("tandem_worker_draining", *p)] == 1 and got[("tandem_worker_draining", *d)] == 0
    assert got[("tandem_worker_kv_transfer_bytes_total", *d)] == 123456789012
    assert got[("tandem_worker_kv_transfer_seconds_total", *d)] == 0.75
    assert got[("tandem_worker_kv_transfers_total", *d)] == 9
    assert got[("tandem_worker_kv_transfer_failures_total", *d)] == 1
    assert got[("tandem_worker_kv_transfer_bytes_total", *p)] == 0
    assert len(got) == 2 * len(SERIES)  # every series for every rank, nothing else


def test_a_rank_that_left_leaves_the_page() -> None:
    reports = [RankReport(WorkerId("decode-0", 0), Role.DECODE, _stats(kv_blocks_used=1)),
               RankReport(WorkerId("decode-1", 0), Role.DECODE, _stats(kv_blocks_used=2))]
    reg = CollectorRegistry()
    reg.register(WorkerStatsCollector(lambda: list(reports)))
    assert {w for _, w, _ in _scrape(reg)} == {"decode-0/r0", "decode-1/r0"}
    reports.pop(0)
    assert {w for _, w, _ in _scrape(reg)} == {"decode-1/r0"}
    reports.clear()
    assert _scrape(reg) == {}
