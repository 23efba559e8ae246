"""Triton device functions for the number formats, bit-exact against kernels.quant.

Why hand-written encoders: Triton's interpreter (the only Triton on a CPU) does not round
fp32 -> fp8 e4m3 to nearest-even, so a native cast would make the interpreted kernels disagree with
the references. Integer rounding costs a few ALU ops per element on a GPU, where these kernels are
memory bound. Decoding uses the native fp8 bitcast, which is exact everywhere.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ue8m0_from_amax(amax, FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """UE8M0 exponent (int32 in [0, 254]) of the smallest power of two s with amax / s <= FMAX.

    Mirrors kernels.quant.ue8m0_exponent: ceil(log2(max(amax, floor) / fmax)) + 127, clamped.
    """
    ratio = tl.maximum(amax, AMAX_FLOOR) / FMAX
    e = tl.ceil(tl.log2(ratio)).to(tl.int32) + 127
    return tl.minimum(tl.maximum(e, 0), 254)


@triton.jit
def ue8m0_to_scale(e):
    """float32 2**(e - 127) of int32 exponents e in [0, 254] (2**-127 is a float32 subnormal)."""
    normal = (tl.maximum(e, 1) << 23).to(tl.float32, bitcast=True)
    return tl.where(e == 0, 5.877471754111438e-39, normal)


@triton.jit
def fp8_e4m3_encode(v):
    """e4m3 byte codes (int32 0..255) of float32 v with |v| <= 448, round to nearest even."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.abs(v)
    abits = bits & 0x7FFFFFFF
    # Normal range: drop 20 of fp32's 23 mantissa bits with round-to-nearest-even; a carry
    # into the exponent is the correct result. Re-bias the exponent from 127 to 7.
    rounded = (abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20
    normal = rounded - (120 << 3)
    # Subnormal range (a < 2**-6): multiples of 2**-9; rounding up to 8 gives the smallest normal.
    y = a * 512.0
    fl = tl.floor(y)
    frac = y - fl
    fli = fl.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((fli & 1) == 1))
    sub = fli + up.to(tl.int32)
    mag = tl.where(a < 0.015625, sub, normal)
    return (sign << 7) | mag


@triton.jit
def fp8_e4m3_decode(code):
    """float32 values of e4m3 byte codes (uint8 tensor)."""
    return code.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def fp4_e2m1_encode(y):
    """4-bit e2m1 codes (int32) of y scaled into [-6, 6]: nearest grid value, exact ties to the even
    code, mirroring kernels.quant._fp4_codes (its argmin over distance + 1e-6 * odd, first wins)."""
    mag = tl.minimum(tl.abs(y), 6.0)
    best = tl.abs(mag - 0.0)
    idx = tl.zeros(y.shape, dtype=tl.int32)
    d = tl.abs(mag - 0.5) + 1e-6
    idx = tl.where(d < best, 1, idx)
    best = tl.minimum(d, best)
    d = tl.abs(mag - 1.0)
    idx = tl.where(d < best, 2, idx)
    best = tl.minimum(d, best)
    d = tl.abs(mag - 1.5) + 1e-6
    idx = tl.where(d < best, 3, idx)
    best = tl.minimum(d, best)
    d = tl.abs(mag - 2.0)
    idx = tl.where(d < best, 4, idx)
    best = tl.minimum(d, best)
    d = tl.abs(mag - 3.0) + 1e-6
    idx = tl.where(d < best, 5, idx)
    best = tl.minimum(d, best)
    d = tl.abs(mag - 4.0)
    idx = tl.where(d < best, 6, idx)
    best = tl.minimum(d, best)
    d = tl.abs(mag - 6.0) + 1e-6
    idx = tl.where(d < best, 7, idx)
    return tl.where(y < 0, idx | 8, idx)


@triton.jit
def fp4_e2m1_decode(code):
    """float32 values of 4-bit e2m1 codes (int32 0..15)."""
    m = code & 7
    # grid: 0, 0.5, 1, 1.5 (m < 4: m / 2), then 2, 3, 4, 6 (m >= 4: 2 ** (m // 2 - 1) * (1 + (m & 1) / 2))
    low = m.to(tl.float32) * 0.5
    e = (m >> 1) - 1
    high = ((e + 127) << 23).to(tl.float32, bitcast=True) * (1.0 + (m & 1).to(tl.float32) * 0.5)
    v = tl.where(m < 4, low, high)
    return tl.where(code >= 8, -v, v)
