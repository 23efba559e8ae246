"""The cached KV entry as kernels see it: one uint8 row per token / compressed entry.

Layout (THE one definition: workers/kv/entry.py's EntryLayout delegates to it; 584 bytes in V4):
  bytes [0, nope)                     nope dims, FP8 e4m3
  bytes [nope, nope + 2 * rope)       rope dims, bf16 (little-endian)
  bytes [.., .. + nope / group)       one UE8M0 exponent per `group` nope dims (scale 2**(e - 127))
  zero pad to a multiple of 8 bytes
Pools hand kernels a strided uint8 view [pages, slots, nbytes] (stride(2) == 1) and a block table
[batch, logical pages] of physical page ids: logical item i of a sequence lives in page
table[b, i // slots], slot i % slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.quant import fp8_e4m3_dequantize, fp8_e4m3_quantize


@dataclass(frozen=True)
class EntryFormat:
    """Byte layout of one KV entry (nope FP8 + rope bf16 + UE8M0 scales + pad)."""

    nope_dim: int = 448
    rope_dim: int = 64
    group: int = 64

    def __post_init__(self) -> None:
        if self.nope_dim <= 0 or self.rope_dim <= 0 or self.group <= 0 or self.nope_dim % self.group:
            raise ValueError(f"EntryFormat: nope_dim must be a positive multiple of group, got {self}")

    @property
    def head_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    @property
    def scale_offset(self) -> int:
        return self.nope_dim + 2 * self.rope_dim

    @property
    def nbytes(self) -> int:
        return -(-(self.scale_offset + self.nope_dim // self.group) // 8) * 8

    def check_pool(self, pool: torch.Tensor, what: str) -> None:
        """Raise unless `pool` is a uint8 [pages, slots, nbytes] view with unit byte stride."""
        if (
            pool.dtype != torch.uint8
            or pool.dim() != 3
            or pool.shape[2] != self.nbytes
            or pool.stride(2) != 1
        ):
            raise ValueError(
                f"{what}: want a uint8 [pages, slots, {self.nbytes}] view with stride(2) == 1, "
                f"got {pool.dtype} {tuple(pool.shape)} strides {pool.stride()}"
            )

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """Reference encode: kv [..., head_dim] (any float dtype) -> uint8 [..., nbytes]."""
        if kv.shape[-1] != self.head_dim:
            raise ValueError(f"EntryFormat.encode: last dim of {tuple(kv.shape)} must be {self.head_dim}")
        q, e = fp8_e4m3_quantize(kv[..., : self.nope_dim], self.group)
        rope = kv[..., self.nope_dim :].to(torch.bfloat16).contiguous()
        out = torch.zeros(*kv.shape[:-1], self.nbytes, dtype=torch.uint8, device=kv.device)
        out[..., : self.nope_dim] = q.view(torch.uint8)
        out[..., self.nope_dim : self.scale_offset] = rope.view(torch.uint8)
        out[..., self.scale_offset : self.scale_offset + self.nope_dim // self.group] = e
        return out

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Reference decode: uint8 [..., nbytes] -> float32 [..., head_dim]."""
        if raw.shape[-1] != self.nbytes:
            raise ValueError(f"EntryFormat.decode: last dim of {tuple(raw.shape)} must be {self.nbytes}")
        raw = raw.contiguous()
        q = raw[..., : self.nope_dim].contiguous().view(torch.float8_e4m3fn)
        e = raw[..., self.scale_offset : self.scale_offset + self.nope_dim // self.group]
        nope = fp8_e4m3_dequantize(q, e, self.group)
        rope = raw[..., self.nope_dim : self.scale_offset].contiguous().view(torch.bfloat16).float()
        return torch.cat([nope, rope], dim=-1)


def gather_paged(pool: torch.Tensor, table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Reference gather: rows of logical `items` [n] (all >= 0) through block-table row `table` [pages]."""
    slots = pool.shape[1]
    pages = table[items // slots].long()
    return pool[pages, items % slots]
