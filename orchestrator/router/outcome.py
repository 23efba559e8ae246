"""Pieces the per-side policies share: admitting workers of a role, and a decision with estimates.

The peers' policies (round-robin, sglang, dynamo) choose the prefill and the decode worker each
on its own side; these helpers give them the common admission rule and report their choice with
the same TTFT / handoff estimates as Tandem's `kv` policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from orchestrator.router.decision import Reason, Refusal, RefusalReason, RouteDecision
from orchestrator.router.estimate import (
    handoff_seconds,
    prefill_seconds,
    transfer_blocks,
    uncached_tokens,
)
from orchestrator.router.inputs import Role, WorkerState
from orchestrator.router.view import RoutingView


def open_workers(view: RoutingView, role: Role) -> list[WorkerState] | Refusal:
    """The admitting workers of role (WorkerId order); a refusal when there are none."""
    all_ = view.of_role(role)
    rid = view.request.request_id
    if not all_:
        return Refusal(rid, RefusalReason.NO_WORKERS, f"no {role.value} worker is registered")
    open_ = [w for w in all_ if w.admits]
    if not open_:
        return Refusal(
            rid, RefusalReason.QUEUES_FULL, f"all {len(all_)} {role.value} workers are at their queue limit"
        )
    return open_


def argmin(workers: Sequence[WorkerState], key: Callable[[WorkerState], float]) -> WorkerState:
    """The worker with the least key; equal keys go to the lowest WorkerId (never at random)."""
    return min(workers, key=lambda w: (key(w), w.worker))


def decision(
    view: RoutingView, prefill: WorkerState | None, decode: WorkerState, reason: Reason
) -> RouteDecision:
    """A RouteDecision for an already chosen pair, with the shared estimates."""
    fleet, n = view.fleet, view.request.prompt_tokens
    bs = fleet.block_size
    held = view.matched_blocks(decode.worker)
    alloc = transfer_blocks(n, held, bs)
    if prefill is None:
        unc = uncached_tokens(n, held, bs)
        ttft, handoff, cached, moved = prefill_seconds(decode, unc), 0.0, held, 0
    else:
        cached = view.matched_blocks(prefill.worker)
        unc = uncached_tokens(n, cached, bs)
        ttft, moved = prefill_seconds(prefill, unc), alloc
        handoff = handoff_seconds(fleet, prefill, decode, moved)
    return RouteDecision(
        request_id=view.request.request_id,
        prefill=None if prefill is None else prefill.worker,
        decode=decode.worker,
        reason=reason,
        expected_ttft_s=ttft,
        expected_handoff_s=handoff,
        prefill_cached_blocks=cached,
        decode_cached_blocks=held,
        uncached_tokens=unc,
        transfer_blocks=moved,
        decode_alloc_blocks=alloc,
    )
