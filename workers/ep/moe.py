"""The MoE layer under expert parallelism, as a drop-in for the model's `MoE` module.

Data flow for this rank's tokens x [N, d] (any N, 0 on an idle rank):
1. gate locally (the gate is replicated): weights, expert ids [N, k];
2. dispatch: each (token, slot) pair goes to the rank owning its expert, as the token's row plus
   (expert id, weight); pairs are sent grouped by destination rank;
3. each rank runs its own experts on the rows it received (expert-id order) and combines: the
   weighted outputs go back to where they came from, in the order they arrived;
4. the source puts each token's k outputs in expert-id order and sums them from zero in float32
   -- the same order as the single-rank `MoE.routed` -- then adds the shared expert.
Every rank must call forward for every MoE layer of every step: the exchanges are collectives.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import ops
from workers.ep.dispatch import Dispatcher
from workers.ep.group import EpGroup
from workers.model.layers import wide
from workers.model.moe import MoE
from workers.model.quant import ACT_GROUP


class EpMoE(nn.Module):
    """Wraps a `MoE` built with this rank's `local_experts` (exactly the rank's expert slice)."""

    def __init__(self, moe: MoE, group: EpGroup, dispatcher: Dispatcher) -> None:
        super().__init__()
        n_exp = moe.cfg.n_routed_experts
        want = tuple(group.local_experts(n_exp))
        if moe.local_experts != want:
            raise ValueError(f"EpMoE: rank {group.rank} must hold experts {want[0]}..{want[-1]}, "
                             f"its MoE holds {moe.local_experts}")
        self.moe, self.group, self.dispatcher = moe, group, dispatcher

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """MoE output [N, d] for x [N, d] with token ids [N]; N may be 0."""
        moe, n_exp = self.moe, self.moe.cfg.n_routed_experts
        n, k = x.shape[0], moe.cfg.top_k
        weights, ids = moe.gate(x, token_ids)  # [N, k] each
        flat_ids = ids.reshape(-1)
        dest = self.group.owner(flat_ids, n_exp)
        order = torch.sort(dest, stable=True).indices  # pairs grouped by destination rank
        counts = torch.bincount(dest, minlength=self.group.world_size).tolist()
        pair_token = order // k
        rows, recv = self.dispatcher.exchange(x[pair_token], counts)
        meta = torch.stack([flat_ids[order].float(), weights.reshape(-1)[order]], dim=1)
        meta_in, _ = self.dispatcher.exchange(meta, counts, recv)
        out = self._run_local(rows, meta_in)  # wide precision: combined exactly as MoE.routed sums
        back, _ = self.dispatcher.exchange(out, recv, counts)
        per_pair = torch.empty(n * k, x.shape[1], dtype=back.dtype, device=x.device)
        per_pair[order] = back
        per_pair = wide(per_pair.view(n, k, x.shape[1]))
        by_expert = torch.sort(ids, dim=1, stable=True).indices
        y = wide(x.new_zeros(x.shape))
        for j in range(k):  # expert-id order per token, as in MoE.routed
            y += per_pair[torch.arange(n), by_expert[:, j]]
        return (y + wide(moe.shared_experts(x))).to(x.dtype)

    def _run_local(self, rows: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Weighted outputs of this rank's experts for received rows [R, d] with meta [R, 2]
        (expert id, weight), in the model's wide precision: the same expert op as `MoE.routed`,
        each row being one (token, expert) pair."""
        moe = self.moe
        expert = meta[:, 0].long()
        if rows.dtype == torch.float64:  # the model computes float64 in-module; so do we
            out = wide(rows.new_zeros(rows.shape))
            for e in moe.local_experts:
                sel = torch.where(expert == e)[0]
                if sel.numel():
                    out[sel] = wide(moe.experts[str(e)](rows[sel], meta[sel, 1:2]))
            return out
        ex = [moe.experts[str(e)] for e in moe.local_experts]
        w1, w2, w3 = (torch.stack([getattr(m, n).weight for m in ex]) for n in ("w1", "w2", "w3"))
        group = ACT_GROUP if moe.shared_experts.w1.sim else None
        return ops.routed_experts(rows, meta[:, 1:2], expert[:, None], w1, w2, w3, moe.local_experts,
                                  moe.cfg.swiglu_limit, group)
