"""The narrow interface between the model and whatever holds its per-sequence state.

The model reads and writes KV state ONLY through `ModelCache`. The paged pools of `workers/kv/`
implement the same protocol; `ContiguousCache` here is the simple reference implementation.

What is stored, per sequence and per layer (main layers 0..L-1, then MTP layers L..L+M-1):
- every layer: the SWA window -- the KV vectors [head_dim] of the last `window` tokens (RoPE
  applied; with quant_sim the nope dims are FP8 values and the rope dims BF16 values, so each
  vector fits the 584-byte layout exactly);
- CSA / HCA layers: compressed entries (EntryKind.ATTN, [head_dim] each, one per `ratio` tokens,
  same numerics as the window);
- CSA layers: indexer keys (EntryKind.INDEX, [index_head_dim] each, one per 4 tokens, already
  Hadamard-rotated and FP4-valued under quant_sim);
- CSA / HCA layers: compressor state per compressor (EntryKind.ATTN, and EntryKind.INDEX for the
  CSA indexer) of the tokens not yet folded into a finished entry -- CSA: the raw fp32
  projections (kv, score + positional bias) of the last <= 2 * ratio - 1 tokens (the overlap half
  included); HCA: running softmax accumulators (`RunningPool`) of the unfinished block's < ratio
  tokens, 3 x width values however many tokens they hold.
How the model uses it: a forward step over T new tokens of a sequence (prefill chunk: T >= 1;
decode: T = 1, for each sequence of a batch) reads the window, appends the T new KV vectors,
reads the compressor state, appends the entries that the T tokens complete, replaces the state,
then reads all entries. After every layer has run, the model calls `advance(seq, T)`.
Nothing is ever removed except by the window's own truncation and `free`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


class EntryKind(enum.Enum):
    """Which compressed series: the attention's entries or the CSA indexer's keys."""

    ATTN = "attn"
    INDEX = "index"


@dataclass(frozen=True)
class RunningPool:
    """A per-dimension softmax pooling of `count` rows, kept as running accumulators [width]:
    `max` of the scores, `sum` of exp(score - max) and `wsum` of exp(score - max) * kv. The pooled
    value of the rows is wsum / sum. With count == 0: max = -inf, sum = wsum = 0."""

    count: int
    max: torch.Tensor
    sum: torch.Tensor
    wsum: torch.Tensor

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"RunningPool.count = {self.count} must be >= 0")
        if not (self.max.dim() == 1 and self.max.shape == self.sum.shape == self.wsum.shape):
            raise ValueError(
                f"RunningPool: max, sum, wsum must be equal 1-D shapes, got {tuple(self.max.shape)}, "
                f"{tuple(self.sum.shape)}, {tuple(self.wsum.shape)}"
            )

    @staticmethod
    def empty(width: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> RunningPool:
        z = torch.zeros(width, dtype=dtype, device=device)
        return RunningPool(0, torch.full_like(z, float("-inf")), z, z.clone())

    def clone(self) -> RunningPool:
        return RunningPool(self.count, self.max.clone(), self.sum.clone(), self.wsum.clone())


@dataclass(frozen=True)
class CompressorState:
    """What a compressor still needs of the tokens from absolute position `start` (a multiple of
    the compression ratio) to `end`, in one of two forms:
    - rows (overlapping compressors, CSA): kv, score [n, width] float32 (float64 in a float64
      model), the raw projections of positions start .. start + n - 1, score including the
      positional bias `ape`; `pool` is None;
    - pooled (non-overlapping compressors, HCA): `pool` holds the running softmax accumulators of
      positions start .. start + pool.count - 1, and kv, score have 0 rows.
    `record` asks the compressor to fold the next step one position at a time and return, in
    the new state's `trail`, the state after each of its positions (speculative verification
    keeps a prefix of the step: workers/engine/staged_cache.py). Trail states have no trail.
    """

    start: int
    kv: torch.Tensor
    score: torch.Tensor
    pool: RunningPool | None = None
    record: bool = False
    trail: tuple[CompressorState, ...] = ()

    def __post_init__(self) -> None:
        if self.kv.shape != self.score.shape or self.kv.dim() != 2:
            raise ValueError(
                f"CompressorState: kv and score must be equal [n, width] shapes, got "
                f"{tuple(self.kv.shape)} and {tuple(self.score.shape)}"
            )
        if self.pool is not None and self.kv.shape[0]:
            raise ValueError(f"CompressorState: a pooled state holds no rows, got {self.kv.shape[0]}")

    @property
    def end(self) -> int:
        return self.start + self.kv.shape[0] + (self.pool.count if self.pool is not None else 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors that carry the state (rows, or the three accumulators)."""
        tensors = [self.kv, self.score]
        if self.pool is not None:
            tensors += [self.pool.max, self.pool.sum, self.pool.wsum]
        return sum(t.numel() * t.element_size() for t in tensors)

    def clone(self) -> CompressorState:
        """A deep copy without `record` and `trail` (what a cache or a handoff keeps)."""
        pool = None if self.pool is None else self.pool.clone()
        return CompressorState(self.start, self.kv.clone(), self.score.clone(), pool)

    @staticmethod
    def empty(width: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> CompressorState:
        """The rows form before any token."""
        z = torch.zeros(0, width, dtype=dtype, device=device)
        return CompressorState(0, z, z.clone())

    @staticmethod
    def empty_pooled(width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> CompressorState:
        """The pooled form before any token."""
        z = torch.zeros(0, width, dtype=dtype, device=device)
        return CompressorState(0, z, z.clone(), RunningPool.empty(width, device, dtype))


@runtime_checkable
class ModelCache(Protocol):
    """Per-sequence model state, addressed by (layer, sequence id). See the module docstring."""

    def length(self, seq: int) -> int:
        """Tokens of `seq` whose state every layer holds (0 for an unknown sequence)."""
        ...

    def window(self, layer: int, seq: int) -> torch.Tensor:
        """KV of the last min(length, window) tokens, oldest first: [w, head_dim].

        The model calls it only when length(seq) > 0.
        """
        ...

    def append_window(self, layer: int, seq: int, kv: torch.Tensor) -> None:
        """Add the KV [T, head_dim] of the step's tokens; only the last `window` need be kept."""
        ...

    def entries(self, layer: int, seq: int, kind: EntryKind) -> torch.Tensor:
        """All compressed entries / indexer keys so far, in order: [n, dim]."""
        ...

    def append_entries(self, layer: int, seq: int, kind: EntryKind, entries: torch.Tensor) -> None:
        """Add finished entries [n, dim] (n may be 0)."""
        ...

    def compressor_state(self, layer: int, seq: int, kind: EntryKind) -> CompressorState | None:
        """The compressor state, or None before the sequence's first step in this layer."""
        ...

    def set_compressor_state(self, layer: int, seq: int, kind: EntryKind, state: CompressorState) -> None:
        """Replace the compressor state."""
        ...

    def advance(self, seq: int, n: int) -> None:
        """Record that every layer has written the state of `n` more tokens of `seq`."""
        ...


class ContiguousCache:
    """ModelCache on plain growing tensors, one set per (layer, sequence). Reference, not fast."""

    def __init__(self, window: int) -> None:
        self.window_size = window
        self._len: dict[int, int] = {}
        self._win: dict[tuple[int, int], torch.Tensor] = {}
        self._ent: dict[tuple[int, int, EntryKind], torch.Tensor] = {}
        self._state: dict[tuple[int, int, EntryKind], CompressorState] = {}

    def length(self, seq: int) -> int:
        return self._len.get(seq, 0)

    def window(self, layer: int, seq: int) -> torch.Tensor:
        w = self._win.get((layer, seq))
        if w is None:
            raise KeyError(f"no window for layer {layer}, sequence {seq}: call append_window first")
        return w

    def append_window(self, layer: int, seq: int, kv: torch.Tensor) -> None:
        old = self._win.get((layer, seq))
        full = kv if old is None else torch.cat([old, kv], dim=0)
        self._win[(layer, seq)] = full[-self.window_size :].clone()

    def entries(self, layer: int, seq: int, kind: EntryKind) -> torch.Tensor:
        e = self._ent.get((layer, seq, kind))
        if e is None:
            raise KeyError(f"no {kind.value} entries for layer {layer}, sequence {seq}")
        return e

    def append_entries(self, layer: int, seq: int, kind: EntryKind, entries: torch.Tensor) -> None:
        old = self._ent.get((layer, seq, kind))
        self._ent[(layer, seq, kind)] = entries.clone() if old is None else torch.cat([old, entries], dim=0)

    def compressor_state(self, layer: int, seq: int, kind: EntryKind) -> CompressorState | None:
        return self._state.get((layer, seq, kind))

    def set_compressor_state(self, layer: int, seq: int, kind: EntryKind, state: CompressorState) -> None:
        self._state[(layer, seq, kind)] = state

    def advance(self, seq: int, n: int) -> None:
        if n < 0:
            raise ValueError(f"advance: n = {n} must be >= 0")
        self._len[seq] = self._len.get(seq, 0) + n

    def free(self, seq: int) -> None:
        """Drop every piece of state of `seq`."""
        self._len.pop(seq, None)
        for d in (self._win, self._ent, self._state):
            for k in [k for k in d if k[1] == seq]:
                del d[k]
