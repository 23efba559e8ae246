"""Continuous batching with chunked prefill under a per-step token budget, and preemption.

Every step (`schedule`):
1. Running requests, oldest first, each get their next chunk: one token when decoding, up to
   `prefill_chunk` tokens while their prompt (or a recompute) is unfinished, never more than the
   budget left. Before a request's chunk is granted its KV must be able to grow by the chunk; when
   it cannot, the NEWEST running request is preempted (its KV freed at once, its computed count reset
   to 0, and it goes back to the front of the queue to be recomputed from prompt + generated tokens);
   this repeats until the chunk fits or the request preempted itself.
2. Waiting requests, in arrival order, are admitted while a sequence slot, budget and KV for their
   first chunk remain. With `prefix_caching` a new (or preempted) request instead needs room for
   its whole max length (prompt + max_tokens) and is admitted through the prefix cache: it starts
   computing after the tokens the cache holds; its chunks stop at block ends, where a step must end
   for the block's boundary to be cached (a running request's full blocks of generated tokens are
   hashed too, `extend_tokens`: a follow-up turn repeating them resumes after them). Admission is
   FIFO: a head that does not fit blocks the rest, so long prompts are not starved by short ones.
   Nothing is admitted in a step that preempted (memory is short).
A chunk samples a token iff it reaches the end of the request's tokens. The same scheduler serves
the prefill role (the engine hands a request off after its first token) and the decode role (whose
requests usually arrive with their prompt's KV, so their first chunk is one token).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tandem.blocks import BLOCK_SIZE
from workers.engine.kv import KvSpace
from workers.engine.state import Phase, RequestState


@dataclass(frozen=True)
class SchedulerConfig:
    """max_num_seqs: running requests at most; max_batched_tokens: tokens per step (the budget);
    prefill_chunk: tokens of one request per step at most; prefix_caching: admit new requests
    through the KV space's prefix cache (`admit_prompt`), reserving their whole max length, and
    end chunks at multiples of block_size (the tandem.blocks block)."""

    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    prefill_chunk: int = 512
    prefix_caching: bool = False
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_batched_tokens", "prefill_chunk", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Chunk:
    """Feed tokens[start : start + len(tokens)] of `state`; `samples` when it reaches the end."""

    state: RequestState
    start: int
    tokens: tuple[int, ...]

    @property
    def samples(self) -> bool:
        return self.start + len(self.tokens) == len(self.state.tokens)


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[Chunk, ...]
    preempted: tuple[RequestState, ...]
    admitted: tuple[RequestState, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    """Queues and running set of one engine; see the module docstring for the rules."""

    def __init__(self, config: SchedulerConfig, kv: KvSpace) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []  # sorted by arrival order

    def add(self, state: RequestState) -> None:
        state.phase = Phase.WAITING
        self.waiting.append(state)

    def remove(self, state: RequestState) -> None:
        """Drop `state` from the queue or the running set and free its KV now."""
        if state in self.running:
            self.running.remove(state)
        elif state in self.waiting:
            self.waiting.remove(state)
        self.kv.free(state.seq)

    def detach(self, state: RequestState) -> None:
        """Drop a running `state` from scheduling but keep its KV (a prefill's handoff holds it)."""
        self.running.remove(state)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _chunk_len(self, state: RequestState, budget: int) -> int:
        """Tokens of `state` to feed this step. With prefix caching a chunk never runs past the next
        block end: a block's boundary state is cached only by a step that ends exactly there."""
        n = min(state.remaining, self.config.prefill_chunk, budget)
        if self.config.prefix_caching:
            b = self.config.block_size
            n = min(n, (state.computed // b + 1) * b - state.computed)
        return n

    def _preempt(self, victim: RequestState) -> None:
        self.running.remove(victim)
        self.kv.free(victim.seq)
        victim.computed = 0
        victim.preemptions += 1
        victim.phase = Phase.WAITING
        self.waiting.appendleft(victim)

    def schedule(self) -> StepPlan:
        budget = self.config.max_batched_tokens
        chunks: list[Chunk] = []
        preempted: list[RequestState] = []
        for state in list(self.running):
            if state not in self.running:  # preempted while making room for an older request
                continue
            n = self._chunk_len(state, budget)
            if n == 0:
                continue
            while not self.kv.can_hold(state.seq, state.computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is state:
                    break
            if state.phase is Phase.RUNNING:
                self.kv.hold(state.seq, state.computed + n)
                if self.config.prefix_caching:  # full blocks of generated tokens get hashes too
                    self.kv.extend_tokens(state.seq, state.tokens, state.request.cache_salt)
                chunks.append(_chunk(state, n))
                budget -= n
        admitted: list[RequestState] = []
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            state = self.waiting[0]
            if state.computed == 0 and self.config.prefix_caching:  # new or preempted: look up the prefix
                if not self.kv.can_hold(state.seq, state.max_len):
                    break
                hit = self.kv.admit_prompt(state.seq, state.tokens, state.max_len, state.request.cache_salt)
                state.computed = hit
                state.cached_tokens = max(state.cached_tokens, min(hit, state.num_prompt))
            n = self._chunk_len(state, budget)
            if not self.kv.can_hold(state.seq, state.computed + n):
                break
            self.waiting.popleft()
            self.kv.hold(state.seq, state.computed + n)
            state.phase = Phase.RUNNING
            self.running.append(state)
            admitted.append(state)
            chunks.append(_chunk(state, n))
            budget -= n
        self.running.sort(key=lambda s: s.order)
        return StepPlan(tuple(chunks), tuple(preempted), tuple(admitted))


def _chunk(state: RequestState, n: int) -> Chunk:
    return Chunk(state, state.computed, tuple(state.tokens[state.computed : state.computed + n]))
