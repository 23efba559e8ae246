"""A `ModelCache` overlay that holds a step's writes for some sequences instead of committing them.

Speculative decoding verifies k draft tokens in one forward over k + 1 positions, but only a
prefix of them (the accepted drafts) may stay in the cache. Rolling the real cache back is not
possible in general: a compressor folds rows into running accumulators (HCA) or drops the rows a
finished entry no longer needs, and a bounded window forgets its oldest rows. So the verify step
runs on a `StagedCache`: for the `staged` sequences every write (window rows, entries, compressor
state, `advance`) is kept here, reads see the base cache plus what is kept, and `commit(seq, n)`
then replays into the base cache exactly what a step over the first n positions would have written:
- window: the first n rows;
- entries: those whose last token is among the first n positions (entry j of ratio r ends at
  position r * (j + 1) - 1);
- compressor state: the state after position pos0 + n - 1. A staged sequence's compressor state
  is read with `record` set, so the compressor folds the step one position at a time and returns
  the state after each position (`CompressorState.trail`: small, the accumulators or the few
  rows); the commit keeps the n-th. Every length is therefore committable.
Other sequences write through to the base cache as usual. `discard(seq)` forgets a staged
sequence (a draft pass whose writes must not survive).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from workers.model.cache import CompressorState, EntryKind, ModelCache
from workers.model.compressor import Compressor


@dataclass
class _Staged:
    """What one staged sequence wrote during the step (per layer, in first-write order)."""

    pos0: int
    layers: list[int] = field(default_factory=list)
    window: dict[int, torch.Tensor] = field(default_factory=dict)
    entries: dict[tuple[int, EntryKind], torch.Tensor] = field(default_factory=dict)
    after: dict[tuple[int, EntryKind], CompressorState] = field(default_factory=dict)
    advanced: int = 0

    def touch(self, layer: int) -> None:
        if layer not in self.layers:
            self.layers.append(layer)


class StagedCache:
    """ModelCache over `base` that stages the writes of `staged` sequences (module docstring).

    `window`: the model's window (rows a layer keeps); `compressors`: (layer, kind) -> the
    compressor module of that series (its ratio says which entries a commit keeps)."""

    def __init__(self, base: ModelCache, window: int, compressors: Mapping[tuple[int, EntryKind], Compressor],
                 staged: Iterable[int]) -> None:
        self.base, self.window_size, self.compressors = base, window, compressors
        self._staged: dict[int, _Staged] = {s: _Staged(base.length(s)) for s in staged}

    # --- reads ---------------------------------------------------------------------------------
    def length(self, seq: int) -> int:
        return self.base.length(seq)

    def window(self, layer: int, seq: int) -> torch.Tensor:
        st = self._staged.get(seq)
        mine = None if st is None else st.window.get(layer)
        if mine is None:
            return self.base.window(layer, seq)
        old = self.base.window(layer, seq) if st is not None and st.pos0 > 0 else mine[:0]
        return torch.cat([old.to(mine.dtype), mine], dim=0)[-self.window_size:]

    def entries(self, layer: int, seq: int, kind: EntryKind) -> torch.Tensor:
        st = self._staged.get(seq)
        old = self.base.entries(layer, seq, kind)
        mine = None if st is None else st.entries.get((layer, kind))
        return old if mine is None else torch.cat([old, mine.to(old.dtype)], dim=0)

    def compressor_state(self, layer: int, seq: int, kind: EntryKind) -> CompressorState | None:
        st = self._staged.get(seq)
        if st is None:
            return self.base.compressor_state(layer, seq, kind)
        if (layer, kind) in st.after:
            return st.after[(layer, kind)]
        state = self.base.compressor_state(layer, seq, kind)
        # The compressor then returns the state after each of the step's positions (commit).
        return None if state is None else dataclasses.replace(state, record=True)

    # --- writes --------------------------------------------------------------------------------
    def append_window(self, layer: int, seq: int, kv: torch.Tensor) -> None:
        st = self._staged.get(seq)
        if st is None:
            self.base.append_window(layer, seq, kv)
            return
        st.touch(layer)
        old = st.window.get(layer)
        st.window[layer] = kv.clone() if old is None else torch.cat([old, kv], dim=0)

    def append_entries(self, layer: int, seq: int, kind: EntryKind, entries: torch.Tensor) -> None:
        st = self._staged.get(seq)
        if st is None:
            self.base.append_entries(layer, seq, kind, entries)
            return
        st.touch(layer)
        old = st.entries.get((layer, kind))
        st.entries[(layer, kind)] = entries.clone() if old is None else torch.cat([old, entries], dim=0)

    def set_compressor_state(self, layer: int, seq: int, kind: EntryKind, state: CompressorState) -> None:
        st = self._staged.get(seq)
        if st is None:
            self.base.set_compressor_state(layer, seq, kind, state)
            return
        st.touch(layer)
        st.after[(layer, kind)] = state

    def advance(self, seq: int, n: int) -> None:
        st = self._staged.get(seq)
        if st is None:
            self.base.advance(seq, n)
        else:
            st.advanced += n

    # --- the outcome ---------------------------------------------------------------------------
    def discard(self, seq: int) -> None:
        """Forget what staged sequence `seq` wrote: the base cache never sees it."""
        self._take(seq)

    def commit(self, seq: int, n: int) -> None:
        """Write the first `n` positions of staged `seq`'s step into the base cache, as a step over
        just those positions would have, and advance it by n. Raises naming the layer when a
        compressor state has no per-position trail (it had no state before the step)."""
        st = self._take(seq)
        if not 0 < n <= st.advanced:
            raise ValueError(f"commit: sequence {seq} staged {st.advanced} positions; cannot keep {n}")
        end = st.pos0 + n
        for layer in st.layers:
            for kind in (EntryKind.ATTN, EntryKind.INDEX):
                if (layer, kind) not in st.after:
                    continue
                comp = self._compressor(layer, kind)
                new = st.entries.get((layer, kind))
                keep = end // comp.ratio - st.pos0 // comp.ratio
                if new is not None:
                    self.base.append_entries(layer, seq, kind, new[:keep])
                self.base.set_compressor_state(layer, seq, kind, self._state_at(st, layer, kind, n))
            rows = st.window.get(layer)
            if rows is not None:
                self.base.append_window(layer, seq, rows[:n])
        self.base.advance(seq, n)

    def _take(self, seq: int) -> _Staged:
        st = self._staged.pop(seq, None)
        if st is None:
            raise KeyError(f"sequence {seq} is not staged in this StagedCache")
        return st

    def _compressor(self, layer: int, kind: EntryKind) -> Compressor:
        comp = self.compressors.get((layer, kind))
        if comp is None:
            raise KeyError(f"StagedCache: no compressor given for layer {layer} {kind.value}")
        return comp

    @staticmethod
    def _state_at(st: _Staged, layer: int, kind: EntryKind, n: int) -> CompressorState:
        """The compressor state after the step's first n positions (its recorded trail)."""
        trail = st.after[(layer, kind)].trail
        if len(trail) != st.advanced:
            raise ValueError(
                f"commit: layer {layer} {kind.value} compressor state has {len(trail)} recorded positions, "
                f"the step staged {st.advanced} (from position {st.pos0}; no state before the step?)"
            )
        return trail[n - 1].clone()
