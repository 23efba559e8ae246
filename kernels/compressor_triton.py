"""Triton compressor pooling: one program per (entry, block of dims), all slots in one tile.

Same contract as kernels.compressor_ref.compress_pool. The batched form pools many sequences'
rows in one launch (a decode step finishes at most one entry per sequence).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.buffers import new_output
from kernels.compressor_ref import PoolSpec, check_rows

TILE_ELEMENTS = 8192


@triton.jit
def _pool_kernel(
    kv_ptr, s_ptr, o_ptr, sk_b, sk_r, so_b, so_e, fb_ptr, nd_ptr, nt_ptr, D,
    RATIO: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b, i = tl.program_id(0), tl.program_id(1)
    first, n_done, n_total = tl.load(fb_ptr + b), tl.load(nd_ptr + b), tl.load(nt_ptr + b)
    j = n_done + i
    if j < n_total:
        blk = j - first
        c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        r = tl.arange(0, BLOCK_S)
        if OVERLAP:
            # Slots 0..RATIO-1: series A of block j - 1; slots RATIO..2*RATIO-1: series B of block j.
            is_a = r < RATIO
            row = tl.where(is_a, (blk - 1) * RATIO + r, blk * RATIO + r - RATIO)
            col = tl.where(is_a[:, None], c[None, :], c[None, :] + D)
            valid = (r < 2 * RATIO) & ((r >= RATIO) | (r * 0 + j > 0))
        else:
            row = blk * RATIO + r
            col = c[None, :] + 0 * r[:, None]
            valid = r < RATIO
        m = valid[:, None] & (c[None, :] < D)
        offs = b * sk_b + row[:, None].to(tl.int64) * sk_r + col
        kv = tl.load(kv_ptr + offs, mask=m, other=0.0)
        s = tl.load(s_ptr + offs, mask=m, other=float("-inf"))
        cm = c < D
        # Columns past D have no valid slot: keep their max and sum finite (they are not stored).
        mx = tl.where(cm, tl.max(s, axis=0), 0.0)
        p = tl.where(m, tl.exp(s - mx[None, :]), 0.0)
        w = p / tl.where(cm, tl.sum(p, axis=0), 1.0)[None, :]
        out = tl.sum(kv * w, axis=0)
        tl.store(o_ptr + b * so_b + i * so_e + c, out, mask=c < D)
    else:
        c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        tl.store(o_ptr + b * so_b + i * so_e + c, tl.zeros([BLOCK_D], tl.float32), mask=c < D)


def compress_pool_batched(
    kv: torch.Tensor,
    score: torch.Tensor,
    first_block: torch.Tensor,
    n_done: torch.Tensor,
    n_total: torch.Tensor,
    ratio: int,
    head_dim: int,
    overlap: bool,
) -> torch.Tensor:
    """Pool B sequences' rows at once: kv, score float32 [B, R, width]; first_block, n_done,
    n_total int [B] (per sequence, as in PoolSpec). Returns [B, max(n_total - n_done), head_dim]
    float32; row i of sequence b is entry n_done[b] + i, and rows past n_total[b] - n_done[b] are 0.
    """
    width = (2 if overlap else 1) * head_dim
    if kv.dim() != 3 or kv.shape != score.shape or kv.shape[2] != width:
        raise ValueError(
            f"compress_pool_batched: kv, score must be [B, R, {width}],"
            f" got {tuple(kv.shape)}, {tuple(score.shape)}"
        )
    bsz = kv.shape[0]
    for name, t in (("first_block", first_block), ("n_done", n_done), ("n_total", n_total)):
        if tuple(t.shape) != (bsz,):
            raise ValueError(f"compress_pool_batched: {name} must be [{bsz}], got {tuple(t.shape)}")
    n_new = (n_total - n_done).long()
    if bool((n_new < 0).any()):
        raise ValueError(
            f"compress_pool_batched: n_total < n_done for sequences {torch.where(n_new < 0)[0].tolist()}"
        )
    max_new = int(n_new.max()) if bsz else 0
    need = (n_total.long() - first_block.long()) * ratio
    short = (n_new > 0) & (need > kv.shape[1])
    if bool(short.any()):
        raise ValueError(
            f"compress_pool_batched"
            f": rows {kv.shape[1]} too few for sequences {torch.where(short)[0].tolist()}"
        )
    out = new_output((bsz, max_new, head_dim), torch.float32, kv.device)
    if max_new:
        kvc, sc = kv.float().contiguous(), score.float().contiguous()
        block_s = triton.next_power_of_2((2 if overlap else 1) * ratio)
        # About 8K slot values per program: all 512 dims of a CSA entry, 64 of an HCA entry.
        block_d = min(triton.next_power_of_2(head_dim), max(16, TILE_ELEMENTS // block_s))
        grid = (bsz, max_new, triton.cdiv(head_dim, block_d))
        _pool_kernel[grid](
            kvc, sc, out, kvc.stride(0), kvc.stride(1), out.stride(0), out.stride(1),
            first_block.to(torch.int32).contiguous(), n_done.to(torch.int32).contiguous(),
            n_total.to(torch.int32).contiguous(), head_dim,
            RATIO=ratio, OVERLAP=overlap, BLOCK_S=block_s,
            BLOCK_D=block_d,
        )  # fmt: skip
    return out


def compress_pool(kv: torch.Tensor, score: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """Triton twin of kernels.compressor_ref.compress_pool (same contract)."""
    check_rows(kv, score, spec, "compress_pool")

    def one(v: int) -> torch.Tensor:
        return torch.tensor([v], dtype=torch.int32, device=kv.device)

    out = compress_pool_batched(
        kv[None], score[None], one(spec.first_block), one(spec.n_done), one(spec.n_total),
        spec.ratio, spec.head_dim, spec.overlap,
    )  # fmt: skip
    return out[0]
