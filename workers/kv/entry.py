"""Byte layouts of one cached KV entry and one indexer key, with pack/unpack.

THE entry layout (docs/kv.md), for a head of `nope_dim + rope_dim` dims (448 + 64 in V4):
  bytes [0, nope)                      the nope dims as FP8 e4m3
  bytes [nope, nope + 2*rope)          the rope dims as bf16 (little-endian, as torch stores it)
  bytes [.., .. + nope/scale_group)    one UE8M0 exponent per group of `scale_group` nope dims
                                       (scale = 2**(e - 127))
  zero pad up to a multiple of 8 bytes (584 in V4: 448 + 128 + 7 + 1)
Raw window KV, CSA entries and HCA entries all use it, so one page format serves every layer kind.

Indexer keys (CSA layers), per key of `dim` dims:
  FP4 (default): dim/2 bytes of packed e2m1 (element 2i in the low nibble) then dim/32 UE8M0 bytes
                 (68 B for 128 dims)
  FP8: dim bytes of e4m3 then one float32 scale (a power of two), 132 B for 128 dims

The codecs are kernels.quant's references, so unpack(pack(x)) equals the quantise-dequantise the
model applies to its float cache, bit for bit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from kernels.entry_format import EntryFormat
from kernels.quant import (
    fp4_e2m1_dequantize,
    fp4_e2m1_quantize,
    fp8_e4m3_quantize,
    ue8m0_scale,
)

FP4_SCALE_GROUP = 32


def _check_last(x: torch.Tensor, want: int, what: str) -> None:
    if x.shape[-1] != want:
        raise ValueError(f"{what}: last dim of shape {tuple(x.shape)} must be {want}")


@dataclass(frozen=True)
class EntryLayout:
    """The byte layout of one KV entry: FP8 nope dims, bf16 rope dims, UE8M0 scales, zero pad."""

    nope_dim: int = 448
    rope_dim: int = 64
    scale_group: int = 64

    def __post_init__(self) -> None:
        if self.nope_dim <= 0 or self.rope_dim < 0 or self.scale_group <= 0:
            raise ValueError(f"EntryLayout dims must be positive, got {self}")
        if self.nope_dim % self.scale_group:
            raise ValueError(
                f"EntryLayout.nope_dim {self.nope_dim} is not a multiple of scale_group {self.scale_group}"
            )

    @property
    def format(self) -> EntryFormat:
        """The one definition of the byte codec (kernels read the same bytes through it)."""
        return EntryFormat(self.nope_dim, self.rope_dim, self.scale_group)

    @property
    def head_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    @property
    def num_scales(self) -> int:
        return self.nope_dim // self.scale_group

    @property
    def rope_offset(self) -> int:
        return self.nope_dim

    @property
    def scale_offset(self) -> int:
        return self.format.scale_offset

    @property
    def nbytes(self) -> int:
        return self.format.nbytes

    def pack(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [..., head_dim] (any float dtype) -> uint8 [..., nbytes] in THE layout."""
        _check_last(kv, self.head_dim, "EntryLayout.pack kv")
        return self.format.encode(kv)

    def unpack(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 [..., nbytes] -> float32 [..., head_dim]: the dequantised entry."""
        _check_last(raw, self.nbytes, "EntryLayout.unpack raw")
        return self.format.decode(raw)


class KeyFormat(enum.Enum):
    """How indexer keys are stored: FP4 (the default, as on Blackwell) or FP8."""

    FP4 = "fp4"
    FP8 = "fp8"

    def layout(self, dim: int) -> KeyLayout:
        return KeyLayout(fmt=self, dim=dim)


@dataclass(frozen=True)
class KeyLayout:
    """The byte layout of one indexer key of `dim` dims in format `fmt`."""

    fmt: KeyFormat
    dim: int = 128

    def __post_init__(self) -> None:
        if self.fmt is KeyFormat.FP4 and (self.dim <= 0 or self.dim % FP4_SCALE_GROUP):
            raise ValueError(
                f"KeyLayout.dim {self.dim} must be a positive multiple of {FP4_SCALE_GROUP} for FP4"
            )
        if self.dim <= 0:
            raise ValueError(f"KeyLayout.dim must be positive, got {self.dim}")

    @property
    def nbytes(self) -> int:
        if self.fmt is KeyFormat.FP4:
            return self.dim // 2 + self.dim // FP4_SCALE_GROUP
        return self.dim + 4

    def pack(self, key: torch.Tensor) -> torch.Tensor:
        """key [..., dim] -> uint8 [..., nbytes]."""
        _check_last(key, self.dim, "KeyLayout.pack key")
        out = torch.empty(*key.shape[:-1], self.nbytes, dtype=torch.uint8, device=key.device)
        if self.fmt is KeyFormat.FP4:
            packed, e = fp4_e2m1_quantize(key, FP4_SCALE_GROUP)
            out[..., : self.dim // 2] = packed
            out[..., self.dim // 2 :] = e
        else:
            q, e = fp8_e4m3_quantize(key, self.dim)
            out[..., : self.dim] = q.view(torch.uint8)
            out[..., self.dim :] = ue8m0_scale(e).contiguous().view(torch.uint8)
        return out

    def unpack(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 [..., nbytes] -> float32 [..., dim]: the dequantised key."""
        _check_last(raw, self.nbytes, "KeyLayout.unpack raw")
        raw = raw.contiguous()
        if self.fmt is KeyFormat.FP4:
            return fp4_e2m1_dequantize(raw[..., : self.dim // 2], raw[..., self.dim // 2 :], FP4_SCALE_GROUP)
        q = raw[..., : self.dim].view(torch.float8_e4m3fn).float()
        scale = raw[..., self.dim :].contiguous().view(torch.float32)
        return q * scale
