"""A `ModelCache` overlay that holds a step's writes for some sequences instead of committing them.

Speculative decoding verifies k draft tokens in one forward over k + 1 positions, but only a
prefix of them (the accepted drafts) may stay in the cache. Rolling the real cache back is not
possible in general: a compressor that finishes an entry drops the raw rows it no longer needs,
and a bounded window forgets its oldest rows. So the verify step runs on a `StagedCache`: for the
`staged` sequences every write (window rows, entries, compressor state, `advance`) is kept here,
reads see the base cache plus what is kept, and `commit(seq, n)` then replays into the base
cache exactly what a step over the first n positions would have written:
- window: the first n rows;
- entries: those whose last token is among the first n positions (entry j of ratio r ends at
  position r * (j + 1) - 1);
- compressor state: the raw rows the compressor keeps after n positions (`Compressor.state_start`),
  cut from the state before the step and the rows the step added. They are all there when every
  entry the step finished after its first position is kept, or the new state still starts at or
  before the step's first position (see `commit_safe`); otherwise `commit` raises.
Other sequences write through to the base cache as usual. `discard(seq)` forgets a staged
sequence (a draft pass whose writes must not survive).
"""

from __future__ import annotations

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
    before: dict[tuple[int, EntryKind], CompressorState | None] = field(default_factory=dict)
    after: dict[tuple[int, EntryKind], CompressorState] = field(default_factory=dict)
    advanced: int = 0

    def touch(self, layer: int) -> None:
        if layer not in self.layers:
            self.layers.append(layer)


def commit_safe(compressors: Iterable[Compressor], pos0: int, num_positions: int) -> bool:
    """Whether a staged step over positions pos0 .. pos0 + num_positions - 1 can be committed at
    ANY length 1..num_positions with every compressor's state rebuilt exactly (see module doc)."""
    for comp in compressors:
        r = comp.ratio
        end = pos0 + num_positions
        starts_before = comp.state_start(end // r) <= pos0
        no_late_finish = end // r == (pos0 + 1) // r  # no entry ends after the first position
        if not (starts_before or no_late_finish):
            return False
    return True


class StagedCache:
    """ModelCache over `base` that stages the writes of `staged` sequences (module docstring).

    `window`: the model's window (rows a layer keeps); `compressors`: (layer, kind) -> the
    compressor module of that series (the rule for which raw rows its state keeps)."""

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
        if st is not None and (layer, kind) in st.after:
            return st.after[(layer, kind)]
        return self.base.compressor_state(layer, seq, kind)

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
        if (layer, kind) not in st.before:
            st.before[(layer, kind)] = self.base.compressor_state(layer, seq, kind)
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
        compressor state cannot be rebuilt (the step should not have been staged; `commit_safe`)."""
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
                self.base.set_compressor_state(layer, seq, kind, self._state_at(st, layer, kind, comp, end))
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
    def _state_at(st: _Staged, layer: int, kind: EntryKind, comp: Compressor, end: int) -> CompressorState:
        """The compressor state after position end - 1, from the state before the step and after it."""
        after = st.after[(layer, kind)]
        start = comp.state_start(end // comp.ratio)
        if start >= after.start:
            lo = start - after.start
            return CompressorState(start, after.kv[lo : end - after.start].clone(),
                                   after.score[lo : end - after.start].clone())
        before = st.before[(layer, kind)]
        if after.start > st.pos0 or before is None or before.end != st.pos0 or start < before.start:
            raise ValueError(
                f"commit: layer {layer} {kind.value} compressor state at {end} needs rows from {start}, "
                f"but the step's state starts at {after.start} (step from {st.pos0})"
            )
        skip = st.pos0 - after.start  # rows of `after` that `before` also holds
        kv = torch.cat([before.kv[start - before.start:], after.kv[skip : end - after.start]], dim=0)
        score = torch.cat([before.score[start - before.start:], after.score[skip : end - after.start]], dim=0)
        return CompressorState(start, kv.clone(), score.clone())
