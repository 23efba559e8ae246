"""The workers' own numbers on the router's /metrics: one series per rank, from its last WorkerStats.

The gateway already receives every rank's WorkerStats (its load reports); this collector reads
them when Prometheus scrapes, so a rank that left the router leaves the page with it (no stale
labels kept forever). Labels: `worker` ("decode-0/r0"), `role` ("prefill" or "decode").

Gauges: tandem_worker_kv_blocks_used, tandem_worker_kv_blocks_free, tandem_worker_running_requests,
tandem_worker_queued_requests, tandem_worker_prefill_tokens_per_second,
tandem_worker_decode_tokens_per_second, tandem_worker_prefix_hit_ratio (prompt tokens served from
the rank's prefix cache / prompt tokens admitted, since start), tandem_worker_draining (0/1).
Counters (cumulative on the rank since it started; Prometheus appends `_total`):
tandem_worker_kv_transfer_bytes, tandem_worker_kv_transfer_seconds (READ time), tandem_worker_kv_transfers,
tandem_worker_kv_transfer_failures (handoffs recomputed instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.router.inputs import Role, WorkerId
from tandem.v1 import worker_pb2


@dataclass(frozen=True)
class RankReport:
    """A rank's last WorkerStats as the gateway holds it."""

    worker: WorkerId
    role: Role
    stats: worker_pb2.WorkerStats


@dataclass(frozen=True)
class _Series:
    name: str
    doc: str
    counter: bool
    read: Callable[[worker_pb2.WorkerStats], float]


SERIES: tuple[_Series, ...] = (
    _Series("tandem_worker_kv_blocks_used", "KV blocks in use on the rank", False,
            lambda s: s.kv_blocks_used),
    _Series("tandem_worker_kv_blocks_free", "KV blocks free on the rank", False, lambda s: s.kv_blocks_free),
    _Series("tandem_worker_running_requests", "Requests in the rank's running batch", False,
            lambda s: s.running_requests),
    _Series("tandem_worker_queued_requests", "Requests waiting on the rank", False,
            lambda s: s.queued_requests),
    _Series("tandem_worker_prefill_tokens_per_second", "Prompt tokens the rank computed per second, "
            "last few seconds", False, lambda s: s.prefill_tok_s),
    _Series("tandem_worker_decode_tokens_per_second", "Tokens the rank sampled per second, last few seconds",
            False, lambda s: s.decode_tok_s),
    _Series("tandem_worker_prefix_hit_ratio", "Prompt tokens served from the rank's prefix cache over "
            "prompt tokens admitted, since start", False, lambda s: s.prefix_hit_rate),
    _Series("tandem_worker_draining", "1 while the rank is draining", False, lambda s: float(s.draining)),
    _Series("tandem_worker_kv_transfer_bytes", "KV bytes the rank pulled over NIXL", True,
            lambda s: s.kv_transfer_bytes),
    _Series("tandem_worker_kv_transfer_seconds", "Seconds the rank's NIXL READs took, post to completion",
            True, lambda s: s.kv_transfer_seconds),
    _Series("tandem_worker_kv_transfers", "KV handoffs the rank pulled over NIXL", True,
            lambda s: s.kv_transfers),
    _Series("tandem_worker_kv_transfer_failures", "KV handoffs the rank could not pull (recomputed)", True,
            lambda s: s.kv_transfer_failures),
)


class WorkerStatsCollector(Collector):
    """Exports `SERIES` for every rank `reports()` returns at scrape time."""

    def __init__(self, reports: Callable[[], Iterable[RankReport]]) -> None:
        self._reports = reports

    def describe(self) -> list[Metric]:
        return []  # series appear with ranks; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        reports = sorted(self._reports(), key=lambda r: (r.worker.instance, r.worker.dp_rank))
        for series in SERIES:
            family = (CounterMetricFamily if series.counter else GaugeMetricFamily)(
                series.name, series.doc, labels=("worker", "role"))
            for r in reports:
                family.add_metric((f"{r.worker.instance}/r{r.worker.dp_rank}", r.role.value),
                                  float(series.read(r.stats)))
            yield family
