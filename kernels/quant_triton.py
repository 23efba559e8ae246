"""Triton quantisation kernels: FP8 e4m3 / FP4 e2m1 with UE8M0 group scales, FP8 128x128 blocks.

Each entry point returns exactly what its reference in kernels.quant returns (same dtypes, same
bits): fp8_e4m3_quantize / _dequantize, fp4_e2m1_quantize / _dequantize, fp8_block_quantize /
_dequantize. Inputs are any float dtype; grouped tensors are read as contiguous [groups, group].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.buffers import new_output
from kernels.formats_triton import (
    fp4_e2m1_decode,
    fp4_e2m1_encode,
    fp8_e4m3_decode,
    fp8_e4m3_encode,
    ue8m0_from_amax,
    ue8m0_to_scale,
)
from kernels.quant import AMAX_FLOOR, FP4_E2M1_MAX, FP8_E4M3_MAX

BLOCK_GROUPS = 16
# The references' constants, as compile-time constants of the kernels.
FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
FP4_MAX = tl.constexpr(FP4_E2M1_MAX)
FLOOR = tl.constexpr(AMAX_FLOOR)


def _check_grouped(x: torch.Tensor, group: int, what: str) -> None:
    if group <= 0 or group & (group - 1):
        raise ValueError(f"{what}: group {group} must be a power of two")
    if x.dim() == 0 or x.shape[-1] % group:
        raise ValueError(f"{what}: last dim of shape {tuple(x.shape)} is not a multiple of group {group}")


@triton.jit
def _fp8_group_quant_kernel(x_ptr, q_ptr, e_ptr, n_groups, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, GROUP)
    gm = g < n_groups
    offs = g[:, None] * GROUP + c[None, :]
    x = tl.load(x_ptr + offs, mask=gm[:, None], other=0.0).to(tl.float32)
    e = ue8m0_from_amax(tl.max(tl.abs(x), axis=1), FP8_MAX, FLOOR)
    y = x / ue8m0_to_scale(e)[:, None]
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + offs, fp8_e4m3_encode(y).to(tl.uint8), mask=gm[:, None])
    tl.store(e_ptr + g, e.to(tl.uint8), mask=gm)


@triton.jit
def _fp8_group_dequant_kernel(q_ptr, e_ptr, y_ptr, n_groups, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, GROUP)
    gm = g < n_groups
    offs = g[:, None] * GROUP + c[None, :]
    q = fp8_e4m3_decode(tl.load(q_ptr + offs, mask=gm[:, None], other=0))
    e = tl.load(e_ptr + g, mask=gm, other=127).to(tl.int32)
    tl.store(y_ptr + offs, q * ue8m0_to_scale(e)[:, None], mask=gm[:, None])


def fp8_e4m3_quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of kernels.quant.fp8_e4m3_quantize: (q float8_e4m3fn [..., n], e uint8 [..., n/group])."""
    _check_grouped(x, group, "fp8_e4m3_quantize")
    xc = x.contiguous()
    n_groups = xc.numel() // group
    q = new_output(tuple(x.shape), torch.uint8, x.device)
    e = new_output((*x.shape[:-1], x.shape[-1] // group), torch.uint8, x.device)
    if n_groups:
        grid = (triton.cdiv(n_groups, BLOCK_GROUPS),)
        _fp8_group_quant_kernel[grid](xc, q, e, n_groups, GROUP=group, BLOCK_G=BLOCK_GROUPS)
    return q.view(torch.float8_e4m3fn), e


def fp8_e4m3_dequantize(q: torch.Tensor, e: torch.Tensor, group: int) -> torch.Tensor:
    """Triton twin of kernels.quant.fp8_e4m3_dequantize: float32 [..., n]."""
    _check_grouped(q, group, "fp8_e4m3_dequantize")
    want = (*q.shape[:-1], q.shape[-1] // group)
    if tuple(e.shape) != want or e.dtype != torch.uint8:
        raise ValueError(f"fp8_e4m3_dequantize: e must be uint8 {want}, got {e.dtype} {tuple(e.shape)}")
    qc = q.contiguous().view(torch.uint8)
    y = new_output(tuple(q.shape), torch.float32, q.device)
    n_groups = qc.numel() // group
    if n_groups:
        grid = (triton.cdiv(n_groups, BLOCK_GROUPS),)
        _fp8_group_dequant_kernel[grid](qc, e.contiguous(), y, n_groups, GROUP=group, BLOCK_G=BLOCK_GROUPS)
    return y


@triton.jit
def _fp4_quant_kernel(x_ptr, p_ptr, e_ptr, n_groups, HALF: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, HALF)
    gm = g < n_groups
    pair = g[:, None] * HALF + c[None, :]
    lo = tl.load(x_ptr + 2 * pair, mask=gm[:, None], other=0.0).to(tl.float32)
    hi = tl.load(x_ptr + 2 * pair + 1, mask=gm[:, None], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
    e = ue8m0_from_amax(amax, FP4_MAX, FLOOR)
    s = ue8m0_to_scale(e)[:, None]
    packed = fp4_e2m1_encode(lo / s) | (fp4_e2m1_encode(hi / s) << 4)
    tl.store(p_ptr + pair, packed.to(tl.uint8), mask=gm[:, None])
    tl.store(e_ptr + g, e.to(tl.uint8), mask=gm)


@triton.jit
def _fp4_dequant_kernel(p_ptr, e_ptr, y_ptr, n_groups, HALF: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, HALF)
    gm = g < n_groups
    pair = g[:, None] * HALF + c[None, :]
    b = tl.load(p_ptr + pair, mask=gm[:, None], other=0).to(tl.int32)
    s = ue8m0_to_scale(tl.load(e_ptr + g, mask=gm, other=127).to(tl.int32))[:, None]
    tl.store(y_ptr + 2 * pair, fp4_e2m1_decode(b & 15) * s, mask=gm[:, None])
    tl.store(y_ptr + 2 * pair + 1, fp4_e2m1_decode(b >> 4) * s, mask=gm[:, None])


def fp4_e2m1_quantize(x: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of kernels.quant.fp4_e2m1_quantize: (packed uint8 [..., n/2], e uint8 [..., n/group])."""
    _check_grouped(x, group, "fp4_e2m1_quantize")
    if group < 2:
        raise ValueError(f"fp4_e2m1_quantize: group {group} must hold whole byte pairs")
    xc = x.contiguous()
    n_groups = xc.numel() // group
    packed = new_output((*x.shape[:-1], x.shape[-1] // 2), torch.uint8, x.device)
    e = new_output((*x.shape[:-1], x.shape[-1] // group), torch.uint8, x.device)
    if n_groups:
        grid = (triton.cdiv(n_groups, BLOCK_GROUPS),)
        _fp4_quant_kernel[grid](xc, packed, e, n_groups, HALF=group // 2, BLOCK_G=BLOCK_GROUPS)
    return packed, e


def fp4_e2m1_dequantize(packed: torch.Tensor, e: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Triton twin of kernels.quant.fp4_e2m1_dequantize: float32 [..., 2 * packed.shape[-1]]."""
    n = 2 * packed.shape[-1]
    want = (*packed.shape[:-1], n // group)
    if packed.dtype != torch.uint8 or n % group:
        raise ValueError(f"fp4_e2m1_dequantize: packed must be uint8 with 2*last dim a multiple of {group}")
    if tuple(e.shape) != want or e.dtype != torch.uint8:
        raise ValueError(f"fp4_e2m1_dequantize: e must be uint8 {want}, got {e.dtype} {tuple(e.shape)}")
    y = new_output((*packed.shape[:-1], n), torch.float32, packed.device)
    n_groups = y.numel() // group
    if n_groups:
        grid = (triton.cdiv(n_groups, BLOCK_GROUPS),)
        _fp4_dequant_kernel[grid](
            packed.contiguous(), e.contiguous(), y, n_groups, HALF=group // 2, BLOCK_G=BLOCK_GROUPS
        )
    return y


@triton.jit
def _fp8_block_quant_kernel(w_ptr, q_ptr, s_ptr, rows, cols, s_cols, BLOCK: tl.constexpr):
    bi, bj = tl.program_id(0), tl.program_id(1)
    r = bi * BLOCK + tl.arange(0, BLOCK)
    c = bj * BLOCK + tl.arange(0, BLOCK)
    m = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r[:, None] * cols + c[None, :]
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), FLOOR) / FP8_MAX
    y = tl.minimum(tl.maximum(w / scale, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + offs, fp8_e4m3_encode(y).to(tl.uint8), mask=m)
    tl.store(s_ptr + bi * s_cols + bj, scale)


@triton.jit
def _fp8_block_dequant_kernel(q_ptr, s_ptr, y_ptr, rows, cols, s_cols, BLOCK: tl.constexpr):
    bi, bj = tl.program_id(0), tl.program_id(1)
    r = bi * BLOCK + tl.arange(0, BLOCK)
    c = bj * BLOCK + tl.arange(0, BLOCK)
    m = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r[:, None] * cols + c[None, :]
    q = fp8_e4m3_decode(tl.load(q_ptr + offs, mask=m, other=0))
    tl.store(y_ptr + offs, q * tl.load(s_ptr + bi * s_cols + bj), mask=m)


def _check_block(block: int) -> None:
    if block <= 0 or block & (block - 1):
        raise ValueError(f"fp8 block size {block} must be a power of two")


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of kernels.quant.fp8_block_quantize: (q float8_e4m3fn [O, I], scale float32 [O/b, I/b])."""
    _check_block(block)
    if w.dim() != 2:
        raise ValueError(f"fp8_block_quantize: w must be 2-D [O, I], got shape {tuple(w.shape)}")
    o, i = w.shape
    grid = (triton.cdiv(o, block), triton.cdiv(i, block))
    q = new_output((o, i), torch.uint8, w.device)
    scale = new_output(grid, torch.float32, w.device)
    if w.numel():
        _fp8_block_quant_kernel[grid](w.contiguous(), q, scale, o, i, grid[1], BLOCK=block)
    return q.view(torch.float8_e4m3fn), scale


def fp8_block_dequantize(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Triton twin of kernels.quant.fp8_block_dequantize: float32 [O, I]."""
    _check_block(block)
    if w.dim() != 2 or w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_block_dequantize: w must be 2-D float8_e4m3fn, got {w.dtype} {tuple(w.shape)}")
    o, i = w.shape
    grid = (triton.cdiv(o, block), triton.cdiv(i, block))
    if tuple(scale.shape) != grid:
        raise ValueError(f"block scale shape {tuple(scale.shape)} does not fit weight {(o, i)}: want {grid}")
    y = new_output((o, i), torch.float32, w.device)
    if w.numel():
        _fp8_block_dequant_kernel[grid](
            w.contiguous().view(torch.uint8), scale.float().contiguous(), y, o, i, grid[1], BLOCK=block
        )
    return y
