"""MTP speculative decoding: one engine step that drafts, verifies and keeps what the sampler agrees with.

Per step (`Speculator.step`, in place of the runner's forward and the sampling):
1. Draft. A decoding request whose `draft_hidden` (the MTP layer's output streams at its last
   computed position n - 1, left by the previous step or carried by its handoff) is current gets
   k' <= k draft tokens: d1 = argmax of the MTP head of those streams; for k' = 2 the MTP layer
   runs once more at position n on its own streams and the embedding of d1 (depth chaining with
   the one MTP layer V4 has), on a StagedCache whose writes are discarded. k' is cut so that the
   step never emits past max_tokens and the KV space can hold the positions (a staged verify
   commits at any length: StagedCache records the compressor state after each position).
2. Verify. ONE main-model forward over every chunk of the step; a drafting request feeds its last
   token and its drafts (k' + 1 positions) on a StagedCache that holds their writes back.
3. Accept. Row j of a drafting request is sampled at its position exactly as a plain decode step
   would (greedy: argmax; seeded: the counter-based draw at that position); the request keeps the
   picks up to and including the first that differs from its draft (all k' + 1 when every draft
   matches). So the output is the non-speculative output, token for token. The staged writes of
   the kept positions are committed; the rejected ones never reach the cache.
4. MTP. The MTP layer runs over every kept row of every chunk of the step (prompt chunks too), with
   the token after each row, so its window stays in step with the main layers, and the last row of
   a sampling chunk leaves the next step's `draft_hidden`.
The engine then streams the picks of each request in one delta, cutting at stop / EOS / length.

Expert parallelism (`lockstep`): every MoE call is a collective, so every rank makes the same
calls each step whatever it holds: the verify's main layers (on an empty batch when the rank has
no chunk), k - 1 chained MTP passes and one MTP pass (empty when it has nothing to draft or feed).

Handoffs: a prefill rank with speculation on runs step 4 too, so the prompt's MTP window is in its
cache and its `draft_hidden` is the first token's. Over NIXL both travel in the pages (the window
pages hold the MTP layer; the state page holds the hidden row, `DraftHiddenStore`); through the
object store in `SequenceKv` (`export` / `imported`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from workers.engine.handoff import SequenceKv, export_kv
from workers.engine.kv import KvSpace
from workers.engine.sampler import sample_batch, sample_one
from workers.engine.scheduler import Chunk, StepPlan
from workers.engine.staged_cache import StagedCache
from workers.engine.state import RequestState
from workers.model.block import Segment
from workers.model.cache import EntryKind, ModelCache
from workers.model.compressor import Compressor
from workers.model.model import DeepseekV4, StepOutput

MAX_MTP_TOKENS = 2


@dataclass(frozen=True)
class SpeculationConfig:
    """mtp_tokens: draft tokens per decode step (0: off). With it on, every request's MTP window is
    kept (prompt chunks included), which a prefill rank feeding a speculating decode needs too."""

    mtp_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.mtp_tokens <= MAX_MTP_TOKENS:
            raise ValueError(
                f"SpeculationConfig.mtp_tokens must be 0..{MAX_MTP_TOKENS}, got {self.mtp_tokens}"
            )

    @property
    def enabled(self) -> bool:
        return self.mtp_tokens > 0


@dataclass(frozen=True)
class Picked:
    """A sampling chunk's tokens in order (accepted drafts, then the sampler's own pick), their
    logits rows [len(tokens), vocab] float32, and the drafts proposed / accepted this step."""

    tokens: tuple[int, ...]
    logits: torch.Tensor
    drafted: int = 0
    accepted: int = 0


@runtime_checkable
class DraftHiddenStore(Protocol):
    """A cache that keeps a sequence's MTP hidden row in its pages (workers/kv PagedModelCache)."""

    @property
    def holds_draft_hidden(self) -> bool: ...
    def store_draft_hidden(self, seq: int, position: int, hidden: torch.Tensor) -> None: ...
    def draft_hidden(self, seq: int) -> tuple[int, torch.Tensor]: ...


def model_compressors(model: DeepseekV4) -> dict[tuple[int, EntryKind], Compressor]:
    """(layer, series) -> compressor module, for every compressed series of the main layers."""
    out: dict[tuple[int, EntryKind], Compressor] = {}
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        if attn.compressor is not None:
            out[(i, EntryKind.ATTN)] = attn.compressor
        if attn.indexer is not None:
            out[(i, EntryKind.INDEX)] = attn.indexer.compressor
    return out


