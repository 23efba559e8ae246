"""The DeepSeek-V4 model: embedding -> mHC streams -> blocks -> head; prefill / decode / logits.

One set of weights, two forward modes through the `ModelCache` interface:
- `prefill(seq, tokens, cache)`: many tokens of one sequence (a whole prompt or a chunk of it),
  writing its state;
- `decode(seqs, tokens, cache)`: one token for each of a batch of sequences, reading and
  extending their state.
Both run `step`, which takes any mix of (sequence, tokens) chunks. `logits(tokens)` is a full
causal forward of one sequence with a private throw-away cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.block import Block, Segment
from workers.model.cache import ContiguousCache, ModelCache
from workers.model.config import ModelConfig
from workers.model.layers import RMSNorm, wide
from workers.model.mhc import HyperHead
from workers.model.mtp import MTPBlock


@dataclass(frozen=True)
class StepOutput:
    """A step's results: final-layer streams [N, n, d] (what MTP consumes), the segments, and
    logits [N, vocab] (float32) of every row, or of each segment's last row when `last_only`."""

    streams: torch.Tensor
    segments: tuple[Segment, ...]
    logits: torch.Tensor


class DeepseekV4(nn.Module):
    """DeepSeek-V4 (Flash / Pro / tiny). `quant_sim` turns the FP8 / FP4 / Hadamard simulation of
    activations and KV on; `local_experts` limits the routed experts this instance holds."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        quant_sim: bool = True,
        local_experts: Iterable[int] | None = None,
        with_mtp: bool = True,
    ) -> None:
        super().__init__()
        self.cfg, self.quant_sim = cfg, quant_sim
        experts = None if local_experts is None else tuple(local_experts)
        d = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(
            [
                Block(cfg, kind, cfg.is_hash_layer(i), quant_sim, experts)
                for i, kind in enumerate(cfg.layer_kinds)
            ]
        )
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.hc_head = HyperHead(cfg.hc_mult, d, cfg.hc_eps, cfg.norm_eps)
        n_mtp = cfg.num_mtp_layers if with_mtp else 0
        self.mtp = nn.ModuleList([MTPBlock(cfg, quant_sim, experts) for _ in range(n_mtp)])
        self.requires_grad_(False)  # inference only: no autograd state on any weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self) -> ContiguousCache:
        """A fresh contiguous cache sized for this model's window."""
        return ContiguousCache(self.cfg.window)

    def _segments(self, chunks: Sequence[tuple[int, torch.Tensor]], cache: ModelCache) -> tuple[Segment, ...]:
        seen: set[int] = set()
        segs, start = [], 0
        for seq, toks in chunks:
            if seq in seen:
                raise ValueError(f"sequence {seq} appears twice in one step")
            if toks.dim() != 1 or toks.numel() == 0:
                raise ValueError(
                    f"sequence {seq}: tokens must be a non-empty 1-D tensor, got shape {tuple(toks.shape)}"
                )
            seen.add(seq)
            segs.append(Segment(seq, cache.length(seq), start, toks.numel()))
            start += toks.numel()
        return tuple(segs)

    def head_logits(self, streams: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] float32 of final streams [N, n, d]."""
        return F.linear(wide(self.norm(self.hc_head(streams))), wide(self.head.weight))

    @torch.no_grad()
    def step(
        self, chunks: Sequence[tuple[int, torch.Tensor]], cache: ModelCache, *, last_only: bool = False
    ) -> StepOutput:
        """Run every layer over `chunks` [(seq id, 1-D token ids)], writing their state, then
        advance each sequence's length in `cache`."""
        segs = self._segments(chunks, cache)
        ids = torch.cat([t for _, t in chunks]).to(self.embed.weight.device)
        bad = ids[(ids < 0) | (ids >= self.cfg.vocab_size)]
        if bad.numel():
            raise ValueError(
                f"token ids {bad[:5].tolist()} outside the vocabulary 0..{self.cfg.vocab_size - 1}"
            )
        h = self.embed(ids).unsqueeze(1).repeat(1, self.cfg.hc_mult, 1)
        for i, layer in enumerate(self.layers):
            h = layer(h, ids, segs, i, cache)
        for s in segs:
            cache.advance(s.seq, s.length)
        rows = h[[s.start + s.length - 1 for s in segs]] if last_only else h
        return StepOutput(h, segs, self.head_logits(rows))

    def prefill(
        self, seq: int, token_ids: torch.Tensor, cache: ModelCache, *, last_only: bool = False
    ) -> torch.Tensor:
        """Logits [T, vocab] (or [1, vocab] if last_only) for a prompt chunk of sequence `seq`."""
        return self.step([(seq, token_ids)], cache, last_only=last_only).logits

    def decode(self, seqs: Sequence[int], token_ids: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """Logits [B, vocab] for one new token per sequence (token_ids [B])."""
        if token_ids.shape != (len(seqs),):
            raise ValueError(f"decode: token_ids shape {tuple(token_ids.shape)} != ({len(seqs)},)")
        return self.step([(s, token_ids[i : i + 1]) for i, s in enumerate(seqs)], cache).logits

    @torch.no_grad()
    def mtp_logits(
        self, out: StepOutput, next_ids: torch.Tensor, cache: ModelCache, depth: int = 0
    ) -> torch.Tensor:
        """MTP logits [N, vocab] for the rows of a finished step `out`: row r (token at position p)
        with next_ids[r] (the token at p + 1) predicts the token at p + 2. Uses MTP layer `depth`,
        stored in the cache as layer num_layers + depth; run it on every step of a sequence."""
        if depth >= len(self.mtp):
            raise ValueError(f"MTP depth {depth}: this model has {len(self.mtp)} MTP layers")
        if next_ids.shape != (out.streams.shape[0],):
            raise ValueError(f"next_ids shape {tuple(next_ids.shape)} != ({out.streams.shape[0]},)")
        with torch.no_grad():
            logits, _ = self.mtp[depth].predict(
                out.streams,
                self.embed(next_ids),
                next_ids,
                out.segments,
                self.cfg.num_layers + depth,
                cache,
                self.head.weight,
            )
        return logits

    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward of one sequence: token_ids [T] -> logits [T, vocab] (float32)."""
        if token_ids.dim() != 1:
            raise ValueError(f"logits: token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        return self.prefill(0, token_ids, self.new_cache())

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy generation (prefill then decode) of up to `max_new_tokens` tokens, stopping at EOS."""
        cache = self.new_cache()
        nxt = int(self.prefill(0, prompt, cache, last_only=True)[-1].argmax())
        out = [nxt]
        while len(out) < max_new_tokens and nxt != self.cfg.eos_token_id:
            nxt = int(self.decode([0], torch.tensor([nxt]), cache)[0].argmax())
            out.append(nxt)
        return out
