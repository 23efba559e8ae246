"""Partial, interleaved rotary position embedding (RoPE), with YaRN for compressed layers.

Each 512-wide head is laid out [nope | rope]; only the last `rope_head_dim` dims rotate, and
adjacent pairs (2i, 2i+1) rotate together. Angles are computed in float32. The inverse rotation
(angle -p) undoes the rotation that values picked up, because keys and values are the same vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.model.config import LayerKind, ModelConfig, YarnConfig
from workers.model.layers import wide


def inv_frequencies(dim: int, theta: float, yarn: YarnConfig | None) -> torch.Tensor:
    """Per-pair inverse frequencies [dim // 2] (float32), YaRN-interpolated when `yarn` is given.

    YaRN: pairs rotating slower than `beta_slow` turns over the original context are divided by
    `factor`, pairs faster than `beta_fast` turns are kept, with a linear ramp between.
    """
    # Explicit CPU device: the tables are tiny and must be real even when a model is built on meta.
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if yarn is None:
        return freqs

    def correction_dim(turns: float) -> float:
        return dim * math.log(yarn.original_max_position / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return freqs / yarn.factor * (1 - keep) + freqs * keep


@dataclass(frozen=True)
class Rope:
    """The rotation of one layer kind: plain RoPE (SWA) or YaRN RoPE (CSA / HCA)."""

    inv_freq: torch.Tensor  # [rope_dim // 2] float32

    @staticmethod
    def for_kind(cfg: ModelConfig, kind: LayerKind) -> Rope:
        """SWA layers: theta `rope_theta`, no YaRN. Compressed layers: `compress_rope_theta` + YaRN."""
        if kind is LayerKind.SWA:
            f = inv_frequencies(cfg.rope_head_dim, cfg.rope_theta, None)
        else:
            f = inv_frequencies(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.yarn)
        return Rope(f)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [*positions.shape, rope_dim // 2] for integer positions."""
        a = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)
        return a.cos(), a.sin()

    def apply(self, x: torch.Tensor, positions: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """Rotate the last rope_dim dims of x [T, D] or [T, H, D] by angle p (or -p if inverse).

        `positions` has shape [T]. Returns a new tensor of x's dtype.
        """
        rd = self.inv_freq.shape[0] * 2
        cos, sin = self.angles(positions)
        if x.dim() == positions.dim() + 2:  # x [..., T, H, D]: broadcast over the head axis
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        if inverse:
            sin = -sin
        rope = wide(x[..., -rd:]).unflatten(-1, (-1, 2))
        a, b = rope[..., 0], rope[..., 1]
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat([x[..., :-rd], rotated.to(x.dtype)], dim=-1)
