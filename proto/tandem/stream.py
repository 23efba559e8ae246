"""What workers send the router while they serve: per-step token batches and handoff results.

The contract between workers (producers) and the router (consumer), so neither imports the other.
- A worker sends ONE `StepBatch` per engine step holding a `TokenDelta` for every request that
  produced tokens (or ended) in that step: never one message per token.
- A prefill worker answers a disaggregated request with a `PrefillResult`: the first token (its
  delta, finished when the request ended at the prefill: max_tokens 1, EOS, a stop) and, unless
  finished, the serialized `tandem.v1.HandoffDescriptor` the decode pulls the KV with.
- The last delta of a request (finish set) carries its `RequestSummary`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Finish(enum.Enum):
    """Why a request ended (mirrors tandem.v1.FinishReason)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the model's context is full
    CANCELLED = "cancelled"  # the client went away or the router cancelled it
    ABORTED = "aborted"  # the worker could not go on (see RequestSummary.error)


@dataclass(frozen=True)
class RequestSummary:
    """Per-request accounting, sent once with the last delta. Times in seconds, worker-measured."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens this worker did not compute (prefix cache or handoff)
    queue_s: float = 0.0  # arrival at the worker to the start of its work on the request
    prefill_s: float = 0.0  # prompt compute on this worker (0 when the KV came by handoff)
    transfer_s: float = 0.0  # KV handoff on the decode: claim to release
    kv_transfer_bytes: int = 0  # bytes pulled over NIXL for this request
    error: str = ""  # why, when Finish.ABORTED
    drafted_tokens: int = 0  # speculative decoding: draft tokens proposed for this request
    accepted_tokens: int = 0  # ... and accepted by the verifying step


@dataclass(frozen=True)
class TokenLogprob:
    """The natural-log probability of a chosen token under the distribution it was sampled from
    (after temperature; before top-k/top-p truncation), and the `top` most likely (id, logprob) pairs,
    most likely first, when the request asked for them."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """One request's new tokens in one engine step; text is the exact new text (stop strings cut)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish: Finish | None = None
    summary: RequestSummary | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token_ids entry when the request asked; else ()

    def __post_init__(self) -> None:
        if (self.finish is None) != (self.summary is None):
            raise ValueError(f"TokenDelta({self.request_id!r}): finish and summary come together")
        if self.logprobs and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"TokenDelta({self.request_id!r}): {len(self.logprobs)} logprobs for "
                             f"{len(self.token_ids)} tokens")


@dataclass(frozen=True)
class StepBatch:
    """Everything one worker (instance/dp rank) emitted in one engine step."""

    worker: str  # "instance/rank", e.g. "decode-0/r0"
    step: int
    deltas: tuple[TokenDelta, ...]


@dataclass(frozen=True)
class PrefillResult:
    """A prefill worker's answer: the first token, and the handoff unless the request ended there."""

    request_id: str
    first: TokenDelta
    handoff: bytes | None  # serialized tandem.v1.HandoffDescriptor; None iff first.finish is set
    queue_s: float
    prefill_s: float
    cached_tokens: int

    def __post_init__(self) -> None:
        if (self.handoff is None) != (self.first.finish is not None):
            raise ValueError(f"PrefillResult({self.request_id!r}): a handoff iff the request goes on")
