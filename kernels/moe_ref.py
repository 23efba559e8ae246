"""Torch reference of the routed experts of one MoE layer (workers.model.moe.MoE.routed after its gate).

Expert e: h = silu(min(x W1_e^T, limit)) * clamp(x W3_e^T, -limit, limit) * routing weight, then
out = h W2_e^T; with `act_group` set, the inputs of both GEMMs are first FP8-simulated (e4m3,
UE8M0 scale per act_group values), as the model's quant_sim does. Outputs are summed per token in
the order of `experts` (expert-id order in the model), in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.quant import fp8_e4m3_sim


def act_quant(x: torch.Tensor, act_group: int | None) -> torch.Tensor:
    """The model's act_sim: FP8 quantise-dequantise in groups of act_group, or x if None / empty."""
    return fp8_e4m3_sim(x, act_group) if act_group is not None and x.numel() else x


def check_experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    w3: torch.Tensor, experts: Sequence[int],
) -> None:  # fmt: skip
    """Raise unless the shapes fit: x [N, hid], weights / ids [N, k], w1 / w3 [E, I, hid], w2 [E, hid, I]."""
    n, hid = x.shape
    e, inter, _ = w1.shape
    if tuple(weights.shape) != tuple(ids.shape) or weights.dim() != 2 or weights.shape[0] != n:
        raise ValueError(
            f"routed_experts: weights and ids must be [{n}, k],"
            f" got {tuple(weights.shape)}, {tuple(ids.shape)}"
        )
    if (
        tuple(w1.shape) != (e, inter, hid)
        or tuple(w3.shape) != (e, inter, hid)
        or tuple(w2.shape) != (e, hid, inter)
    ):
        raise ValueError(
            f"routed_experts: want w1, w3 [E, I, {hid}] and w2 [E, {hid}, I]; got {tuple(w1.shape)}, "
            f"{tuple(w3.shape)}, {tuple(w2.shape)}"
        )
    if len(experts) != e or len(set(experts)) != e:
        raise ValueError(
            f"routed_experts: experts {list(experts)} must name the {e} stacked experts once each"
        )


def routed_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    experts: Sequence[int],
    limit: float,
    act_group: int | None,
) -> torch.Tensor:
    """Sum over the stacked experts (w*[i] is expert experts[i]) of their weighted outputs: [N, hid] float32.

    Tokens routed to an expert not in `experts` (held by another rank) contribute nothing.
    """
    check_experts(x, weights, ids, w1, w2, w3, experts)
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for i, e in sorted(enumerate(experts), key=lambda p: p[1]):
        rows, slot = torch.where(ids == e)
        if not rows.numel():
            continue
        xe = act_quant(x[rows], act_group)
        gate = F.linear(xe.to(w1.dtype), w1[i]).float().clamp(max=limit)
        up = F.linear(xe.to(w3.dtype), w3[i]).float().clamp(min=-limit, max=limit)
        h = (F.silu(gate) * up * weights[rows, slot, None]).to(x.dtype)
        y[rows] += F.linear(act_quant(h, act_group).to(w2.dtype), w2[i]).float()
    return y
