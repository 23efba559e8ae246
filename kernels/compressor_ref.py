"""Torch reference of the compressor's gated softmax pooling (CSA with overlap, HCA without).

Rows are a compressor's raw per-token float32 projections (kv, score with the positional bias
added), `width = coff * head_dim` wide (coff = 2 with overlap), starting at token position
first_block * ratio: exactly workers.model.compressor's state rows followed by the step's new rows.
Entry j pools, per dimension, a softmax over its slots:
- no overlap (HCA): the `ratio` tokens of block j, columns [0, head_dim);
- overlap (CSA): series A (columns [0, head_dim)) of block j - 1, then series B (columns
  [head_dim, 2 head_dim)) of block j; for j == 0 the A slots are empty (kv 0, score -inf).
Prefill folds many tokens at once; a decode step folds one and finishes at most one entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PoolSpec:
    """Which entries to pool from a rows tensor: entries n_done .. n_total - 1."""

    first_block: int
    n_done: int
    n_total: int
    ratio: int
    head_dim: int
    overlap: bool

    def __post_init__(self) -> None:
        lowest = self.n_done - 1 if self.overlap else self.n_done
        if self.ratio <= 0 or self.head_dim <= 0 or self.n_total < self.n_done:
            raise ValueError(f"PoolSpec: need ratio, head_dim > 0 and n_total >= n_done, got {self}")
        if self.n_total > self.n_done and self.first_block > max(lowest, 0):
            raise ValueError(
                f"PoolSpec.first_block {self.first_block}"
                f": rows must start at or before block {max(lowest, 0)}"
            )

    @property
    def width(self) -> int:
        return (2 if self.overlap else 1) * self.head_dim

    def rows_needed(self) -> int:
        """Rows the tensors must hold: up to the end of block n_total - 1."""
        return (self.n_total - self.first_block) * self.ratio


def check_rows(kv: torch.Tensor, score: torch.Tensor, spec: PoolSpec, what: str) -> None:
    if kv.shape != score.shape or kv.dim() != 2 or kv.shape[1] != spec.width:
        raise ValueError(
            f"{what}: kv and score must both be [rows, {spec.width}],"
            f" got {tuple(kv.shape)} and {tuple(score.shape)}"
        )
    if spec.n_total > spec.n_done and kv.shape[0] < spec.rows_needed():
        raise ValueError(f"{what}: {kv.shape[0]} rows, but {spec} needs {spec.rows_needed()}")


def compress_pool(kv: torch.Tensor, score: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """Pooled entries [n_total - n_done, head_dim] float32 (before the compressor's norm and RoPE)."""
    check_rows(kv, score, spec, "compress_pool")
    m, d = spec.ratio, spec.head_dim
    n_new = spec.n_total - spec.n_done
    if n_new == 0:
        return torch.zeros(0, d, dtype=torch.float32, device=kv.device)
    n_blocks = spec.n_total - spec.first_block
    kvb = kv[: n_blocks * m].float().view(n_blocks, m, spec.width)
    sb = score[: n_blocks * m].float().view(n_blocks, m, spec.width)
    lo = spec.n_done - spec.first_block
    if spec.overlap:
        j = torch.arange(spec.n_done, spec.n_total, device=kv.device)
        src = (j - 1 - spec.first_block).clamp(min=0)
        has_prev = (j > 0)[:, None, None]
        prev_kv = torch.where(has_prev, kvb[src, :, :d], torch.zeros_like(kvb[src, :, :d]))
        prev_s = torch.where(has_prev, sb[src, :, :d], torch.full_like(sb[src, :, :d], float("-inf")))
        slots_kv = torch.cat([prev_kv, kvb[lo:, :, d:]], dim=1)
        slots_s = torch.cat([prev_s, sb[lo:, :, d:]], dim=1)
    else:
        slots_kv, slots_s = kvb[lo:], sb[lo:]
    return (slots_kv * slots_s.softmax(dim=1)).sum(dim=1)


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
    """B sequences' rows at once: kv, score [B, R, width]; first_block, n_done, n_total int [B].

    Returns [B, max(n_total - n_done), head_dim] float32: row i of sequence b is its entry
    n_done[b] + i (compress_pool of its rows); rows past n_total[b] - n_done[b] are 0.
    """
    specs = [
        PoolSpec(int(f), int(d), int(t), ratio, head_dim, overlap)
        for f, d, t in zip(first_block.tolist(), n_done.tolist(), n_total.tolist(), strict=True)
    ]
    if len(specs) != kv.shape[0]:
        raise ValueError(f"compress_pool_batched: {len(specs)} specs for a batch of {kv.shape[0]}")
    max_new = max((s.n_total - s.n_done for s in specs), default=0)
    out = torch.zeros(kv.shape[0], max_new, head_dim, dtype=torch.float32, device=kv.device)
    for b, spec in enumerate(specs):
        pooled = compress_pool(kv[b], score[b], spec)
        out[b, : pooled.shape[0]] = pooled
    return out
