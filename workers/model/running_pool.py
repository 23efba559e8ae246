"""Running per-dimension softmax pooling: fold rows into (max, sum, weighted sum) accumulators.

A non-overlapping compressor entry (HCA) is, per dimension, sum_i softmax(score)_i * kv_i over its
block's tokens. Its unfinished part is kept as `RunningPool` (workers/model/cache.py): with
M = max score, S = sum exp(score - M) and W = sum exp(score - M) * kv, the pooled value is W / S,
and rows fold in by rescaling the old sums to the new maximum. The same code runs in float32 and
float64 (the model's compressor precision).
"""

from __future__ import annotations

import torch

from workers.model.cache import RunningPool


def fold(pool: RunningPool, kv: torch.Tensor, score: torch.Tensor) -> RunningPool:
    """`pool` with rows kv, score [n, width] (n >= 0) folded in, in pool's dtype.

    Scores must be finite: a column whose maximum stays -inf has no softmax."""
    if kv.shape != score.shape or kv.dim() != 2 or kv.shape[1] != pool.max.shape[0]:
        raise ValueError(
            f"fold: kv and score must be [n, {pool.max.shape[0]}], "
            f"got {tuple(kv.shape)} and {tuple(score.shape)}"
        )
    if kv.shape[0] == 0:
        return pool
    kv, score = kv.to(pool.max.dtype), score.to(pool.max.dtype)
    mx = torch.maximum(pool.max, score.max(dim=0).values)
    keep = torch.exp(pool.max - mx)  # 0 for an empty pool (max -inf)
    e = torch.exp(score - mx[None, :])
    return RunningPool(
        pool.count + kv.shape[0], mx, pool.sum * keep + e.sum(dim=0), pool.wsum * keep + (e * kv).sum(dim=0)
    )


def value(pool: RunningPool) -> torch.Tensor:
    """The pooled value W / S [width] of a non-empty pool."""
    if pool.count == 0:
        raise ValueError("value: the running pool is empty (count 0)")
    return pool.wsum / pool.sum
