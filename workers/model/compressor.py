"""KV compressor: one entry per `ratio` tokens, a learned softmax pooling per dimension.

Per token: kv = wkv(x), score = wgate(x) + ape[position % ratio], both fp32 and `coff * dim`
wide (coff = 2 when overlapping, i.e. ratio 4 in CSA and its indexer; else 1).
- No overlap (HCA, ratio 128): entry j = sum over tokens of block j of softmax(score) * kv.
- Overlap (CSA): series A = outputs [0, dim) and B = [dim, 2 dim). Entry j pools, per
  dimension, 2 * ratio slots: series A of block j-1 and series B of block j (block -1 is empty).
Then RMSNorm, and RoPE on the last rope dims at position ratio * j.
Entry j is finished once token ratio * (j + 1) - 1 has been seen; queries at position t may see
entries j < (t + 1) // ratio.

The same code serves prefill chunks and decode steps (see cache.CompressorState):
- overlap: the state holds the raw rows still needed, the new rows are appended, and every newly
  finished entry is pooled from rows (kernel op);
- no overlap: the state holds the unfinished block's running softmax accumulators. A step folds
  its rows up to the end of that block into them and finishes it from them; the whole blocks
  inside the step are pooled from rows (kernel op, exactly as a one-shot prefill), and the rows
  of its last, unfinished block start a new accumulator.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernels import ops
from kernels.compressor_ref import PoolSpec
from workers.model import running_pool
from workers.model.cache import CompressorState, RunningPool
from workers.model.layers import Linear, RMSNorm, wide
from workers.model.rope import Rope


class Compressor(nn.Module):
    """Compressor of width `head_dim` with ratio `ratio` (overlapping iff `overlap`)."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        coff = 2 if overlap else 1
        self.width = coff * head_dim
        # Compressor projections are BF16 in the checkpoint and run in fp32: no FP8 input.
        self.wkv = Linear(dim, self.width, quantised_input=False, sim=False, dtype=torch.float32)
        self.wgate = Linear(dim, self.width, quantised_input=False, sim=False, dtype=torch.float32)
        self.ape = nn.Parameter(torch.zeros(ratio, self.width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps)

    def state_start(self, n_entries: int) -> int:
        """First position the state must keep once `n_entries` entries are finished."""
        first_block = max(n_entries - 1, 0) if self.overlap else n_entries
        return first_block * self.ratio

    def empty_state(self, device: torch.device | str, dtype: torch.dtype) -> CompressorState:
        """The state before any token: rows with overlap, running accumulators without."""
        build = CompressorState.empty if self.overlap else CompressorState.empty_pooled
        return build(self.width, device, dtype)

    def forward(
        self, x: torch.Tensor, state: CompressorState, rope: Rope
    ) -> tuple[torch.Tensor, CompressorState]:
        """Fold tokens x [T, dim] (positions state.end ..) in; return (new entries [n, head_dim], state).

        Entries are normalised and rotated, in x's dtype, before any KV quantisation. With
        `state.record` the step runs one position at a time and the new state's `trail` holds the
        state after each position.
        """
        m = self.ratio
        n_done = state.end // m
        if state.start != self.state_start(n_done):
            raise ValueError(
                f"compressor state starts at {state.start}, expected {self.state_start(n_done)} "
                f"for {n_done} finished entries (ratio {m})"
            )
        if (state.pool is None) != self.overlap:
            form = "rows" if state.pool is None else "running accumulators"
            raise ValueError(f"compressor (ratio {m}, overlap {self.overlap}) given a state in {form} form")
        xf = wide(x)
        kv_new = self.wkv(xf)
        positions = torch.arange(state.end, state.end + x.shape[0], device=x.device)
        score_new = self.wgate(xf) + self.ape[positions % m]
        if not state.record:
            return self._step(x, kv_new, score_new, state, rope)
        entries, trail = [], []
        cur = dataclasses.replace(state, record=False)
        for i in range(x.shape[0]):
            new, cur = self._step(x[i : i + 1], kv_new[i : i + 1], score_new[i : i + 1], cur, rope)
            entries.append(new)
            trail.append(cur)
        return torch.cat(entries) if entries else x.new_zeros(0, self.head_dim), dataclasses.replace(
            cur, trail=tuple(trail)
        )

    def _step(self, x: torch.Tensor, kv_new: torch.Tensor, score_new: torch.Tensor, state: CompressorState,
              rope: Rope) -> tuple[torch.Tensor, CompressorState]:
        m = self.ratio
        n_done, end = state.end // m, state.end + x.shape[0]
        n_total = end // m
        if self.overlap:
            kv = torch.cat([state.kv, kv_new], dim=0)
            score = torch.cat([state.score, score_new], dim=0)
            pooled = self._pool(kv, score, state.start // m, n_done, n_total) if n_total > n_done else None
            keep_from = self.state_start(n_total) - state.start
            new_state = CompressorState(self.state_start(n_total), kv[keep_from:].clone(),
                                        score[keep_from:].clone())
        else:
            pooled, pool = self._fold_blocks(kv_new, score_new, state.pool, n_done)
            none = kv_new.new_zeros(0, self.width)
            new_state = CompressorState(n_total * m, none, none.clone(), pool)
        if pooled is None:
            return x.new_zeros(0, self.head_dim), new_state
        entries = self.norm(pooled.to(x.dtype))
        entry_pos = torch.arange(n_done, n_total, device=x.device) * m
        return rope.apply(entries, entry_pos), new_state

    def _fold_blocks(self, kv: torch.Tensor, score: torch.Tensor, pool: RunningPool, n_done: int
                     ) -> tuple[torch.Tensor | None, RunningPool]:
        """No overlap: (pooled entries the rows finish or None, the new running accumulators).

        `pool` holds the first rows of block n_done; kv, score [T, width] continue it."""
        m, t = self.ratio, kv.shape[0]
        parts = []
        head = min(t, m - pool.count) if pool.count else 0
        if head:
            pool = running_pool.fold(pool, kv[:head], score[:head])
            if pool.count == m:
                parts.append(running_pool.value(pool)[None, :])
                pool = RunningPool.empty(self.width, kv.device, pool.max.dtype)
        whole = (t - head) // m
        if whole:
            b0 = n_done + len(parts)  # first block that lies whole in the rows
            rows = slice(head, head + whole * m)
            parts.append(self._pool(kv[rows], score[rows], b0, b0, b0 + whole))
        pool = running_pool.fold(pool, kv[head + whole * m :], score[head + whole * m :])
        return (torch.cat(parts) if parts else None), pool

    def _pool(self, kv: torch.Tensor, score: torch.Tensor, first_block: int, n_done: int, n_total: int
              ) -> torch.Tensor:
        """Softmax pooling of entries n_done .. n_total - 1 from rows starting at block first_block.

        float32 / bfloat16 models run the kernel op (torch reference on CPU, Triton on GPU);
        a float64 model (the tests' reference precision) runs the same math here in float64.
        """
        if kv.dtype != torch.float64:
            spec = PoolSpec(first_block, n_done, n_total, self.ratio, self.head_dim, self.overlap)
            return ops.compress_pool(kv, score, spec)
        m, d = self.ratio, self.head_dim
        n_blocks = n_total - first_block  # whole blocks available in the rows
        kvb = kv[: n_blocks * m].view(n_blocks, m, self.width)
        sb = score[: n_blocks * m].view(n_blocks, m, self.width)
        lo = n_done - first_block  # block index (within rows) of the first new entry
        if not self.overlap:
            return (kvb[lo:] * sb[lo:].softmax(dim=1)).sum(dim=1)
        # Slots: series A of the previous block, then series B of this block.
        has_prev = (torch.arange(n_done, n_total, device=kv.device) > 0)[:, None, None]
        src = torch.arange(lo - 1, n_blocks - 1, device=kv.device).clamp(min=0)
        prev_kv = torch.where(has_prev, kvb[src, :, :d], torch.zeros_like(kvb[src, :, :d]))
        prev_s = torch.where(has_prev, sb[src, :, :d], torch.full_like(sb[src, :, :d], float("-inf")))
        slots_kv = torch.cat([prev_kv, kvb[lo:, :, d:]], dim=1)
        slots_s = torch.cat([prev_s, sb[lo:, :, d:]], dim=1)
        return (slots_kv * slots_s.softmax(dim=1)).sum(dim=1)
