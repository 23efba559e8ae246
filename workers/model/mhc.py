"""Manifold-constrained hyper-connections (mHC): `hc_mult` residual streams per token.

Legend: N tokens, n streams (hc_mult), d hidden.
Before a block, mixes = fn @ rms_unit(flatten(x)) [(2 + n) n] are split into
  pre  = sigmoid(mixes_pre * scale[0] + base_pre) + eps                  [n]
  post = 2 sigmoid(mixes_post * scale[1] + base_post)                    [n]
  comb = Sinkhorn(softmax_rows(mixes_comb * scale[2] + base_comb) + eps) [n, n]
the block input is sum_i pre_i x_i, and after the block the streams become
  y_k = post_k * block_out + sum_j comb[j, k] x_j.
Sinkhorn: normalise columns, then (iters - 1) times rows and columns, each with + eps.
The head collapses the streams with its own pre weights (no Sinkhorn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.layers import rms_unit, wide


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Doubly-stochastic projection of positive matrices m [..., n, n] (column first)."""
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """The mHC parameters around one block (`hc_attn_*` or `hc_ffn_*`: fn, base, scale)."""

    def __init__(self, n: int, dim: int, iters: int, eps: float, norm_eps: float) -> None:
        super().__init__()
        self.n, self.iters, self.eps, self.norm_eps = n, iters, eps, norm_eps
        mix = (2 + n) * n
        self.fn = nn.Parameter(torch.empty(mix, n * dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(mix, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre [N, n], post [N, n], comb [N, n, n]) float32 for streams x [N, n, d]."""
        n = self.n
        mixes = F.linear(rms_unit(wide(x.flatten(1)), self.norm_eps), wide(self.fn))
        pre = torch.sigmoid(mixes[:, :n] * self.scale[0] + self.base[:n]) + self.eps
        post = 2 * torch.sigmoid(mixes[:, n : 2 * n] * self.scale[1] + self.base[n : 2 * n])
        comb = mixes[:, 2 * n :].view(-1, n, n) * self.scale[2] + self.base[2 * n :].view(n, n)
        comb = sinkhorn(comb.softmax(dim=-1) + self.eps, self.iters, self.eps)
        return pre, post, comb

    def collapse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block input [N, d], post, comb) for streams x [N, n, d]."""
        pre, post, comb = self.weights(x)
        return (pre.unsqueeze(-1) * wide(x)).sum(dim=1).to(x.dtype), post, comb

    @staticmethod
    def expand(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New streams [N, n, d]: post_k * out + sum_j comb[j, k] x_j."""
        mixed = torch.einsum("njk,njd->nkd", comb, wide(x))
        return (post.unsqueeze(-1) * wide(out).unsqueeze(1) + mixed).to(x.dtype)


class HyperHead(nn.Module):
    """Final collapse of the streams (`hc_head_fn`, `hc_head_base`, `hc_head_scale`)."""

    def __init__(self, n: int, dim: int, eps: float, norm_eps: float) -> None:
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.fn = nn.Parameter(torch.empty(n, n * dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(rms_unit(wide(x.flatten(1)), self.norm_eps), wide(self.fn))
        pre = torch.sigmoid(mixes * self.scale + self.base) + self.eps
        return (pre.unsqueeze(-1) * wide(x)).sum(dim=1).to(x.dtype)
