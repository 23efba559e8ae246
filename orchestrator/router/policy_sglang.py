"""`sglang`: SGLang's cache-aware policy with balance thresholds, applied to each side on its own.

Published rule, at its published defaults (sgl-model-gateway: cache_threshold 0.3,
balance_abs_threshold 64, balance_rel_threshold 1.5), over one side's admitting workers with
load = running + waiting requests (what the gateway counts per worker):

    imbalanced = (max_load - min_load) > balance_abs_threshold and max_load > balance_rel_threshold * min_load
    imbalanced                        -> least loaded                       (LOAD_IMBALANCE)
    else, w* = longest prefix match;  match[w*] * block_size / prompt > cache_threshold
                                      -> w*                                 (PREFIX_HIT)
    else                              -> least loaded                       (LEAST_LOAD)

The gateway's approximate per-worker radix tree (LRU-pruned every 120 s) is replaced by the KV
index's exact match; ties go to the lower load, then the lowest WorkerId. Always disaggregated
(the decode prefills only when the disaggregation mode is NEVER). The decision's reason is the
prefill side's.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.router.decision import Reason, Refusal, RouteOutcome
from orchestrator.router.inputs import DisaggMode, FleetParams, Role, WorkerState
from orchestrator.router.outcome import argmin, decision, open_workers
from orchestrator.router.view import RoutingView


@dataclass(frozen=True)
class SglangParams:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5


def sglang_load(w: WorkerState) -> int:
    """Requests the gateway counts on a worker: running plus waiting."""
    return w.running_requests + w.queue_length


class SglangPolicy:
    """Cache-aware with balance thresholds; see the module docstring."""

    def __init__(self, fleet: FleetParams, params: SglangParams | None = None) -> None:
        self.fleet = fleet
        self.params = params if params is not None else SglangParams()

    def pick(self, view: RoutingView, workers: list[WorkerState]) -> tuple[WorkerState, Reason]:
        """One side's choice by the module rule."""
        p = self.params
        loads = [sglang_load(w) for w in workers]
        hi, lo = max(loads), min(loads)
        if hi - lo > p.balance_abs_threshold and hi > p.balance_rel_threshold * lo:
            return argmin(workers, sglang_load), Reason.LOAD_IMBALANCE
        best = min(workers, key=lambda w: (-view.matched_blocks(w.worker), sglang_load(w), w.worker))
        rate = view.matched_blocks(best.worker) * self.fleet.block_size / view.request.prompt_tokens
        if rate > p.cache_threshold:
            return best, Reason.PREFIX_HIT
        return argmin(workers, sglang_load), Reason.LEAST_LOAD

    def choose(self, view: RoutingView) -> RouteOutcome:
        """Each side by the cache-aware rule, or the refusal for the side that has no admitting worker."""
        decodes = open_workers(view, Role.DECODE)
        if isinstance(decodes, Refusal):
            return decodes
        decode, decode_reason = self.pick(view, decodes)
        if view.fleet.disagg.mode is DisaggMode.NEVER:
            return decision(view, None, decode, decode_reason)
        prefills = open_workers(view, Role.PREFILL)
        if isinstance(prefills, Refusal):
            return prefills
        prefill, reason = self.pick(view, prefills)
        return decision(view, prefill, decode, reason)
