"""Basic layers: RMSNorm and a linear layer that simulates its activation quantisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.quant import WeightFormat, act_sim


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as the checkpoint stores it, for kernels that take it quantised: FP8 e4m3 [O, I]
    with UE8M0 128x128 block scales, or FP4 e2m1 packed two a byte (int8 [O, I/2], low nibble
    first) with UE8M0 per-32 scales [O, I/32]. Scales are float8_e8m0fnu (exponent bytes)."""

    data: torch.Tensor
    scale: torch.Tensor
    fmt: WeightFormat


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in the precision the model computes sensitive steps in: float32, or float64 if x already is.

    A float64 model (tests) thereby stays float64 throughout, which makes every row's result
    independent of the batch shape even through the FP8 / FP4 rounding of quant_sim.
    """
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32, weight kept in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = wide(x)
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight * y).to(x.dtype)


def rms_unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight (per-head query scaling, mHC input), float32 math."""
    xf = wide(x)
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class Linear(nn.Module):
    """y = x @ W^T with W [out, in]. `quantised_input`: the real kernel takes an FP8 activation
    (the weight is FP8 or FP4 in the checkpoint), so with `sim` the input is FP8-simulated."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quantised_input: bool,
        sim: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.quantised_input = quantised_input
        self.sim = sim
        # Set by the loader (keep_quantized=True) when the checkpoint stores this weight quantised;
        # `weight` always holds the dequantised values the CPU path computes with.
        self.quantized: QuantizedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = act_sim(x, self.sim and self.quantised_input)
        return F.linear(x.to(self.weight.dtype), self.weight)
