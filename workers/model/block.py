"""One transformer block: mHC around attention and around the MoE."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.model.attention import Attention
from workers.model.cache import ModelCache
from workers.model.config import LayerKind, ModelConfig
from workers.model.layers import RMSNorm
from workers.model.mhc import HyperConnection
from workers.model.moe import MoE


@dataclass(frozen=True)
class Segment:
    """The rows [start, start + length) of a step's flat token batch belong to sequence `seq`,
    whose first token in this step sits at absolute position `pos0`."""

    seq: int
    pos0: int
    start: int
    length: int


class Block(nn.Module):
    """Layer `layer`: streams -> mHC collapse -> attn_norm -> attention -> mHC expand, same for the MoE."""

    def __init__(
        self,
        cfg: ModelConfig,
        kind: LayerKind,
        hashed: bool,
        sim: bool,
        local_experts: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self.attn = Attention(cfg, kind, sim)
        self.ffn = MoE(cfg, hashed, sim, local_experts)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        args = (cfg.hc_mult, cfg.hidden_size, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
        self.hc_attn = HyperConnection(*args)
        self.hc_ffn = HyperConnection(*args)

    def forward(
        self,
        h: torch.Tensor,
        token_ids: torch.Tensor,
        segments: Sequence[Segment],
        layer: int,
        cache: ModelCache,
    ) -> torch.Tensor:
        """Streams h [N, n, d] of a step's tokens (ids [N]) -> new streams [N, n, d]."""
        x, post, comb = self.hc_attn.collapse(h)
        x = self.attn_norm(x)
        out = torch.cat(
            [self.attn(x[s.start : s.start + s.length], layer, s.seq, s.pos0, cache) for s in segments], dim=0
        )
        h = HyperConnection.expand(out, h, post, comb)
        x, post, comb = self.hc_ffn.collapse(h)
        out = self.ffn(self.ffn_norm(x), token_ids)
        return HyperConnection.expand(out, h, post, comb)
