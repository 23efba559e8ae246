"""One rank's engine: receive requests, schedule a step, run the model, sample, emit one batch.

`Engine.step()` is the whole loop body: schedule (scheduler.py) -> import handed-off KV for newly
admitted requests -> run the model over every chunk -> sample the chunks that reach their end ->
stop checks -> one `StepOutput` holding every request's new tokens. Finished and cancelled requests
free their KV at once. In the PREFILL role a request leaves after its first token: its KV stays
held as a handoff until `release_handoff` (the NIXL handoff table freed it) or `take_handoff` (the
object-store test mode). A DECODE engine takes a prefilled request with `begin_pull` / `end_pull`
(a NIXL pull fills its prompt's pages in between, outside the engine lock: workers/pull_intake.py),
`add_pulled` (the same in one call) or `add_prefilled` (tensors).
With a `Speculator` (workers/engine/speculate.py) the run and sampling are its step instead: a
decoding request may then get several tokens in one delta (accepted MTP drafts + one more).
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.request import GenerationRequest
from tandem.stream import Finish, RequestSummary, TokenDelta, TokenLogprob
from tandem.tokenizer import Tokenizer
from workers.engine.handoff import SequenceKv, export_kv, import_kv
from workers.engine.kv import KvSpace
from workers.engine.pulled import AdoptKv, FillKv, PendingPull, PulledKv, already_adopted
from workers.engine.runner import ModelRunner
from workers.engine.sampler import sample_batch, token_logprobs
from workers.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from workers.engine.speculate import Picked, Speculator
from workers.engine.state import Phase, RequestState
from workers.model.config import ModelConfig


class Role(enum.Enum):
    PREFILL = "prefill"  # prompt -> first token + handoff
    DECODE = "decode"  # takes handed-off requests; may also prefill locally
    AGGREGATED = "aggregated"  # prefill and decode in one engine


@dataclass(frozen=True)
class StepOutput:
    """Everything one step produced, sent out as ONE message. `handoffs`: requests (PREFILL role)
    whose first token is in `deltas` and whose prompt KV is now held for a decode to take."""

    step: int
    deltas: tuple[TokenDelta, ...]
    handoffs: tuple[str, ...]
    num_tokens: int  # tokens run through the model this step
    num_preempted: int


@dataclass(frozen=True)
class EngineStats:
    queued: int
    queued_prefill_tokens: int
    running: int  # in the batch, plus pulls in flight (admitted, their pages being filled)
    handoffs_held: int
    blocks_used: int
    blocks_free: int
    prefix_hit_rate: float
    prefill_tokens: int  # cumulative tokens of prompt / recompute chunks run
    decode_tokens: int  # cumulative tokens sampled
    preemptions: int
    steps: int
    drafted_tokens: int = 0  # cumulative MTP draft tokens proposed (speculation)
    accepted_tokens: int = 0  # ... and accepted


class Engine:
    """Scheduler + runner + sampler for one rank (see the module docstring)."""

    def __init__(self, role: Role, model_cfg: ModelConfig, sched: SchedulerConfig, kv: KvSpace,
                 runner: ModelRunner, tokenizer: Tokenizer, speculator: Speculator | None = None) -> None:
        self.role, self.model_cfg, self.kv = role, model_cfg, kv
        self.runner, self.tokenizer, self.speculator = runner, tokenizer, speculator
        self.scheduler = Scheduler(sched, kv)
        self._states: dict[str, RequestState] = {}
        self._handoffs: dict[str, RequestState] = {}
        self._incoming: dict[str, SequenceKv] = {}
        self._pulling: dict[str, tuple[RequestState, str]] = {}  # pulls in flight: state, first text
        self._pending: list[TokenDelta] = []  # deltas made outside a step (cancellations)
        self._seq_ids = itertools.count()
        self._order = itertools.count()
        self._steps = self._prefill_tokens = self._decode_tokens = self._preemptions = 0
        self._drafted = self._accepted = 0

    # --- intake --------------------------------------------------------------------------------
    def _new_state(self, request: GenerationRequest) -> RequestState:
        if any(request.request_id in d for d in (self._states, self._handoffs, self._pulling)):
            raise ValueError(f"request_id {request.request_id!r} is already in this engine")
        need = len(request.prompt_ids) + request.sampling.max_tokens
        if need > self.kv.max_seq_tokens:
            raise ValueError(f"request {request.request_id!r}: prompt + max_tokens = {need} positions, "
                             f"more than this engine's KV can ever hold ({self.kv.max_seq_tokens})")
        state = RequestState(request, next(self._seq_ids), self.tokenizer, next(self._order))
        self._states[request.request_id] = state
        return state

    def add(self, request: GenerationRequest) -> None:
        """Queue a request to be prefilled here."""
        self.scheduler.add(self._new_state(request))

    def add_prefilled(self, request: GenerationRequest, first_token: int, kv: SequenceKv | None) -> None:
        """Queue a request prefilled elsewhere, with its first token. With `kv` its prompt's state is
        imported on admission; without it (a failed transfer) the prompt is recomputed here. Its
        stream starts with the tokens AFTER the first; its text covers the first token too."""
        if self.role is Role.PREFILL:
            raise ValueError(f"add_prefilled({request.request_id!r}): a PREFILL engine does not decode")
        if kv is not None and kv.length != len(request.prompt_ids):
            raise ValueError(f"add_prefilled({request.request_id!r}): kv.length {kv.length} != "
                             f"prompt length {len(request.prompt_ids)}")
        spec = self.speculator
        seed = None if kv is None or spec is None else spec.seed_of(request.request_id, kv)
        state, text = self._prefilled_state(request, first_token)
        self._pending_text(state, text)
        if kv is not None:
            state.computed = state.cached_tokens = kv.length
            if seed is not None:
                state.draft_hidden, state.draft_at = seed
            self._incoming[request.request_id] = kv
        self.scheduler.add(state)

    def _prefilled_state(self, request: GenerationRequest, first_token: int) -> tuple[RequestState, str]:
        """A new state that already holds its first token, and that token's text (to send)."""
        state = self._new_state(request)
        piece = state.tracker.push(first_token)
        state.tokens.append(first_token)
        if piece.finish is not None:
            del self._states[request.request_id]
            raise ValueError(f"add_prefilled({request.request_id!r}): the first token already ended it")
        state.first_token_at = state.arrival
        return state, piece.text

    def begin_pull(self, request: GenerationRequest, first_token: int) -> PendingPull:
        """Phase 1 of a request whose prompt KV is pulled here (under the engine lock): its sequence is
        admitted through the prefix cache for prompt + max_tokens (AdmissionRefused, leaving nothing,
        when there is no room now). The caller fills the pages outside the lock, then ends the pull
        once (`end_pull` / `abandon_pull`); meanwhile the request is not scheduled nor sent."""
        if self.role is Role.PREFILL:
            raise ValueError(f"begin_pull({request.request_id!r}): a PREFILL engine does not decode")
        state, text = self._prefilled_state(request, first_token)
        try:
            self.kv.admit_prompt(state.seq, request.prompt_ids, state.max_len, request.cache_salt)
        except BaseException:
            del self._states[request.request_id]
            self.kv.free(state.seq)
            raise
        self._pulling[request.request_id] = (state, text)
        return PendingPull(request.request_id, state.seq, state.num_prompt)

    def end_pull(self, pending: PendingPull, got: PulledKv, adopt: AdoptKv) -> PulledKv:
        """Phase 3 (under the lock). Filled: `adopt(seq, prompt_len)` makes the pages its KV (pulled
        blocks' KV events go out now); it joins the batch after its first token. Not filled: pages
        freed, prompt recomputed here. Cancelled meanwhile: pages freed, nothing adopted, not filled."""
        state, text = self._end_pull(pending)
        if state.phase is Phase.FINISHED:  # cancelled while its pages were in flight
            self.kv.free(state.seq)
            return PulledKv(False, got.nbytes, got.seconds, error="cancelled during the pull")
        try:
            if got.filled:
                adopt(state.seq, state.num_prompt)
                if self.speculator is not None:
                    self.speculator.pulled(state, self.kv.cache)
        except BaseException:
            self._states.pop(state.request_id, None)
            self.kv.free(state.seq)
            raise
        if got.filled:
            state.computed = state.cached_tokens = state.num_prompt
            state.transfer_s, state.kv_transfer_bytes = got.seconds, got.nbytes
        else:
            self.kv.free(state.seq)
        self._pending_text(state, text)
        self.scheduler.add(state)
        return got

    def abandon_pull(self, pending: PendingPull) -> None:
        """End a pull whose fill raised (not a transfer failure): pages freed, request forgotten."""
        state, _ = self._end_pull(pending)
        self._states.pop(state.request_id, None)
        self.kv.free(state.seq)

    def _end_pull(self, pending: PendingPull) -> tuple[RequestState, str]:
        pull = self._pulling.get(pending.request_id)
        if pull is None or pull[0].seq != pending.seq:
            raise KeyError(f"no pull in flight for {pending.request_id!r} (sequence {pending.seq})")
        return self._pulling.pop(pending.request_id)

    def add_pulled(self, request: GenerationRequest, first_token: int, fill: FillKv) -> PulledKv:
        """The three phases in one call under the engine lock (steps wait for the whole fill):
        `fill(seq, prompt_len)` allocates, writes and adopts the prompt's pages (a NIXL pull) and
        says whether it did, as `end_pull` takes it. A fill that raises leaves nothing behind."""
        pending = self.begin_pull(request, first_token)
        try:
            got = fill(pending.seq, pending.length)
        except BaseException:
            self.abandon_pull(pending)
            raise
        return self.end_pull(pending, got, already_adopted)

    def add_resumed(self, request: GenerationRequest, generated: Sequence[int]) -> None:
        """Queue a request migrated from another worker that already streamed `generated` tokens:
        prompt + generated are recomputed here and generation continues after them. The tokens and
        their text are not sent again (the stop rules replay them to stay exact), and the
        counter-based sampler makes the continuation the one the first worker would have made."""
        if self.role is Role.PREFILL:
            raise ValueError(f"add_resumed({request.request_id!r}): a PREFILL engine does not decode")
        if not generated:
            raise ValueError(f"add_resumed({request.request_id!r}): no generated tokens; use add()")
        state = self._new_state(request)
        for tok in generated:
            if state.tracker.push(tok).finish is not None:
                del self._states[request.request_id]
                raise ValueError(f"add_resumed({request.request_id!r}): the {len(generated)} generated "
                                 f"tokens already end the request")
            state.tokens.append(tok)
        self.scheduler.add(state)

    def _pending_text(self, state: RequestState, text: str) -> None:
        if text:
            self._pending.append(TokenDelta(state.request_id, (), text))

    def cancel(self, request_id: str) -> bool:
        """End a request now, freeing its blocks at once (a pull's when its READ ends); False if absent."""
        state = self._states.pop(request_id, None) or self._handoffs.pop(request_id, None)
        if state is None:
            return False
        self._incoming.pop(request_id, None)
        pull = self._pulling.get(request_id)  # in flight: the pull's end frees its pages (a READ writes them)
        if pull is None and state.phase is Phase.FINISHED:  # a held handoff
            self.kv.free(state.seq)
        elif pull is None:
            self.scheduler.remove(state)
        state.phase = Phase.FINISHED
        text = (pull[1] if pull is not None else "") + state.tracker.cancel().text
        self._pending.append(self._final(state, (), text, Finish.CANCELLED))
        return True

    # --- handoffs (PREFILL role) ---------------------------------------------------------------
    def take_handoff(self, request_id: str) -> SequenceKv:
        """The held prompt state of a handed-off request; frees its blocks."""
        state = self._handoff(request_id)
        kv = (export_kv(self.kv.cache, self.model_cfg, state.seq) if self.speculator is None
              else self.speculator.export(self.kv.cache, state))
        self.kv.free(state.seq)
        return kv

    def release_handoff(self, request_id: str) -> None:
        """Free a handoff's blocks without exporting them (the decode pulled them, or gave up)."""
        self.kv.free(self._handoff(request_id).seq)

    def handoff_seq(self, request_id: str) -> int:
        """The KV sequence id of a held handoff (its pages are the handoff's)."""
        state = self._handoffs.get(request_id)
        if state is None:
            raise KeyError(f"no handoff held for request_id {request_id!r}")
        return state.seq

    def holds_handoff(self, request_id: str) -> bool:
        return request_id in self._handoffs

    def handoff_timing(self, request_id: str) -> tuple[float, float, int]:
        """(queue_s, prefill_s, cached_tokens) of a held handoff: arrival to first scheduled, then to
        first token; and the prompt tokens its prefix cache served instead of computing."""
        state = self._handoffs.get(request_id)
        if state is None or state.started is None or state.first_token_at is None:
            raise KeyError(f"no handoff held for request_id {request_id!r}")
        return state.started - state.arrival, state.first_token_at - state.started, state.cached_tokens

    def _handoff(self, request_id: str) -> RequestState:
        state = self._handoffs.pop(request_id, None)
        if state is None:
            raise KeyError(f"no handoff held for request_id {request_id!r}")
        return state

    def request_ids(self) -> tuple[str, ...]:
        """Every request this engine holds: queued, running, or held as a handoff."""
        return tuple(self._states) + tuple(self._handoffs)

    # --- the loop body -------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._pending)

    def step(self) -> StepOutput:
        """Run one engine step (see the module docstring). Without work it runs no model (an EP
        rank's runner still takes part in the exchanges when called with no chunks)."""
        plan = self.scheduler.schedule()
        now = time.monotonic()
        for state in plan.admitted:
            if state.started is None:
                state.started = now
            kv = self._incoming.pop(state.request_id, None)
            if kv is not None:
                import_kv(self.kv.cache, self.model_cfg, state.seq, kv)
        for state in plan.preempted:
            self._incoming.pop(state.request_id, None)  # recomputed from its tokens now
        if self.speculator is None:
            logits = self.runner.run([(c.state.seq, c.tokens) for c in plan.chunks], self.kv.cache)
            picks = self._sample(plan, logits)
        else:
            picks = self.speculator.step(plan, self.kv)
        deltas = self._postprocess(plan, picks)
        self._steps += 1
        self._preemptions += len(plan.preempted)
        pending, self._pending = self._pending, []
        handoffs = tuple(d.request_id for d in deltas if d.request_id in self._handoffs and d.finish is None)
        all_deltas = tuple(pending) + deltas
        return StepOutput(self._steps, all_deltas, handoffs, plan.num_tokens, len(plan.preempted))

    @staticmethod
    def _sample(plan: StepPlan, logits: torch.Tensor) -> list[Picked]:
        """One pick per chunk that reaches its end, from the runner's last-token logits."""
        rows = [i for i, c in enumerate(plan.chunks) if c.samples]
        states = [plan.chunks[i].state for i in rows]
        params = [s.request.sampling for s in states]
        tokens = sample_batch(logits[rows], params, [len(s.tokens) for s in states])
        return [Picked((tok,), logits[i : i + 1]) for i, tok in zip(rows, tokens, strict=True)]

    def _postprocess(self, plan: StepPlan, picks: Sequence[Picked]) -> tuple[TokenDelta, ...]:
        """Emit each sampling chunk's picks (several with speculation: the KV of all but the last
        is already in the cache), cutting at the first that ends the request."""
        for c in plan.chunks:
            c.state.computed += len(c.tokens)
            if not c.samples or len(c.tokens) > 1:
                self._prefill_tokens += len(c.tokens)
        states = [c.state for c in plan.chunks if c.samples]
        # A token keeps its logprob even when a stop string cuts its text or it is a stop token:
        # logprobs follow token_ids, one each.
        params = [s.request.sampling for s, p in zip(states, picks, strict=True) for _ in p.tokens]
        tokens = [tok for p in picks for tok in p.tokens]
        logprobs = iter(token_logprobs(torch.cat([p.logits for p in picks]), params, tokens)
                        if any(p.logprobs for p in params) else [()] * len(tokens))
        deltas = []
        now = time.monotonic()
        for state, pick in zip(states, picks, strict=True):
            state.computed += len(pick.tokens) - 1
            state.drafted, state.accepted = state.drafted + pick.drafted, state.accepted + pick.accepted
            self._drafted, self._accepted = self._drafted + pick.drafted, self._accepted + pick.accepted
            if state.first_token_at is None:
                state.first_token_at = now
            toks: list[int] = []
            lps: list[TokenLogprob] = []
            text, finish = "", None
            for tok in pick.tokens:
                toks.append(tok)
                lps += next(logprobs)
                state.tokens.append(tok)
                piece = state.tracker.push(tok)
                text += piece.text
                if piece.finish is not None:
                    finish = piece.finish
                    break
            for _ in pick.tokens[len(toks):]:
                next(logprobs)
            self._decode_tokens += len(toks)
            if finish is not None:
                self._states.pop(state.request_id)
                self.scheduler.remove(state)
                state.phase = Phase.FINISHED
                deltas.append(self._final(state, tuple(toks), text, finish, tuple(lps)))
            elif self.role is Role.PREFILL:
                self._states.pop(state.request_id)
                self.scheduler.detach(state)
                state.phase = Phase.FINISHED
                self._handoffs[state.request_id] = state
                deltas.append(TokenDelta(state.request_id, tuple(toks), text, logprobs=tuple(lps)))
            else:
                deltas.append(TokenDelta(state.request_id, tuple(toks), text, logprobs=tuple(lps)))
        return tuple(deltas)

    def _final(self, state: RequestState, toks: tuple[int, ...], text: str, reason: Finish,
               logprobs: tuple[TokenLogprob, ...] = ()) -> TokenDelta:
        start = state.started if state.started is not None else state.arrival
        first = state.first_token_at if state.first_token_at is not None else start
        summary = RequestSummary(
            prompt_tokens=state.num_prompt, completion_tokens=len(state.output_ids),
            cached_tokens=state.cached_tokens, queue_s=start - state.arrival,
            prefill_s=0.0 if state.cached_tokens >= state.num_prompt else max(0.0, first - start),
            transfer_s=state.transfer_s, kv_transfer_bytes=state.kv_transfer_bytes,
            drafted_tokens=state.drafted, accepted_tokens=state.accepted,
        )
        return TokenDelta(state.request_id, toks, text, reason, summary, logprobs)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        return EngineStats(
            queued=len(sched.waiting), queued_prefill_tokens=sum(s.remaining for s in sched.waiting),
            running=len(sched.running) + len(self._pulling), handoffs_held=len(self._handoffs),
            blocks_used=self.kv.blocks_used, blocks_free=self.kv.blocks_free,
            prefix_hit_rate=self.kv.prefix_hit_rate,
            prefill_tokens=self._prefill_tokens, decode_tokens=self._decode_tokens,
            preemptions=self._preemptions, steps=self._steps,
            drafted_tokens=self._drafted, accepted_tokens=self._accepted,
        )