class Speculator:
    """Runs engine steps with MTP drafting on `model` (which must have an MTP layer)."""

    def __init__(self, model: DeepseekV4, config: SpeculationConfig, lockstep: bool = False) -> None:
        if not config.enabled:
            raise ValueError("Speculator: SpeculationConfig.mtp_tokens is 0 (speculation off)")
        if len(model.mtp) == 0:
            raise ValueError("Speculator: the model has no MTP layer (checkpoint without mtp.* tensors)")
        self.model, self.config, self.lockstep = model, config, lockstep
        self.mtp = model.mtp[0]
        self.mtp_layer = model.cfg.num_layers  # the cache's layer index of MTP layer 0
        self.compressors = model_compressors(model)

    def step(self, plan: StepPlan, kv: KvSpace) -> list[Picked]:
        """Run `plan` (steps 1-4 of the module docstring); one Picked per sampling chunk, in order."""
        if not plan.chunks:
            if self.lockstep:
                self._idle()
            return []
        with torch.inference_mode():
            drafts = self._drafts(plan.chunks, kv)
            staged = StagedCache(kv.cache, self.model.cfg.window, self.compressors,
                                 [c.state.seq for c, d in zip(plan.chunks, drafts, strict=True) if d])
            dev = self.model.embed.weight.device
            batch = [(c.state.seq, torch.tensor(c.tokens + d, dtype=torch.long, device=dev))
                     for c, d in zip(plan.chunks, drafts, strict=True)]
            out = self.model.step(batch, staged, last_only=True)
            picks = self._accept(plan.chunks, drafts, out, staged)
            self._mtp_pass(plan.chunks, picks, out, kv.cache)
        return [p for p in picks if p is not None]

    # --- 1. draft ------------------------------------------------------------------------------
    def _budget(self, chunk: Chunk, kv: KvSpace) -> int:
        """Drafts `chunk`'s request may have this step (0 when it cannot speculate now)."""
        st = chunk.state
        if not chunk.samples or len(chunk.tokens) != 1 or st.draft_hidden is None:
            return 0
        if st.draft_at != chunk.start - 1:  # stale: computed before a preemption or elsewhere
            return 0
        k = min(self.config.mtp_tokens, st.max_len - len(st.tokens) - 1)
        while k > 0 and not kv.can_hold(st.seq, chunk.start + 1 + k):
            k -= 1
        if k > 0:
            kv.hold(st.seq, chunk.start + 1 + k)
        return k

    def _drafts(self, chunks: Sequence[Chunk], kv: KvSpace) -> list[tuple[int, ...]]:
        budgets = [self._budget(c, kv) for c in chunks]
        out: list[tuple[int, ...]] = [() for _ in chunks]
        live = [i for i, b in enumerate(budgets) if b > 0]
        if not live:
            self._idle_mtp(self.config.mtp_tokens - 1)
            return out
        hidden = torch.stack([_hidden(chunks[i]) for i in live])
        toks = self.mtp.logits(hidden, self.model.head.weight).argmax(dim=1)
        for i, t in zip(live, toks.tolist(), strict=True):
            out[i] = (t,)
        for depth in range(1, self.config.mtp_tokens):
            rows = [j for j, i in enumerate(live) if budgets[i] > depth]
            if not rows:
                self._idle_mtp(self.config.mtp_tokens - depth)
                break
            live = [live[j] for j in rows]
            hidden, toks = self._chain(chunks, live, hidden[rows], toks[rows], depth, kv.cache)
            for i, t in zip(live, toks.tolist(), strict=True):
                out[i] = out[i] + (t,)
        return out

    def _chain(self, chunks: Sequence[Chunk], idx: list[int], hidden: torch.Tensor, prev: torch.Tensor,
               depth: int, cache: ModelCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One more MTP pass for chunks `idx` at position start + depth - 1, on the MTP streams of the
        previous draft and its token; writes nothing to `cache`. Returns (streams, draft tokens)."""
        seqs = [chunks[i].state.seq for i in idx]
        scratch = StagedCache(cache, self.model.cfg.window, {}, seqs)
        segs = [Segment(chunks[i].state.seq, chunks[i].start + depth - 1, j, 1) for j, i in enumerate(idx)]
        x = self.mtp.forward_streams(hidden, self.model.embed(prev), prev, segs, self.mtp_layer, scratch)
        for s in seqs:
            scratch.discard(s)
        return x, self.mtp.logits(x, self.model.head.weight).argmax(dim=1)

    # --- expert parallelism: the MoE calls of a rank with nothing to run --------------------------
    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.model.embed.weight.device
        return (torch.zeros(0, self.model.cfg.hidden_size, dtype=self.model.dtype, device=dev),
                torch.zeros(0, dtype=torch.long, device=dev))

    def _idle_mtp(self, passes: int) -> None:
        """Under lockstep: the MTP layer's MoE on an empty batch, `passes` times."""
        if self.lockstep:
            x, ids = self._empty()
            for _ in range(passes):
                self.mtp.ffn(x, ids)

    def _idle(self) -> None:
        """Under lockstep, a rank without chunks: every MoE call a speculating step makes."""
        x, ids = self._empty()
        with torch.inference_mode():
            for block in self.model.layers:
                block.ffn(x, ids)
            self._idle_mtp(self.config.mtp_tokens)  # k - 1 chained passes, then the MTP pass

    # --- 3. accept -----------------------------------------------------------------------------
    def _accept(self, chunks: Sequence[Chunk], drafts: list[tuple[int, ...]], out: StepOutput,
                staged: StagedCache) -> list[Picked | None]:
        picks: list[Picked | None] = [None] * len(chunks)
        plain = [i for i, c in enumerate(chunks) if c.samples and not drafts[i]]
        if plain:
            logits = out.logits[plain]
            toks = sample_batch(logits, [chunks[i].state.request.sampling for i in plain],
                                [len(chunks[i].state.tokens) for i in plain])
            for j, (i, t) in enumerate(zip(plain, toks, strict=True)):
                picks[i] = Picked((t,), logits[j : j + 1])
        for i, c in enumerate(chunks):
            d = drafts[i]
            if not d:
                continue
            seg = out.segments[i]
            rows = self.model.head_logits(out.streams[seg.start : seg.start + seg.length])
            params, pos = c.state.request.sampling, len(c.state.tokens)
            kept: list[int] = []
            for j in range(len(d) + 1):
                kept.append(sample_one(rows[j], params, pos + j))
                if j == len(d) or kept[j] != d[j]:
                    break
            staged.commit(c.state.seq, len(kept))
            picks[i] = Picked(tuple(kept), rows[: len(kept)], len(d), len(kept) - 1)
        return picks

    # --- 4. MTP --------------------------------------------------------------------------------
    def _mtp_pass(self, chunks: Sequence[Chunk], picks: list[Picked | None], out: StepOutput,
                  cache: ModelCache) -> None:
        rows, nxt, segs = [], [], []
        start = 0
        for c, p, seg in zip(chunks, picks, out.segments, strict=True):
            fed = list(c.tokens) if p is None else list(c.tokens) + list(p.tokens[:-1])
            after = c.state.tokens[c.start + len(fed)] if p is None else p.tokens[-1]
            rows.append(out.streams[seg.start : seg.start + len(fed)])
            nxt += fed[1:] + [after]
            segs.append(Segment(c.state.seq, c.start, start, len(fed)))
            start += len(fed)
        ids = torch.tensor(nxt, dtype=torch.long, device=out.streams.device)
        x = self.mtp.forward_streams(torch.cat(rows), self.model.embed(ids), ids, segs, self.mtp_layer, cache)
        store = isinstance(cache, DraftHiddenStore) and cache.holds_draft_hidden
        for c, p, s in zip(chunks, picks, segs, strict=True):
            if p is not None:
                c.state.draft_hidden = x[s.start + s.length - 1].clone()
                c.state.draft_at = c.start + s.length - 1
                if store:
                    cache.store_draft_hidden(c.state.seq, c.state.draft_at, c.state.draft_hidden)

    # --- handoffs ------------------------------------------------------------------------------
    def export(self, cache: ModelCache, state: RequestState) -> SequenceKv:
        """A held handoff's state as tensors, with the MTP window and hidden row."""
        if state.draft_hidden is None or state.draft_at != cache.length(state.seq) - 1:
            raise ValueError(f"request {state.request_id!r}: no current MTP hidden state to hand off "
                             f"(at {state.draft_at}, length {cache.length(state.seq)})")
        return export_kv(cache, self.model.cfg, state.seq, mtp_layers=1, draft_hidden=state.draft_hidden)

    def seed_of(self, request_id: str, kv: SequenceKv) -> tuple[torch.Tensor, int]:
        """(draft_hidden, draft_at) a handed-off request starts with (its MTP window is imported
        with `kv`). Raises when the handoff has none (its prefill ran without speculation)."""
        if len(kv.mtp_windows) != 1 or kv.draft_hidden is None:
            raise ValueError(
                f"request {request_id!r}: the handoff carries {len(kv.mtp_windows)} MTP windows and "
                f"{'an' if kv.draft_hidden is not None else 'no'} MTP hidden state; a speculating decode "
                f"needs both (run the prefill pool with speculation too)"
            )
        return kv.draft_hidden.to(self.model.dtype), kv.length - 1

    def pulled(self, state: RequestState, cache: ModelCache) -> None:
        """Take a request's MTP hidden row from the state page its handoff filled (NIXL)."""
        if not (isinstance(cache, DraftHiddenStore) and cache.holds_draft_hidden):
            raise ValueError(f"request {state.request_id!r}: this cache keeps no MTP hidden row "
                             f"(a speculating rank needs KvShape.mtp_hidden)")
        position, flat = cache.draft_hidden(state.seq)
        if position != state.num_prompt - 1:
            raise ValueError(f"request {state.request_id!r}: the pulled MTP hidden row is for position "
                             f"{position}, expected {state.num_prompt - 1} (the prompt's last)")
        shape = (self.model.cfg.hc_mult, self.model.cfg.hidden_size)
        state.draft_hidden, state.draft_at = flat.view(shape).to(self.model.dtype), position


def _hidden(chunk: Chunk) -> torch.Tensor:
    hidden = chunk.state.draft_hidden
    if hidden is None:
        raise ValueError(f"request {chunk.state.request_id!r}: no MTP hidden state to draft from")
    return hidden
