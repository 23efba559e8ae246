"""The model shapes the cost model needs: DeepSeek-V4 Flash and Pro, and DeepSeek-V3.2 for comparison.

Sources: the public config.json files as summarised in ../shared/docs/dsv4-model.md (V4) and
DeepSeek-V3.2-Exp's config (hidden 7168, 61 layers of which 3 dense with intermediate 18432,
256 routed experts top-8 of intermediate 2048 + 1 shared, MLA with q_lora 1536, kv_lora 512,
rope 64, 128 heads of nope 128 / v 128, lightning indexer 64 heads x 128 dims, top-2048).
Parameter counts are computed here from those dimensions (not copied), so the tests can compare
them with the published totals (13B / 49B / 37B active).

Attention cost is described per layer kind by `AttentionGeometry`: which keys a query attends to
(sliding window, compressed entries, top-k selection), which entries its indexer scores, and the
bytes each kind stores per entry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType


class ModelName(enum.Enum):
    """The models the planner knows; the value is the CLI name."""

    V4_FLASH = "v4-flash"
    V4_PRO = "v4-pro"
    V3_2 = "v3.2"


class AttnKind(enum.Enum):
    SWA = "swa"  # V4 sliding window only (compress ratio 0)
    CSA = "csa"  # V4 compressed sparse attention (ratio 4, indexer, top-k)
    HCA = "hca"  # V4 heavily compressed attention (ratio 128, every entry attended)
    DSA = "dsa"  # V3.2 MLA with the lightning indexer (every token an entry, top-k)


class Precision(enum.Enum):
    """Storage precision of the routed experts (everything else is FP8 in every preset)."""

    FP8 = "fp8"
    FP4 = "fp4"


# Bytes per parameter including block scales: FP8 e4m3 + one fp32 scale per 128x128 block;
# FP4 e2m1 + one UE8M0 byte per 32 values.
WEIGHT_BYTES = MappingProxyType({Precision.FP8: 1.0 + 4 / (128 * 128), Precision.FP4: 0.5 + 1 / 32})
BF16_BYTES = 2


@dataclass(frozen=True)
class AttentionGeometry:
    """One attention layer kind.

    A query at position p (context n = p + 1 tokens) attends to min(window, n) raw window tokens
    plus `selected(n)` compressed entries, where n // ratio entries are visible (ratio 0 = none)
    and selected = min(topk, visible) (topk 0 = all visible). The indexer, when present, scores
    every visible entry. Each window token and each entry is stored in `entry_bytes`; each entry
    has an indexer key of `index_key_bytes`. `state_bytes(n)` is the compressor's unfinished state.
    """

    kind: AttnKind
    layers: int
    window: int
    ratio: int
    topk: int
    indexer: bool
    entry_bytes: int
    index_key_bytes: int
    params: int  # weights of one layer's attention block (projections, compressor, indexer)
    state_bytes_per_token: int  # fp32 (kv, score) bytes per raw token row held in the compressor state
    state_tokens_max: int  # most raw rows the state holds (CSA: 2 x ratio - 1 with overlap; HCA: none)
    # HCA: the unfinished block as running softmax accumulators (max, sum, weighted sum; fp32), held
    # whenever the block has begun, however many tokens it has
    state_pool_bytes: int = 0


@dataclass(frozen=True)
class MoeShape:
    experts: int
    topk: int
    expert_params: int  # one routed expert (SwiGLU: 3 x hidden x intermediate)
    shared_params: int  # the shared expert(s) of one layer
    moe_layers: int
    dense_layers: int = 0
    dense_params: int = 0  # one dense MLP layer (V3.2's first three)


@dataclass(frozen=True)
class ModelArch:
    """What the cost model needs of a model. `heads` x (`qk_dim`, `v_dim`) are the dims a query
    multiplies per attended key (MQA for V4; MLA in its absorbed form for V3.2)."""

    name: ModelName
    hidden: int
    vocab: int
    attention: tuple[AttentionGeometry, ...]
    heads: int
    qk_dim: int
    v_dim: int
    index_heads: int
    index_dim: int
    moe: MoeShape
    routed_precision: Precision  # as released

    @property
    def layers(self) -> int:
        return sum(a.layers for a in self.attention)

    @property
    def attention_params(self) -> int:
        return sum(a.layers * a.params for a in self.attention)

    def routed_params(self) -> int:
        return self.moe.moe_layers * self.moe.experts * self.moe.expert_params

    def active_params(self) -> int:
        """Parameters one token touches: attention, top-k + shared experts, dense MLPs, the head."""
        m = self.moe
        ffn = m.moe_layers * (m.topk * m.expert_params + m.shared_params) + m.dense_layers * m.dense_params
        return self.attention_params + ffn + self.hidden * self.vocab

    def total_params(self) -> int:
        m = self.moe
        ffn = self.routed_params() + m.moe_layers * m.shared_params + m.dense_layers * m.dense_params
        return self.attention_params + ffn + 2 * self.hidden * self.vocab

    def weight_bytes(self, precision: Precision) -> float:
        """Bytes of every weight: routed experts at `precision`, the rest FP8, embedding and head BF16."""
        other = self.total_params() - self.routed_params() - 2 * self.hidden * self.vocab
        return (self.routed_params() * WEIGHT_BYTES[precision] + other * WEIGHT_BYTES[Precision.FP8]
                + 2 * self.hidden * self.vocab * BF16_BYTES)


V4_ENTRY_BYTES = 584  # 448 fp8 + 64 bf16 rope + 7 UE8M0 scales + 1 pad (FlashMLA layout)
V4_INDEX_KEY_BYTES = 68  # 128 dims FP4 + scale: the indexer's keys are FP4-quantised in V4
V4_WINDOW = 128
V4_INDEX_HEADS, V4_INDEX_DIM = 64, 128


def _v4_attention_params(h: int, q_lora: int, heads: int, hd: int, o_groups: int, o_lora: int,
                         kind: AttnKind) -> int:
    base = h * q_lora + q_lora * heads * hd + h * hd + heads * hd * o_lora + o_groups * o_lora * h
    if kind is AttnKind.SWA:
        return base
    if kind is AttnKind.HCA:
        return base + 2 * h * hd  # compressor kv and gate, no overlap
    # CSA: overlapping compressor (2 x 512 outputs for kv and gate) plus the indexer
    indexer = q_lora * V4_INDEX_HEADS * V4_INDEX_DIM + h * V4_INDEX_HEADS + 2 * h * 2 * V4_INDEX_DIM
    return base + 2 * h * 2 * hd + indexer


def _v4(name: ModelName, h: int, q_lora: int, heads: int, o_groups: int, topk_idx: int, inter: int,
        experts: int, counts: dict[AttnKind, int]) -> ModelArch:
    hd = 512
    fp32_pair = 2 * 4  # kv and score, fp32
    state = {  # (bytes per raw row held, raw rows held at most, running accumulator bytes)
        AttnKind.SWA: (0, 0, 0),
        # main compressor 2 x 512 wide + indexer compressor 2 x 128 wide, at most the last 7 tokens
        AttnKind.CSA: (fp32_pair * (2 * hd + 2 * V4_INDEX_DIM), 7, 0),
        AttnKind.HCA: (0, 0, 3 * 4 * hd),  # max, sum, weighted sum: 512 fp32 each
    }
    ratio = {AttnKind.SWA: 0, AttnKind.CSA: 4, AttnKind.HCA: 128}
    attention = tuple(
        AttentionGeometry(
            kind=k, layers=n, window=V4_WINDOW, ratio=ratio[k], topk=topk_idx if k is AttnKind.CSA else 0,
            indexer=k is AttnKind.CSA, entry_bytes=V4_ENTRY_BYTES,
            index_key_bytes=V4_INDEX_KEY_BYTES if k is AttnKind.CSA else 0,
            params=_v4_attention_params(h, q_lora, heads, hd, o_groups, 1024, k),
            state_bytes_per_token=state[k][0], state_tokens_max=state[k][1], state_pool_bytes=state[k][2],
        )
        for k, n in counts.items() if n
    )
    moe = MoeShape(experts=experts, topk=6, expert_params=3 * h * inter, shared_params=3 * h * inter,
                   moe_layers=sum(counts.values()))
    return ModelArch(name=name, hidden=h, vocab=129280, attention=attention, heads=heads, qk_dim=hd,
                     v_dim=hd, index_heads=V4_INDEX_HEADS, index_dim=V4_INDEX_DIM, moe=moe,
                     routed_precision=Precision.FP4)


def _v32() -> ModelArch:
    h, q_lora, kv_lora, rope, heads, nope, v = 7168, 1536, 512, 64, 128, 128, 128
    idx_heads, idx_dim = 64, 128
    mla = h * q_lora + q_lora * heads * (nope + rope) + h * (kv_lora + rope) + kv_lora * heads * (nope + v)
    mla += heads * v * h
    indexer = q_lora * idx_heads * idx_dim + h * idx_dim + h * idx_heads
    dsa = AttentionGeometry(
        kind=AttnKind.DSA, layers=61, window=0, ratio=1, topk=2048, indexer=True,
        entry_bytes=656,  # 512 fp8 + 4 fp32 scales + 64 bf16 rope
        index_key_bytes=132,  # 128 fp8 + fp32 scale
        params=mla + indexer, state_bytes_per_token=0, state_tokens_max=0,
    )
    moe = MoeShape(experts=256, topk=8, expert_params=3 * h * 2048, shared_params=3 * h * 2048,
                   moe_layers=58, dense_layers=3, dense_params=3 * h * 18432)
    return ModelArch(name=ModelName.V3_2, hidden=h, vocab=129280, attention=(dsa,), heads=heads,
                     qk_dim=kv_lora + rope, v_dim=kv_lora, index_heads=idx_heads, index_dim=idx_dim,
                     moe=moe, routed_precision=Precision.FP8)


MODELS = MappingProxyType({
    # Flash: SWA at layers 0-1, CSA at even 2..42, HCA at odd 3..41.
    ModelName.V4_FLASH: _v4(ModelName.V4_FLASH, h=4096, q_lora=1024, heads=64, o_groups=8, topk_idx=512,
                            inter=2048, experts=256,
                            counts={AttnKind.SWA: 2, AttnKind.CSA: 21, AttnKind.HCA: 20}),
    # Pro: HCA at 0, 1 and odd 3..59, CSA at even 2..60.
    ModelName.V4_PRO: _v4(ModelName.V4_PRO, h=7168, q_lora=1536, heads=128, o_groups=16, topk_idx=1024,
                          inter=3072, experts=384, counts={AttnKind.CSA: 30, AttnKind.HCA: 31}),
    ModelName.V3_2: _v32(),
})


def model(name: ModelName) -> ModelArch:
    """The shape of one preset."""
    if not isinstance(name, ModelName):
        known = [m.value for m in ModelName]
        raise TypeError(f"model name must be a ModelName, got {name!r}; known: {known}")
    return MODELS[name]
