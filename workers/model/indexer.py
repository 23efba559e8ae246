"""Lightning indexer of CSA layers: picks, per query, the top-k compressed entries to attend.

Keys: an overlapping ratio-4 compressor of width index_head_dim (RoPE on its last rope dims),
then Hadamard + FP4 (simulated). Queries: q = wq_b(qr) -> [heads, index_head_dim], RoPE at the
query position, Hadamard + FP4. Weights: w = weights_proj(x) * index_head_dim^-0.5 * heads^-0.5.
score(t, s) = sum_h w[t, h] * ReLU(q[t, h] . K[s]); entries s >= (t + 1) // ratio are invisible;
keep the top min(index_topk, #entries) visible ones.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import ops
from workers.model.cache import CompressorState
from workers.model.compressor import Compressor
from workers.model.layers import Linear, wide
from workers.model.quant import index_sim
from workers.model.rope import Rope


class Indexer(nn.Module):
    """Indexer of one CSA layer (the checkpoint's `attn.indexer.*`)."""

    def __init__(
        self,
        dim: int,
        q_lora_rank: int,
        heads: int,
        head_dim: int,
        ratio: int,
        topk: int,
        eps: float,
        sim: bool,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.ratio, self.topk, self.sim = heads, head_dim, ratio, topk, sim
        self.wq_b = Linear(q_lora_rank, heads * head_dim, quantised_input=True, sim=sim)
        # BF16 in the checkpoint: no FP8 input.
        self.weights_proj = Linear(dim, heads, quantised_input=False, sim=sim)
        self.compressor = Compressor(dim, head_dim, ratio, overlap=True, eps=eps)

    def new_keys(
        self, x: torch.Tensor, state: CompressorState, rope: Rope
    ) -> tuple[torch.Tensor, CompressorState]:
        """Keys [n, head_dim] finished by tokens x [T, dim], and the new compressor state."""
        keys, state = self.compressor(x, state, rope)
        return index_sim(keys, self.sim), state

    def scores(
        self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, rope: Rope
    ) -> torch.Tensor:
        """Index scores [T, n] (float32; float64 in a float64 model) of queries at `positions`
        against all keys [n, head_dim]. Non-float64 models run the kernel op."""
        q = self.wq_b(qr).view(x.shape[0], self.heads, self.head_dim)
        q = index_sim(rope.apply(q, positions), self.sim)
        w = wide(self.weights_proj(x)) * (self.head_dim**-0.5 * self.heads**-0.5)
        if q.dtype != torch.float64:
            return ops.index_scores(q, w, keys)
        dots = torch.einsum("thd,nd->thn", wide(q), wide(keys)).relu()
        return (dots * w.unsqueeze(-1)).sum(dim=1)

    def select(
        self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, rope: Rope
    ) -> torch.Tensor:
        """Boolean mask [T, n]: the entries each query attends (top-k among its visible ones)."""
        n = keys.shape[0]
        limits = ((positions + 1) // self.ratio).clamp(max=n)
        visible = torch.arange(n, device=x.device)[None, :] < limits[:, None]
        chosen = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)
        if n == 0:
            return chosen
        s = self.scores(x, qr, positions, keys, rope)
        if s.dtype != torch.float64:
            return ops.topk_mask(s, limits, self.topk)
        s = s.masked_fill(~visible, float("-inf"))
        idx = s.topk(min(self.topk, n), dim=-1).indices
        chosen.scatter_(1, idx, True)
        return chosen & visible
