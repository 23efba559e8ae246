"""Mixture of experts: router gate (learned or hash), routed experts, one shared expert.

Gate: scores = f(x @ gate^T) in fp32 with f = sqrt(softplus) (or softmax / sigmoid). Learned
layers select the top-k of scores + bias (the bias steers selection only); hash layers select
`tid2eid[token]`. Weights = the selected scores, normalised to sum 1 (not for softmax), times
routed_scaling_factor. Experts: SwiGLU with clamp (up to [-limit, limit], gate to <= limit), the
routing weight applied before w2; routed outputs are summed in expert-id order, then the shared
expert's output is added.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from workers.model.config import ModelConfig, ScoreFunc
from workers.model.layers import Linear, wide
from workers.model.quant import ACT_GROUP


class Gate(nn.Module):
    """Router of one MoE layer (`ffn.gate.*`); `hashed` layers carry `tid2eid` instead of `bias`."""

    def __init__(self, cfg: ModelConfig, hashed: bool) -> None:
        super().__init__()
        self.cfg, self.hashed = cfg, hashed
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.top_k, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] float32, expert ids [N, k]) for tokens x [N, hidden] with ids [N]."""
        logits = F.linear(wide(x), wide(self.weight))
        f = self.cfg.score_func
        if f is ScoreFunc.SQRT_SOFTPLUS:
            scores = F.softplus(logits).sqrt()
        elif f is ScoreFunc.SOFTMAX:
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        if self.hashed:
            ids = self.tid2eid[token_ids]
        else:
            ids = (scores + self.bias).topk(self.cfg.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        if f is not ScoreFunc.SOFTMAX:
            w = w / w.sum(dim=-1, keepdim=True)
        return w * self.cfg.routed_scaling_factor, ids


class Expert(nn.Module):
    """SwiGLU expert w2(silu(clamp(w1 x)) * clamp(w3 x)); FP8 inputs to all three GEMMs (sim)."""

    def __init__(self, dim: int, inter: int, limit: float, sim: bool) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, quantised_input=True, sim=sim)
        self.w2 = Linear(inter, dim, quantised_input=True, sim=sim)
        self.w3 = Linear(dim, inter, quantised_input=True, sim=sim)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        gate = wide(self.w1(x)).clamp(max=self.limit)
        up = wide(self.w3(x)).clamp(min=-self.limit, max=self.limit)
        h = F.silu(gate) * up
        if weights is not None:
            h = h * weights
        return self.w2(h.to(x.dtype))


class MoE(nn.Module):
    """MoE layer. `local_experts` are the expert ids this rank holds (all of them by default);
    under expert parallelism the routed sum covers only those and the caller combines ranks."""

    def __init__(
        self, cfg: ModelConfig, hashed: bool, sim: bool, local_experts: Iterable[int] | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg, hashed)
        ids = sorted(range(cfg.n_routed_experts) if local_experts is None else set(local_experts))
        bad = [e for e in ids if not 0 <= e < cfg.n_routed_experts]
        if bad:
            raise ValueError(f"local_experts {bad} outside 0..{cfg.n_routed_experts - 1}")
        self.local_experts = tuple(ids)
        self.experts = nn.ModuleDict(
            {str(e): Expert(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit, sim) for e in ids}
        )
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit, sim)

    def routed(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Sum of this rank's routed experts' weighted outputs, float32 [N, hidden] (float64 in a
        float64 model, computed here; other models run the kernel op on stacked weights)."""
        weights, ids = self.gate(x, token_ids)
        if x.dtype != torch.float64:
            ex = [self.experts[str(e)] for e in self.local_experts]
            w1, w2, w3 = (torch.stack([getattr(m, n).weight for m in ex]) for n in ("w1", "w2", "w3"))
            sim = self.shared_experts.w1.sim
            return ops.routed_experts(x, weights, ids, w1, w2, w3, self.local_experts, self.cfg.swiglu_limit,
                                      ACT_GROUP if sim else None)
        y = wide(x.new_zeros(x.shape))
        for e in self.local_experts:  # expert-id order fixes the summation order
            rows, slot = torch.where(ids == e)
            if rows.numel():
                y[rows] += wide(self.experts[str(e)](x[rows], weights[rows, slot, None]))
        return y

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """MoE output [N, hidden] for x [N, hidden] with token ids [N]."""
        return (self.routed(x, token_ids) + wide(self.shared_experts(x))).to(x.dtype)
