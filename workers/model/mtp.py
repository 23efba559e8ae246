"""Multi-token prediction (MTP) layer: predicts token t+2 from the main model's streams at t
and the embedding of token t+1. A sliding-window, learned-gate block with its own head mixing:

x = e_proj(enorm(embed(next_token)))  (broadcast over streams) + h_proj(hnorm(streams))
x = Block(x);  logits = head(norm(hc_head(x)))   (embed and head are the main model's)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from workers.model.block import Block, Segment
from workers.model.cache import ModelCache
from workers.model.config import LayerKind, ModelConfig
from workers.model.layers import Linear, RMSNorm, wide
from workers.model.mhc import HyperHead


class MTPBlock(Block):
    """Checkpoint prefix `mtp.{i}.`: a Block plus e_proj, h_proj, enorm, hnorm, norm, hc_head."""

    def __init__(self, cfg: ModelConfig, sim: bool, local_experts: Iterable[int] | None = None) -> None:
        super().__init__(cfg, LayerKind.SWA, hashed=False, sim=sim, local_experts=local_experts)
        d = cfg.hidden_size
        self.e_proj = Linear(d, d, quantised_input=True, sim=sim)
        self.h_proj = Linear(d, d, quantised_input=True, sim=sim)
        self.enorm = RMSNorm(d, cfg.norm_eps)
        self.hnorm = RMSNorm(d, cfg.norm_eps)
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.hc_head = HyperHead(cfg.hc_mult, d, cfg.hc_eps, cfg.norm_eps)

    def predict(
        self,
        streams: torch.Tensor,
        next_emb: torch.Tensor,
        next_ids: torch.Tensor,
        segments: Sequence[Segment],
        layer: int,
        cache: ModelCache,
        head: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, vocab] float32, MTP streams [N, n, d]) from main streams [N, n, d] and the
        embeddings [N, d] of the next tokens (ids [N])."""
        x = self.forward_streams(streams, next_emb, next_ids, segments, layer, cache)
        return self.logits(x, head), x

    def forward_streams(
        self,
        streams: torch.Tensor,
        next_emb: torch.Tensor,
        next_ids: torch.Tensor,
        segments: Sequence[Segment],
        layer: int,
        cache: ModelCache,
    ) -> torch.Tensor:
        """The MTP streams [N, n, d] alone (writing the layer's window like `predict`), for callers
        that need the logits of only some rows (`logits`)."""
        e = self.e_proj(self.enorm(next_emb)).unsqueeze(1)
        x = e + self.h_proj(self.hnorm(streams))
        return super().forward(x, next_ids, segments, layer, cache)

    def logits(self, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] float32 of MTP streams x [N, n, d] (head: the main model's)."""
        return F.linear(wide(self.norm(self.hc_head(x))), wide(head))
