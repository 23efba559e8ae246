"""Numerics of the model: activation / KV / indexer quantisation simulation, weight formats.

Simulation (quant_sim=True) mirrors what the real kernels do to activations and KV:
- inputs of FP8 / FP4 GEMMs are FP8 e4m3 with one UE8M0 scale per 128 values;
- the KV nope dims (window and compressed entries) are FP8 e4m3 with one UE8M0 scale per 64,
  and the rope dims are BF16 -- so an entry is exactly representable in the 584-byte layout
  (448 fp8 + 64 bf16 + 7 scales + 1 pad);
- indexer keys and queries are Hadamard-rotated, then FP4 e2m1 with one UE8M0 scale per 32.
With quant_sim=False every function here is the identity, for comparison with references that
do not simulate (the Hadamard rotation is orthogonal, so skipping it changes no score).
"""

from __future__ import annotations

import enum

import torch

from kernels.quant import (
    fp4_e2m1_dequantize,
    fp4_e2m1_quantize,
    fp4_e2m1_sim,
    fp8_block_dequantize,
    fp8_block_quantize,
    fp8_e4m3_sim,
    hadamard,
    ue8m0_exponent,
    ue8m0_scale,
)

ACT_GROUP = 128  # activation quantisation group before FP8 / FP4 GEMMs
KV_GROUP = 64  # KV nope-dim quantisation group
FP4_GROUP = 32  # FP4 weight / indexer quantisation group
WEIGHT_BLOCK = 128  # FP8 weight block (128 x 128)


def act_sim(x: torch.Tensor, on: bool) -> torch.Tensor:
    """FP8 quantise-dequantise of a GEMM input along its last dim (groups of 128)."""
    return fp8_e4m3_sim(x, ACT_GROUP) if on and x.numel() else x


def kv_sim(kv: torch.Tensor, rope_dim: int, on: bool) -> torch.Tensor:
    """KV entry numerics: nope dims through FP8 (groups of 64), rope dims through BF16."""
    if not on or kv.numel() == 0:
        return kv
    nope = fp8_e4m3_sim(kv[..., :-rope_dim], KV_GROUP)
    rope = kv[..., -rope_dim:].to(torch.bfloat16).to(kv.dtype)
    return torch.cat([nope, rope], dim=-1)


def index_sim(x: torch.Tensor, on: bool) -> torch.Tensor:
    """Indexer key / query numerics: Hadamard rotation, then FP4 (groups of 32)."""
    if not on or x.numel() == 0:
        return x
    return fp4_e2m1_sim(hadamard(x), FP4_GROUP)


class WeightFormat(enum.Enum):
    """How a checkpoint stores a tensor."""

    FP8_BLOCK = "fp8_block"  # F8_E4M3 [O, I] + `.scale` F8_E8M0 [ceil(O/128), ceil(I/128)]
    FP4_GROUP = "fp4_group"  # I8 [O, I/2] (two e2m1 per byte, low nibble first) + `.scale` F8_E8M0 [O, I/32]
    BF16 = "bf16"
    FP32 = "fp32"
    INT64 = "int64"


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """float32 values of UE8M0 scales stored as float8_e8m0fnu or uint8 bytes (bits, not values)."""
    raw = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    return ue8m0_scale(raw)


def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales as float8_e8m0fnu (the smallest power of two >= each value)."""
    return ue8m0_exponent(scale.float(), 1.0).view(torch.float8_e8m0fnu)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, fmt: WeightFormat) -> torch.Tensor:
    """float32 values of a checkpoint tensor in format `fmt` (scale None for unscaled formats)."""
    if fmt is WeightFormat.FP8_BLOCK:
        if scale is None:
            raise ValueError("FP8 block weight needs its .scale tensor")
        return fp8_block_dequantize(weight, e8m0_to_float(scale), WEIGHT_BLOCK)
    if fmt is WeightFormat.FP4_GROUP:
        if scale is None:
            raise ValueError("FP4 weight needs its .scale tensor")
        return fp4_e2m1_dequantize(weight.view(torch.uint8), scale.view(torch.uint8), FP4_GROUP)
    if fmt is WeightFormat.INT64:
        return weight.to(torch.int64)
    return weight.float()


def quantize(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checkpoint encoding of float weights `w` in format `fmt`: (weight, scale or None)."""
    if fmt is WeightFormat.FP8_BLOCK:
        # Power-of-two block scales (UE8M0), like the released checkpoints.
        _, s = fp8_block_quantize(w.float(), WEIGHT_BLOCK)
        e = ue8m0_exponent(s * 448.0, 448.0)
        s_pow2 = ue8m0_scale(e)
        o, i = w.shape
        full = s_pow2.repeat_interleave(WEIGHT_BLOCK, 0).repeat_interleave(WEIGHT_BLOCK, 1)[:o, :i]
        q = (w.float() / full).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return q, e.view(torch.float8_e8m0fnu)
    if fmt is WeightFormat.FP4_GROUP:
        packed, e = fp4_e2m1_quantize(w.float(), FP4_GROUP)
        return packed.view(torch.int8), e.view(torch.float8_e8m0fnu)
    if fmt is WeightFormat.BF16:
        return w.to(torch.bfloat16), None
    if fmt is WeightFormat.INT64:
        return w.to(torch.int64), None
    return w.float(), None
