"""PagedModelCache: the model's `ModelCache` protocol on the paged pools of a KvCacheManager.

Everything the model stores goes through THE byte layouts (workers/kv/entry.py): window KV and
compressed entries as 584-byte entries, indexer keys as FP4 (or FP8) keys, compressor state as
fp32 (kv, score) rows (CSA) or fp32 running softmax accumulators (HCA). With the model's quant_sim
on (the real numerics) entries and keys are already representable, so reads return exactly what
was written; compressor state is kept in fp32 (a float64 test model's state is rounded to fp32
here; accumulators are first rescaled to their rounded maximum so they stay consistent).

Positions: each layer's window is an append log like the contiguous cache's; a main-layer write
at the sequence's length starts a step, and a layer written after the step (the MTP layer) writes
the step's positions. The first main-layer write of a step settles the previous one (so the MTP
layer can still read and write the previous window until then): the boundary at a block end is
registered for prefix hits once every layer's window and every compressor's state reached it.

Sequences must be admitted (`admit`) before the model touches them; `admit` takes a prefix hit
and restores what the boundary needs, so the model then computes only the tokens after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tandem.blocks import block_hashes
from workers.kv.entry import EntryLayout, KeyLayout
from workers.kv.geometry import LayerKind, Part, PoolKind
from workers.kv.manager import Admission, KvCacheManager
from workers.model.cache import CompressorState, EntryKind, RunningPool

_ENTRY_PART = {EntryKind.ATTN: Part.ENTRY, EntryKind.INDEX: Part.KEY}
_STATE_PART = {EntryKind.ATTN: Part.STATE, EntryKind.INDEX: Part.INDEX_STATE}
_BOUNDARY_PART = {EntryKind.ATTN: Part.BOUNDARY_STATE, EntryKind.INDEX: Part.BOUNDARY_INDEX_STATE}


@dataclass(frozen=True)
class _StateMeta:
    start: int
    rows: int  # positions the state holds from start (raw rows for CSA, folded ones for HCA)


@dataclass
class _SeqMeta:
    cursor: list[int]  # per layer: window positions written
    entries: dict[tuple[int, EntryKind], int] = field(default_factory=dict)
    states: dict[tuple[int, EntryKind], _StateMeta] = field(default_factory=dict)
    settled: int = 0  # the length the last settle saw


class PagedModelCache:
    """ModelCache over `manager`'s pools. `num_main_layers`: layers before the MTP layers;
    `dtype`: the model's activation dtype (what window and entries are returned in)."""

    def __init__(
        self, manager: KvCacheManager, num_main_layers: int, dtype: torch.dtype = torch.float32
    ) -> None:
        self.m = manager
        self.shape = manager.geometry.shape
        self.kinds = self.shape.kinds
        if not 0 < num_main_layers <= len(self.kinds):
            raise ValueError(f"num_main_layers {num_main_layers} outside 1..{len(self.kinds)} cache layers")
        self.num_main_layers = num_main_layers
        self.dtype = dtype
        self.state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.W = manager.window_tokens
        self.block = manager.block_size
        self._entry: EntryLayout = self.shape.entry
        self._key: KeyLayout = self.shape.key
        self._seqs: dict[int, _SeqMeta] = {}

    # --- admission and end ---------------------------------------------------------------------
    def admit(
        self, seq: int, token_ids: Sequence[int], max_len: int, salt: str | bytes | None = None
    ) -> Admission:
        """Admit `seq` with its prompt; on a prefix hit of k blocks the sequence starts at 256*k
        with the cached entries, keys, window and compressor states in place."""
        hashes = block_hashes(list(token_ids), salt=salt, block_size=self.block)
        adm = self.m.admit(seq, hashes, len(token_ids), max_len)
        meta = _SeqMeta([adm.hit_tokens] * len(self.kinds), settled=adm.hit_tokens)
        self._seqs[seq] = meta
        if adm.hit_blocks:
            self._restore(seq, meta, adm.hit_tokens)
        return adm

    def _restore(self, seq: int, meta: _SeqMeta, b: int) -> None:
        win_page = self.m.window_pages(seq)[b // self.W - 1]
        state_page = self.m.state_page(seq)
        for layer, kind in enumerate(self.kinds):
            for ek in self._compressors(kind):
                meta.entries[(layer, ek)] = b // kind.value
                rows = kind.value if kind is LayerKind.CSA else 0  # at a window multiple (see geometry)
                if rows:
                    src = self.m.pools[PoolKind.WINDOW].view(layer, _BOUNDARY_PART[ek])[win_page, :rows]
                    self.m.pools[PoolKind.STATE].view(layer, _STATE_PART[ek])[state_page, :rows] = src
                meta.states[(layer, ek)] = _StateMeta(b - rows, rows)

    def adopt(self, seq: int, length: int) -> None:
        """`seq` (admitted) had its pages for `length` tokens filled from elsewhere (a KV handoff:
        block pages, the window pages of its last W tokens, the state page): from now on it holds
        `length` tokens, as if every layer had written them. The state rows follow the model's rule
        (workers/model/compressor.py): CSA keeps from the block before its last finished entry,
        HCA from its last finished entry."""
        meta = self._get(seq)
        if length < self.m.length(seq):
            raise ValueError(f"adopt: sequence {seq} already holds {self.m.length(seq)} > {length} tokens")
        self.m.ensure(seq, length)
        meta.cursor = [length] * len(self.kinds)
        for layer, kind in enumerate(self.kinds):
            for ek in self._compressors(kind):
                m = kind.value
                done = length // m
                start = max(done - 1, 0) * m if kind is LayerKind.CSA else done * m
                meta.entries[(layer, ek)] = done
                meta.states[(layer, ek)] = _StateMeta(start, length - start)
        self.m.advance(seq, length, boundary_state_written=False, settle=False, pulled=True)

    def free(self, seq: int) -> None:
        """The sequence ended: settle it (its last boundary can still be cached) and drop it."""
        meta = self._get(seq)
        if meta.settled != self.m.length(seq):
            self._settle(seq, meta)
        del self._seqs[seq]
        self.m.free(seq)

    @staticmethod
    def _compressors(kind: LayerKind) -> tuple[EntryKind, ...]:
        if kind is LayerKind.CSA:
            return (EntryKind.ATTN, EntryKind.INDEX)
        return (EntryKind.ATTN,) if kind is LayerKind.HCA else ()

    def _get(self, seq: int) -> _SeqMeta:
        meta = self._seqs.get(seq)
        if meta is None:
            raise KeyError(f"sequence {seq} is not admitted to the paged cache: call admit first")
        return meta

    def _writing(self, layer: int, seq: int) -> _SeqMeta:
        """Meta of `seq` for a write by `layer`; a main layer's write settles the previous step."""
        meta = self._get(seq)
        if layer < self.num_main_layers and meta.settled != self.m.length(seq):
            self._settle(seq, meta)
        return meta

    def _settle(self, seq: int, meta: _SeqMeta) -> None:
        n = self.m.length(seq)
        ready = n > 0 and n % self.block == 0 and all(c == n for c in meta.cursor)
        for layer, kind in enumerate(self.kinds):
            for ek in self._compressors(kind):
                st = meta.states.get((layer, ek))
                # At a block end the model's state is exactly what a boundary page holds.
                want = kind.value if kind is LayerKind.CSA else 0
                ready = ready and st is not None and st.start + st.rows == n and st.rows == want
        if ready:  # copy the compressor states at n into the window page that ends at n
            win_page = self.m.window_pages(seq)[n // self.W - 1]
            state_page = self.m.state_page(seq)
            for layer, kind in enumerate(self.kinds):
                for ek in self._compressors(kind):
                    rows = meta.states[(layer, ek)].rows
                    if rows:
                        src = self.m.pools[PoolKind.STATE].view(layer, _STATE_PART[ek])[state_page, :rows]
                        self.m.pools[PoolKind.WINDOW].view(layer, _BOUNDARY_PART[ek])[win_page, :rows] = src
        self.m.settle(seq, boundary_state_written=ready)
        meta.settled = n

    # --- ModelCache ----------------------------------------------------------------------------
    def length(self, seq: int) -> int:
        return self.m.length(seq)

    def _read_rows(self, seq: int, layer: int, lo: int, hi: int) -> torch.Tensor:
        """Packed window rows of positions [lo, hi) (held pages): uint8 [hi - lo, entry bytes]."""
        pages = self.m.window_pages(seq)
        idx = list(range(lo // self.W, (hi - 1) // self.W + 1))
        view = self.m.pools[PoolKind.WINDOW].view(layer, Part.WINDOW)
        rows = view[torch.tensor([pages[i] for i in idx])].reshape(-1, self._entry.nbytes)
        first = idx[0] * self.W
        return rows[lo - first : hi - first]

    def _write_rows(self, seq: int, layer: int, lo: int, packed: torch.Tensor) -> None:
        """Write packed rows at positions lo.. (allocating their pages)."""
        hi = lo + packed.shape[0]
        self.m.ensure_window(seq, lo, hi)
        pages, view = self.m.window_pages(seq), self.m.pools[PoolKind.WINDOW].view(layer, Part.WINDOW)
        pos = lo
        while pos < hi:
            i, off = divmod(pos, self.W)
            n = min(self.W - off, hi - pos)
            view[pages[i], off : off + n] = packed[pos - lo : pos - lo + n]
            pos += n

    def window(self, layer: int, seq: int) -> torch.Tensor:
        c = self._get(seq).cursor[layer]
        if c == 0:
            raise KeyError(f"no window for layer {layer}, sequence {seq}: nothing written yet")
        return self._entry.unpack(self._read_rows(seq, layer, max(c - self.W, 0), c)).to(self.dtype)

    def append_window(self, layer: int, seq: int, kv: torch.Tensor) -> None:
        meta = self._writing(layer, seq)
        c, t = meta.cursor[layer], kv.shape[0]
        lo = max(c, c + t - self.W)  # only the last W positions are ever read again
        self._write_rows(seq, layer, lo, self._entry.pack(kv[lo - c :]))
        meta.cursor[layer] = c + t

    def _layout(self, kind: EntryKind) -> EntryLayout | KeyLayout:
        return self._entry if kind is EntryKind.ATTN else self._key

    def entries(self, layer: int, seq: int, kind: EntryKind) -> torch.Tensor:
        meta = self._get(seq)
        key = (layer, kind)
        if key not in meta.entries:
            raise KeyError(f"no {kind.value} entries for layer {layer}, sequence {seq}")
        n, lay = meta.entries[key], self._layout(kind)
        if n == 0:
            dim = lay.head_dim if isinstance(lay, EntryLayout) else lay.dim
            return torch.zeros(0, dim, dtype=self.dtype)
        per_block = self.block // self.kinds[layer].value
        nb = -(-n // per_block)
        view = self.m.pools[PoolKind.BLOCK].view(layer, _ENTRY_PART[kind])
        rows = view[torch.tensor(self.m.block_pages(seq)[:nb])].reshape(-1, lay.nbytes)[:n]
        return lay.unpack(rows).to(self.dtype)

    def append_entries(self, layer: int, seq: int, kind: EntryKind, entries: torch.Tensor) -> None:
        meta = self._writing(layer, seq)
        key = (layer, kind)
        count, n = meta.entries.get(key, 0), entries.shape[0]
        meta.entries[key] = count + n
        if n == 0:
            return
        per_block = self.block // self.kinds[layer].value
        self.m.ensure_blocks(seq, -(-(count + n) // per_block))
        packed = self._layout(kind).pack(entries)
        pages, view = self.m.block_pages(seq), self.m.pools[PoolKind.BLOCK].view(layer, _ENTRY_PART[kind])
        j = count
        while j < count + n:
            b, slot = divmod(j, per_block)
            k = min(per_block - slot, count + n - j)
            view[pages[b], slot : slot + k] = packed[j - count : j - count + k]
            j += k

    def compressor_state(self, layer: int, seq: int, kind: EntryKind) -> CompressorState | None:
        st = self._get(seq).states.get((layer, kind))
        if st is None:
            return None
        view = self.m.pools[PoolKind.STATE].view(layer, _STATE_PART[kind])
        page = self.m.state_page(seq)
        if self.kinds[layer] is LayerKind.HCA:
            width = view.shape[-1] // 12
            none = torch.zeros(0, width, dtype=self.state_dtype)
            if st.rows == 0:  # nothing folded yet: the page's bytes are stale
                pool = RunningPool.empty(width, dtype=self.state_dtype)
            else:
                acc = view[page, 0].contiguous().view(torch.float32).to(self.state_dtype).view(3, width)
                pool = RunningPool(st.rows, acc[0], acc[1], acc[2])
            return CompressorState(st.start, none, none.clone(), pool)
        rows = view[page, : st.rows].contiguous().view(torch.float32).to(self.state_dtype)
        width = view.shape[-1] // 8
        return CompressorState(st.start, rows[:, :width], rows[:, width:])

    def set_compressor_state(self, layer: int, seq: int, kind: EntryKind, state: CompressorState) -> None:
        meta = self._writing(layer, seq)
        view = self.m.pools[PoolKind.STATE].view(layer, _STATE_PART[kind])
        pooled = self.kinds[layer] is LayerKind.HCA
        if (state.pool is not None) != pooled:
            raise ValueError(
                f"layer {layer} ({self.kinds[layer].name}) {kind.value} compressor state: expected "
                f"{'running accumulators' if pooled else 'rows'}, got the other form"
            )
        if state.pool is not None:
            self._set_pool(view, self.m.state_page(seq), layer, state.pool)
            meta.states[(layer, kind)] = _StateMeta(state.start, state.pool.count)
            return
        rows, width = state.kv.shape[0], view.shape[-1] // 8
        if rows > view.shape[1] or state.kv.shape[1:] != (width,):
            raise ValueError(
                f"layer {layer} {kind.value} compressor state kv {tuple(state.kv.shape)} / score "
                f"{tuple(state.score.shape)} does not fit {view.shape[1]} rows of width {width}"
            )
        if rows:
            data = torch.cat([state.kv, state.score], dim=1).to(torch.float32).contiguous()
            view[self.m.state_page(seq), :rows] = data.view(torch.uint8)
        meta.states[(layer, kind)] = _StateMeta(state.start, rows)

    @staticmethod
    def _set_pool(view: torch.Tensor, page: int, layer: int, pool: RunningPool) -> None:
        """Write running accumulators as fp32 (max, sum, wsum); sums of a wider pool are rescaled to
        the fp32-rounded maximum so that later folds against it stay consistent."""
        width = view.shape[-1] // 12
        if pool.max.shape != (width,):
            raise ValueError(
                f"layer {layer} running pool width {pool.max.shape[0]}, the state page holds {width}"
            )
        if pool.count == 0:
            return
        mx = pool.max.to(torch.float32)
        rescale = torch.exp(pool.max - mx.to(pool.max.dtype))
        data = torch.stack([mx, (pool.sum * rescale).float(), (pool.wsum * rescale).float()]).contiguous()
        view[page, 0] = data.view(-1).view(torch.uint8)

    # --- speculative decoding: the MTP hidden row of the state page ----------------------------
    @property
    def holds_draft_hidden(self) -> bool:
        """Whether the state page has the MTP_HIDDEN segment (KvShape.mtp_hidden)."""
        return self.shape.mtp_hidden > 0

    def _hidden_view(self) -> torch.Tensor:
        if not self.holds_draft_hidden:
            raise KeyError("this cache's KvShape has no MTP hidden row (mtp_hidden = 0)")
        return self.m.pools[PoolKind.STATE].view(len(self.kinds) - 1, Part.MTP_HIDDEN)

    def store_draft_hidden(self, seq: int, position: int, hidden: torch.Tensor) -> None:
        """Keep the MTP output streams `hidden` (mtp_hidden values) of `seq`'s `position` in its
        state page, so a handoff of the page carries them (fp32; position as int64)."""
        flat = hidden.detach().reshape(-1).to(torch.float32)
        if flat.numel() != self.shape.mtp_hidden:
            raise ValueError(
                f"store_draft_hidden: {flat.numel()} values, the state page holds {self.shape.mtp_hidden}"
            )
        self._get(seq)
        row = self._hidden_view()[self.m.state_page(seq), 0]
        row[:8] = torch.tensor([position], dtype=torch.int64).view(torch.uint8)
        row[8:] = flat.contiguous().view(torch.uint8)

    def draft_hidden(self, seq: int) -> tuple[int, torch.Tensor]:
        """(position, fp32 values [mtp_hidden]) of the MTP hidden row in `seq`'s state page."""
        self._get(seq)
        row = self._hidden_view()[self.m.state_page(seq), 0]
        position = int(row[:8].clone().view(torch.int64)[0])
        return position, row[8:].clone().view(torch.float32)

    def advance(self, seq: int, n: int) -> None:
        """The step covered n tokens. A main layer that appended fewer window rows than that got
        only the step's last rows (the protocol keeps only the last `window`; a handoff import
        writes just those): they move to the step's last positions."""
        if n < 0:
            raise ValueError(f"advance: n = {n} must be >= 0")
        meta = self._get(seq)
        l0 = self.m.length(seq)
        for layer in range(self.num_main_layers):
            c = meta.cursor[layer]
            if l0 < c < l0 + n:
                kept = max(l0, c - self.W)
                rows = self._read_rows(seq, layer, kept, c).clone()
                self._write_rows(seq, layer, l0 + n - rows.shape[0], rows)
                meta.cursor[layer] = l0 + n
        self.m.advance(seq, l0 + n, boundary_state_written=False, settle=False)
