"""`dynamo`: Dynamo KvRouter's overlap-credit cost, applied to each side on its own.

Published formula at its published defaults (overlap credit 1.0 per device block, prefill load
scale 1.0, temperature 0 = argmin), per worker w of a side:

    credit  = overlap_weight * matched_blocks[w]          (host / disk tiers: not modelled, 0)
    prefill = (queued_prefill_tokens[w] + prompt_tokens) / block_size
    decode  = kv_blocks_used[w] + request_blocks          (overlap with active sequences: 0)
    cost[w] = prefill_load_scale * max(prefill - credit, 0) + decode

The decode worker is chosen first with overlap credit 0 (Dynamo's decode stage). Conditional
disaggregation as published: prefill locally on that decode when its uncached part is below
2048 tokens AND below 0.7 of the prompt (`DisaggThresholds.local`, whose defaults are these);
otherwise the prefill worker is the argmin of cost with full credit. Dynamo picks at random among
equal costs; here the lowest WorkerId wins, so the policy stays deterministic. Dynamo queues at
the router when every worker is busy; here the common admission rule refuses instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.router.decision import Reason, Refusal, RouteOutcome
from orchestrator.router.estimate import prompt_blocks, uncached_tokens
from orchestrator.router.inputs import FleetParams, Role, WorkerState
from orchestrator.router.outcome import argmin, decision, open_workers
from orchestrator.router.view import RoutingView


@dataclass(frozen=True)
class DynamoParams:
    overlap_weight: float = 1.0
    prefill_load_scale: float = 1.0


class DynamoPolicy:
    """Overlap-credit cost per side; see the module docstring."""

    def __init__(self, fleet: FleetParams, params: DynamoParams | None = None) -> None:
        self.fleet = fleet
        self.params = params if params is not None else DynamoParams()

    def cost(self, view: RoutingView, w: WorkerState, overlap_weight: float) -> float:
        """cost[w] of the module formula."""
        n, bs = view.request.prompt_tokens, self.fleet.block_size
        credit = overlap_weight * view.matched_blocks(w.worker)
        prefill = (w.queued_prefill_tokens + n) / bs
        decode = w.kv_blocks_used + prompt_blocks(n, bs)
        return self.params.prefill_load_scale * max(prefill - credit, 0.0) + decode

    def choose(self, view: RoutingView) -> RouteOutcome:
        """Decode by cost without credit, then local prefill or the prefill of least credited cost."""
        decodes = open_workers(view, Role.DECODE)
        if isinstance(decodes, Refusal):
            return decodes
        decode = argmin(decodes, lambda w: self.cost(view, w, 0.0))
        n = view.request.prompt_tokens
        unc = uncached_tokens(n, view.matched_blocks(decode.worker), self.fleet.block_size)
        if self.fleet.disagg.local(unc, n):
            return decision(view, None, decode, Reason.LOCAL_PREFILL)
        prefills = open_workers(view, Role.PREFILL)
        if isinstance(prefills, Refusal):
            return prefills
        prefill = argmin(prefills, lambda w: self.cost(view, w, self.params.overlap_weight))
        reason = Reason.PREFIX_HIT if view.matched_blocks(prefill.worker) > 0 else Reason.LEAST_LOAD
        return decision(view, prefill, decode, reason)
