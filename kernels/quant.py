"""Torch references for the number formats DeepSeek-V4 uses, bit-exact on any device.

Formats (dsv4-model.md, "Weights and numerics"):
- FP8 e4m3 (max 448) with one UE8M0 scale per group of values along the last dim: the KV cache's
  448 nope dims use groups of 64; activations before FP8 GEMMs use groups of 128.
- FP8 e4m3 weights with one float32 scale per 128x128 block.
- FP4 e2m1 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) with one UE8M0 scale per 32
  values: routed experts' weights and the indexer's keys and queries.
- UE8M0: an unsigned 8-bit exponent e; the scale is 2**(e - 127). Scales are powers of two so a
  multiply by one is exact.

Every function here is the reference that Triton kernels are tested against; keep them simple.
Shapes: the grouped dimension is always the last one and must divide by the group size.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
UE8M0_BIAS = 127
# amax is clamped from below so an all-zero group gets a finite scale (DeepSeek's act_quant does too).
AMAX_FLOOR = 1e-4
# The eight non-negative FP4 e2m1 values; the index of a value is its 3-bit magnitude code.
FP4_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """View x [..., n] as [..., n // group, group]; n must be a multiple of group."""
    n = x.shape[-1]
    if group <= 0 or n % group:
        raise ValueError(f"last dim {n} of shape {tuple(x.shape)} is not a multiple of group {group}")
    return x.reshape(*x.shape[:-1], n // group, group)


def ue8m0_exponent(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """The smallest power-of-two scale s with amax / s <= fmax, as a UE8M0 byte (uint8)."""
    ratio = amax.float().clamp(min=AMAX_FLOOR) / fmax
    e = torch.ceil(torch.log2(ratio)).to(torch.int32) + UE8M0_BIAS
    return e.clamp(0, 254).to(torch.uint8)


def ue8m0_scale(e: torch.Tensor) -> torch.Tensor:
    """The float32 scale 2**(e - 127) of UE8M0 bytes."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32) - UE8M0_BIAS)


def fp8_e4m3_quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x [..., n] to FP8 e4m3 with one UE8M0 scale per `group` values.

    Returns (q float8_e4m3fn [..., n], e uint8 [..., n // group]).
    """
    xg = _grouped(x.float(), group)
    e = ue8m0_exponent(xg.abs().amax(dim=-1), FP8_E4M3_MAX)
    q = (xg / ue8m0_scale(e).unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), e


def fp8_e4m3_dequantize(q: torch.Tensor, e: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of fp8_e4m3_quantize: float32 [..., n]."""
    qg = _grouped(q.float(), group)
    return (qg * ue8m0_scale(e).unsqueeze(-1)).reshape(q.shape)


def fp8_e4m3_sim(x: torch.Tensor, group: int) -> torch.Tensor:
    """Quantise-dequantise x through FP8 e4m3 with UE8M0 group scales; returns x's dtype."""
    q, e = fp8_e4m3_quantize(x, group)
    return fp8_e4m3_dequantize(q, e, group).to(x.dtype)


def _fp4_codes(y: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (sign << 3 | magnitude index) of y, already scaled into [-6, 6].

    Rounds to the nearest representable value, ties to the even code (as hardware does).
    """
    grid = torch.tensor(FP4_E2M1_GRID, dtype=torch.float32, device=y.device)
    mag = y.abs().clamp(max=FP4_E2M1_MAX).unsqueeze(-1)
    dist = (mag - grid).abs()
    # On an exact tie the odd code loses: bias odd codes by less than any real gap (0.25 / 2).
    odd = torch.arange(8, device=y.device) % 2
    idx = torch.argmin(dist + odd * 1e-6, dim=-1)
    sign = (y < 0).to(torch.int64) << 3
    return (sign | idx).to(torch.uint8)


def fp4_e2m1_quantize(x: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x [..., n] to FP4 e2m1 with one UE8M0 scale per `group` values.

    Returns (packed uint8 [..., n // 2]: element 2i in the low nibble, 2i+1 in the high nibble;
    e uint8 [..., n // group]).
    """
    if x.shape[-1] % 2:
        raise ValueError(f"FP4 packs pairs: last dim of {tuple(x.shape)} must be even")
    xg = _grouped(x.float(), group)
    e = ue8m0_exponent(xg.abs().amax(dim=-1), FP4_E2M1_MAX)
    codes = _fp4_codes(xg / ue8m0_scale(e).unsqueeze(-1)).reshape(*x.shape[:-1], -1, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return packed, e


def fp4_e2m1_dequantize(packed: torch.Tensor, e: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Inverse of fp4_e2m1_quantize: float32 [..., 2 * packed.shape[-1]]."""
    grid = torch.tensor(FP4_E2M1_GRID, dtype=torch.float32, device=packed.device)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1).long()
    vals = grid[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    return (_grouped(vals, group) * ue8m0_scale(e).unsqueeze(-1)).reshape(vals.shape)


def fp4_e2m1_sim(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Quantise-dequantise x through FP4 e2m1 with UE8M0 group scales; returns x's dtype."""
    packed, e = fp4_e2m1_quantize(x, group)
    return fp4_e2m1_dequantize(packed, e, group).to(x.dtype)


def fp8_block_dequantize(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Dequantise FP8 weights w [O, I] with float32 block scales [ceil(O/block), ceil(I/block)]."""
    o, i = w.shape
    want = (-(-o // block), -(-i // block))
    if tuple(scale.shape) != want:
        raise ValueError(f"block scale shape {tuple(scale.shape)} does not fit weight {(o, i)}: want {want}")
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:o, :i]
    return w.float() * s


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise w [O, I] to FP8 e4m3 with one float32 scale per block x block tile (amax / 448)."""
    o, i = w.shape
    po, pi = -(-o // block) * block, -(-i // block) * block
    padded = torch.zeros(po, pi, dtype=torch.float32, device=w.device)
    padded[:o, :i] = w.float()
    tiles = padded.reshape(po // block, block, pi // block, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR) / FP8_E4M3_MAX
    q = (tiles / scale[:, None, :, None]).reshape(po, pi)[:o, :i].to(torch.float8_e4m3fn)
    return q, scale


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform (Sylvester order) over the last dim, a power of two."""
    n = x.shape[-1]
    if n <= 0 or n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two last dim, got {n}")
    y = x.float()
    h = 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return (y.reshape(x.shape) * n**-0.5).to(x.dtype)
