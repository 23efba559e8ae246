"""Step times of one worker instance: per operation the larger of FLOP time and byte time.

An instance is `gpus` GPUs running attention with tensor parallelism `tp` (data parallel across
gpus / tp groups) and the MoE with expert parallelism `ep` (experts additionally split gpus / ep
ways). Per layer it pays:
- attention projections: FP8 weights (each TP rank holds 1 / tp), 2 FLOPs per weight per token;
- attention core: attended keys x heads x (qk + v) x 2 FLOPs at the BF16 rate, indexer scores at
  the FP8 rate, and the KV bytes read (one KV head: every TP rank reads its group's whole KV);
- routed experts: the expected distinct experts T tokens touch, E (1 - (1 - k/E)^T), are read once;
  FLOPs at the FP4 rate when the experts are FP4 (Hopper: FP8 rate), else FP8;
- shared expert and dense MLPs: FP8, sharded like attention;
- collectives: two TP all-reduces (ring) and an EP dispatch + combine, each latency + bytes / link;
- a latency floor (hardware.LAYER_LATENCY_FLOOR_S).
Once per step the LM head (BF16, vocab-parallel) for the sampled tokens. Every rate is the peak
times the generation's efficiency from `hardware`.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.planner.hardware import (
    LAYER_LATENCY_FLOOR_S,
    LINK_LATENCY_S,
    MEMORY_UTILISATION,
    Gpu,
    efficiencies,
    link_bytes_per_s,
    link_for_group,
)
from orchestrator.planner.models import BF16_BYTES, WEIGHT_BYTES, ModelArch, Precision
from orchestrator.planner.work import Work, decode_work, prefill_work

CHUNK_MEMO_LIMIT = 1 << 18  # memoised prefill chunk prices kept per cost model (then start over)


@dataclass(frozen=True)
class Parallelism:
    """GPUs per instance and how they split attention (tp) and experts (ep)."""

    gpus: int
    tp: int
    ep: int

    def __post_init__(self) -> None:
        for name in ("gpus", "tp", "ep"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"Parallelism.{name} = {value}: must be >= 1")
        for name in ("tp", "ep"):
            value = getattr(self, name)
            if self.gpus % value:
                raise ValueError(f"Parallelism.{name} = {value}: must divide gpus = {self.gpus}")

    @property
    def dp(self) -> int:
        return self.gpus // self.tp


@dataclass(frozen=True)
class CostModel:
    """Prices `Work` on one instance of `par` GPUs of kind `gpu` serving `arch`."""

    gpu: Gpu
    arch: ModelArch
    par: Parallelism
    precision: Precision

    def __post_init__(self) -> None:
        eff = efficiencies(self.gpu.kind)
        fp4 = self.precision is Precision.FP4
        object.__setattr__(self, "_bf16", self.gpu.bf16_flops * eff.compute)
        object.__setattr__(self, "_fp8", self.gpu.fp8_flops * eff.compute)
        object.__setattr__(self, "_routed", (self.gpu.fp4_flops if fp4 else self.gpu.fp8_flops) * eff.compute)
        object.__setattr__(self, "_bw", self.gpu.hbm_bytes_per_s * eff.bandwidth)
        object.__setattr__(self, "_memo", {})
        object.__setattr__(self, "_chunks", {})
        # per-token prices of the attention core; the same expressions `step_seconds` always used
        a, p = self.arch, self.par
        object.__setattr__(self, "_attn_rate", a.heads * (a.qk_dim + a.v_dim) * 2 / self._bf16 / p.gpus)
        object.__setattr__(self, "_index_rate", a.index_heads * a.index_dim * 2 / self._fp8 / p.gpus)
        object.__setattr__(self, "_kv_rate", 1.0 / (p.dp * self._bw))
        object.__setattr__(self, "_decode_geo", tuple(
            (g.layers, g.window, g.ratio, g.topk, g.indexer, g.entry_bytes, g.index_key_bytes)
            for g in a.attention))

    # ---- the pricing ---------------------------------------------------------------------------
    def step_seconds(self, work: Work) -> float:
        """Time of one forward step of `work` (see module docstring)."""
        total = self._fixed_seconds(work.tokens, work.sampled)
        attn_rate, index_rate, kv_rate = self._attn_rate, self._index_rate, self._kv_rate
        for geo, aw in zip(self.arch.attention, work.attn, strict=True):
            total += geo.layers * max(attn_rate * aw.attended + index_rate * aw.scored, aw.kv_read * kv_rate)
        return total

    def _fixed_seconds(self, tokens: int, sampled: int) -> float:
        """Everything but the attention core: it depends only on the token counts (memoised, since
        the simulator prices the same batch sizes over and over)."""
        key = (tokens, sampled)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        a, p, bw = self.arch, self.par, self._bw
        t = float(tokens)
        fp8_b = WEIGHT_BYTES[Precision.FP8]
        total = 0.0
        for geo in a.attention:
            total += geo.layers * max(2 * geo.params * t / p.gpus / self._fp8, geo.params * fp8_b / p.tp / bw)
        m = a.moe
        touched = m.experts * (1.0 - (1.0 - m.topk / m.experts) ** t)
        routed = max(2 * t * m.topk * m.expert_params / p.gpus / self._routed,
                     touched * m.expert_params * WEIGHT_BYTES[self.precision] / p.gpus / bw)
        shared = max(2 * t * m.shared_params / p.gpus / self._fp8, m.shared_params * fp8_b / p.tp / bw)
        total += m.moe_layers * (routed + shared)
        if m.dense_layers:
            total += m.dense_layers * max(2 * t * m.dense_params / p.gpus / self._fp8,
                                          m.dense_params * fp8_b / p.tp / bw)
        total += a.layers * (self.collective_seconds(tokens) + LAYER_LATENCY_FLOOR_S)
        head = a.hidden * a.vocab
        total += max(2 * sampled * head / p.gpus / self._bf16, head * BF16_BYTES / p.gpus / bw)
        self._memo[key] = total
        return total

    def collective_seconds(self, tokens: float) -> float:
        """Per layer: two TP all-reduces of the hidden state and one EP dispatch + combine."""
        a, p, g = self.arch, self.par, self.gpu
        out = 0.0
        if p.tp > 1:
            link = link_for_group(g, p.tp)
            nbytes = tokens / p.dp * a.hidden * BF16_BYTES * 2 * (p.tp - 1) / p.tp
            out += 2 * (LINK_LATENCY_S[link] + nbytes / link_bytes_per_s(g, link))
        if p.ep > 1:
            link = link_for_group(g, p.ep)
            # dispatch in FP8 (1 B), combine in BF16 (2 B), of the tokens' top-k copies leaving the rank
            nbytes = tokens / p.gpus * a.moe.topk * a.hidden * 3 * (p.ep - 1) / p.ep
            out += 2 * LINK_LATENCY_S[link] + nbytes / link_bytes_per_s(g, link)
        return out

    # ---- the shapes the simulator and the estimator use ----------------------------------------
    def prefill_chunk_seconds(self, segments: tuple[tuple[int, int], ...], sampled: int) -> float:
        """One chunked-prefill step over token ranges (start, end) of different requests (memoised:
        replays of one load at different rates price the same chunks again)."""
        key = (segments, sampled)
        hit = self._chunks.get(key)
        if hit is None:
            if len(self._chunks) >= CHUNK_MEMO_LIMIT:
                self._chunks.clear()
            hit = self._chunks[key] = self.step_seconds(prefill_work(self.arch, segments, sampled))
        return hit

    def prefill_seconds(self, prompt_tokens: int, cached_tokens: int, chunk_tokens: int) -> float:
        """One request prefilled alone: its uncached tokens in chunks of `chunk_tokens`, in order.

        At least the last prompt token is computed (it yields the first token's logits)."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens = {chunk_tokens}: must be >= 1")
        start = min(cached_tokens, prompt_tokens - 1)
        total = 0.0
        while start < prompt_tokens:
            end = min(start + chunk_tokens, prompt_tokens)
            total += self.prefill_chunk_seconds(((start, end),), 1 if end == prompt_tokens else 0)
            start = end
        return total

    def decode_step_seconds(self, batch: int, context_tokens: float) -> float:
        """One decode step of `batch` requests whose contexts sum to `context_tokens`:
        `step_seconds(decode_work(arch, batch, context_tokens))`, inlined with the same floating-point
        operations in the same order (the simulator prices a decode batch at every membership change)."""
        if batch < 1 or context_tokens < batch:
            raise ValueError(f"decode batch={batch}, context_tokens={context_tokens}: need batch >= 1 and "
                             "context_tokens >= batch")
        total = self._fixed_seconds(batch, batch)
        attn_rate, index_rate, kv_rate = self._attn_rate, self._index_rate, self._kv_rate
        mean = context_tokens / batch
        for layers, window, ratio, topk, indexer, entry_bytes, key_bytes in self._decode_geo:
            win = min(mean, window) * batch
            visible = context_tokens / ratio if ratio else 0.0
            selected = min(topk * batch, visible) if topk else visible
            attended = win + selected
            kv_read = attended * entry_bytes + visible * key_bytes
            total += layers * max(attn_rate * attended + index_rate * (visible if indexer else 0.0),
                                  kv_read * kv_rate)
        return total

    def kv_pool_bytes(self) -> float:
        """HBM left for KV on the whole instance after the weights (MEMORY_UTILISATION of HBM)."""
        weights = self.arch.weight_bytes(self.precision)
        free = self.par.gpus * self.gpu.hbm_bytes * MEMORY_UTILISATION - weights
        if free <= 0:
            raise ValueError(
                f"{self.arch.name.value} weights ({weights / 1e9:.0f} GB) do not "
                f"fit {self.par.gpus} x {self.gpu.kind.value} ({self.gpu.hbm_bytes / 1e9:.0f} GB each)")
        return free


def decode_token_flops(arch: ModelArch, context_tokens: int) -> float:
    """FLOPs of generating one token at `context_tokens` context: 2 per active weight (the LM head
    included, the embedding lookup not), plus attention over the attended keys and indexer scores."""
    work = decode_work(arch, 1, context_tokens)
    attn = sum(geo.layers * (arch.heads * (arch.qk_dim + arch.v_dim) * 2 * w.attended
                             + arch.index_heads * arch.index_dim * 2 * w.scored)
               for geo, w in zip(arch.attention, work.attn, strict=True))
    return 2.0 * arch.active_params() + attn
