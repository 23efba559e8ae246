"""What a routing policy answers: a booked (prefill, decode) pair, or a typed refusal."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.router.inputs import WorkerId


class Reason(enum.Enum):
    """Why the pair was chosen (a metrics label: routing decisions by reason)."""

    PREFIX_HIT = "prefix_hit"  # the cheapest pair won because of KV it already holds
    LEAST_LOAD = "least_load"  # nothing cached counted; the least loaded / cheapest pair won
    LOCAL_PREFILL = "local_prefill"  # conditional disaggregation: the decode worker prefills itself
    SESSION_AFFINITY = "session_affinity"  # equal costs; the conversation's previous pair won
    ROUND_ROBIN = "round_robin"  # the next worker in turn
    LOAD_IMBALANCE = "load_imbalance"  # sglang: loads too uneven, least loaded regardless of cache


class RefusalReason(enum.Enum):
    """Why no pair was booked; the server maps each to a gRPC status."""

    NO_WORKERS = "no_workers"  # no decode worker (or no prefill worker when one is needed): UNAVAILABLE
    QUEUES_FULL = "queues_full"  # every candidate is at its queue limit: RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class RouteDecision:
    """A booked route.

    prefill is None when the decode worker prefills locally. expected_ttft_s is the estimated
    time to the first token on the prefilling worker (its queued prefill work plus the uncached
    tokens, at its measured rate); expected_handoff_s the estimated KV transfer time to the decode
    (0 for local prefill). transfer_blocks are the blocks the decode must receive: the prompt's
    blocks minus the leading blocks the decode already holds (decode-side reuse), 0 when local.
    decode_alloc_blocks are the blocks the decode allocates for the prompt: the same count, also
    when it prefills locally.
    """

    request_id: str
    prefill: WorkerId | None
    decode: WorkerId
    reason: Reason
    expected_ttft_s: float
    expected_handoff_s: float
    prefill_cached_blocks: int
    decode_cached_blocks: int
    uncached_tokens: int
    transfer_blocks: int
    decode_alloc_blocks: int


@dataclass(frozen=True)
class Refusal:
    """No route: reason says which status to return, detail says what was full or missing."""

    request_id: str
    reason: RefusalReason
    detail: str


RouteOutcome = RouteDecision | Refusal
