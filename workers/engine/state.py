"""A request's mutable progress inside one engine: tokens so far vs tokens whose KV is computed."""

from __future__ import annotations

import enum
import time

import torch

from tandem.request import GenerationRequest
from tandem.tokenizer import Tokenizer
from workers.engine.stop import StopTracker


class Phase(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and to be recomputed)
    RUNNING = "running"  # admitted: holds KV, scheduled every step
    FINISHED = "finished"


class RequestState:
    """Progress of one request: `tokens` = prompt + generated; the first `computed` of them have
    their KV in the cache. The next step feeds tokens[computed:] (a prompt chunk, a recompute chunk,
    or the one last sampled token); a step that reaches len(tokens) samples the next token, at
    position len(tokens), with the counter-based sampler."""

    def __init__(self, request: GenerationRequest, seq: int, tokenizer: Tokenizer, order: int) -> None:
        self.request = request
        self.seq = seq
        self.order = order  # arrival order: older requests are scheduled first and preempted last
        self.tokens: list[int] = list(request.prompt_ids)
        self.num_prompt = len(request.prompt_ids)
        self.computed = 0
        self.phase = Phase.WAITING
        self.tracker = StopTracker(request.sampling, tokenizer)
        self.preemptions = 0
        self.cached_tokens = 0  # prompt tokens not computed here (handoff or prefix cache)
        self.transfer_s = 0.0  # KV handoff pulled here: claim sent to release sent
        self.kv_transfer_bytes = 0  # bytes of the pages that pull moved
        self.arrival = time.monotonic()
        self.started: float | None = None  # first scheduled
        self.first_token_at: float | None = None
        # Speculative decoding (workers/engine/speculate.py): the MTP layer's output streams at
        # position `draft_at` (the next drafts come from them while draft_at == computed - 1), and
        # the draft tokens proposed / accepted so far.
        self.draft_hidden: torch.Tensor | None = None
        self.draft_at = -1
        self.drafted = 0
        self.accepted = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def remaining(self) -> int:
        """Tokens not yet fed through the model."""
        return len(self.tokens) - self.computed

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def max_len(self) -> int:
        """Positions this request can reach: prompt + max_tokens."""
        return self.num_prompt + self.request.sampling.max_tokens
