"""Page geometry: which bytes each pool's page holds, per layer, derived from the model's shape.

Three pools, each one contiguous uint8 buffer of [num_pages, page_bytes], block-major so a run of
consecutive pages is one contiguous byte range (one NIXL descriptor):
- BLOCK: one page per logical block of `block_size` (256) token positions, holding every layer's
  compressed data for those positions: per CSA layer block/4 entries and block/4 indexer keys,
  per HCA layer block/128 entries.
- WINDOW: one page per `window` (128) raw token positions, holding every layer's raw KV entries
  for them (SWA and MTP layers included) plus the compressor state at the page's END position
  (what a prefix hit at that position needs to resume the compressors). A block boundary's window
  is exactly the block's second window page, which the prefix cache keeps or evicts on its own.
- STATE: one page per running request: the compressors' running state, and with speculative
  decoding (`mtp_hidden`) the MTP layer's last output streams, so a handed-off request drafts
  from its first decode step: int64 position + `mtp_hidden` fp32 values.

Compressor state follows the model's two forms (workers/model/cache.py, CompressorState): CSA keeps
raw per-token fp32 (kv, score) rows, at most 2*ratio - 1 of both overlap halves (main compressor
and indexer); HCA keeps the unfinished block's running softmax accumulators, three fp32 vectors
(max, sum, weighted sum) of the entry's width, however many of its < ratio tokens they hold. At a
multiple of the window (so of 4 and 128) CSA holds exactly `ratio` rows and HCA nothing: that is
the boundary state a window page carries.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from workers.kv.entry import EntryLayout, KeyFormat, KeyLayout

FP32 = 4


class LayerKind(enum.Enum):
    """A layer's attention kind; the value is its compress ratio in the model config."""

    SWA = 0
    CSA = 4
    HCA = 128

    @classmethod
    def of(cls, ratio: int, layer: int) -> LayerKind:
        try:
            return cls(ratio)
        except ValueError:
            raise ValueError(
                f"compress_ratios[{layer}] = {ratio}: not one of 0 (SWA), 4 (CSA), 128 (HCA)"
            ) from None


class PoolKind(enum.Enum):
    BLOCK = "block"
    WINDOW = "window"
    STATE = "state"


class Part(enum.Enum):
    """What a segment of a page holds."""

    ENTRY = "entry"  # compressed entries (CSA, HCA), EntryLayout bytes each
    KEY = "key"  # indexer keys (CSA), KeyLayout bytes each
    WINDOW = "window"  # raw KV entries of the window, EntryLayout bytes each
    BOUNDARY_STATE = "boundary_state"  # CSA main compressor A-half rows at the page's end
    BOUNDARY_INDEX_STATE = "boundary_index_state"  # same for the indexer's compressor
    STATE = "state"  # running main compressor state: rows (CSA) or accumulators (HCA)
    INDEX_STATE = "index_state"  # running indexer compressor rows (CSA)
    MTP_HIDDEN = "mtp_hidden"  # speculation: the position and MTP output streams the next drafts use


@dataclass(frozen=True)
class KvShape:
    """The model facts the cache layout depends on (one entry of compress_ratios per layer, MTP
    included). Build it from the model config; tests and the benchmark use the presets.
    `mtp_hidden`: fp32 values of the MTP layer's output streams (hc_mult * hidden) that the state
    page carries for speculative decoding; 0 for none. Its segment is filed under the last layer
    (an MTP layer whenever it is set)."""

    compress_ratios: tuple[int, ...]
    entry: EntryLayout = EntryLayout()
    index_dim: int = 128
    key_format: KeyFormat = KeyFormat.FP4
    window: int = 128
    block_size: int = 256
    mtp_hidden: int = 0

    def __post_init__(self) -> None:
        if self.mtp_hidden < 0:
            raise ValueError(f"KvShape.mtp_hidden must be >= 0, got {self.mtp_hidden}")
        for i, r in enumerate(self.compress_ratios):
            LayerKind.of(r, i)
        if self.window <= 0 or self.block_size % self.window:
            raise ValueError(
                f"KvShape.block_size {self.block_size} must be a multiple of window {self.window}"
            )
        for kind in (LayerKind.CSA, LayerKind.HCA):
            if kind in self.kinds and (self.block_size % kind.value or self.window % kind.value):
                raise ValueError(
                    f"KvShape: ratio {kind.value} must divide block_size {self.block_size} "
                    f"and window {self.window}"
                )

    @property
    def kinds(self) -> tuple[LayerKind, ...]:
        return tuple(LayerKind.of(r, i) for i, r in enumerate(self.compress_ratios))

    @property
    def key(self) -> KeyLayout:
        return KeyLayout(self.key_format, self.index_dim)

    def with_key_format(self, fmt: KeyFormat) -> KvShape:
        return KvShape(self.compress_ratios, self.entry, self.index_dim, fmt, self.window, self.block_size,
                       self.mtp_hidden)


@dataclass(frozen=True)
class Segment:
    """`items` rows of `item_bytes` at byte `offset` of every page, for one layer."""

    layer: int
    part: Part
    offset: int
    items: int
    item_bytes: int

    @property
    def nbytes(self) -> int:
        return self.items * self.item_bytes


@dataclass(frozen=True)
class PageLayout:
    """One pool's page: `tokens` positions per page (0 for per-request pages), its segments."""

    pool: PoolKind
    tokens: int
    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def segment(self, layer: int, part: Part) -> Segment:
        for s in self.segments:
            if s.layer == layer and s.part is part:
                return s
        raise KeyError(f"{self.pool.value} page has no {part.value} segment for layer {layer}")


def _row(width: int) -> int:
    """Bytes of one compressor state row: kv and score, `width` fp32 values each."""
    return 2 * width * FP32


def _running(width: int) -> int:
    """Bytes of one running softmax pooling: max, sum and weighted sum, `width` fp32 values each."""
    return 3 * width * FP32


def _pack(pool: PoolKind, tokens: int, parts: list[tuple[int, Part, int, int]]) -> PageLayout:
    segs, off = [], 0
    for layer, part, items, item_bytes in parts:
        if items * item_bytes:
            segs.append(Segment(layer, part, off, items, item_bytes))
            off += items * item_bytes
    return PageLayout(pool, tokens, tuple(segs))


@dataclass(frozen=True)
class KvGeometry:
    """The three page layouts of a KvShape."""

    shape: KvShape
    block: PageLayout
    window: PageLayout
    state: PageLayout

    @classmethod
    def of(cls, shape: KvShape) -> KvGeometry:
        e, k, hd, idim = shape.entry.nbytes, shape.key.nbytes, shape.entry.head_dim, shape.index_dim
        block, window, state = [], [], []
        for i, kind in enumerate(shape.kinds):
            window.append((i, Part.WINDOW, shape.window, e))
            if kind is LayerKind.CSA:
                m = kind.value
                block += [(i, Part.ENTRY, shape.block_size // m, e), (i, Part.KEY, shape.block_size // m, k)]
                # Rows are fp32 (kv, score) pairs, both overlap halves (2 x dim wide): m rows at a
                # boundary, at most 2m - 1 while running.
                window += [
                    (i, Part.BOUNDARY_STATE, m, _row(2 * hd)),
                    (i, Part.BOUNDARY_INDEX_STATE, m, _row(2 * idim)),
                ]
                state += [
                    (i, Part.STATE, 2 * m - 1, _row(2 * hd)),
                    (i, Part.INDEX_STATE, 2 * m - 1, _row(2 * idim)),
                ]
            elif kind is LayerKind.HCA:
                block.append((i, Part.ENTRY, shape.block_size // kind.value, e))
                state.append((i, Part.STATE, 1, _running(hd)))
        if shape.mtp_hidden:
            state.append((len(shape.kinds) - 1, Part.MTP_HIDDEN, 1, 8 + shape.mtp_hidden * FP32))
        return cls(
            shape,
            _pack(PoolKind.BLOCK, shape.block_size, block),
            _pack(PoolKind.WINDOW, shape.window, window),
            _pack(PoolKind.STATE, 0, state),
        )

    def page(self, pool: PoolKind) -> PageLayout:
        return {PoolKind.BLOCK: self.block, PoolKind.WINDOW: self.window, PoolKind.STATE: self.state}[pool]

    def layout_hash(self) -> int:
        """An unsigned 64-bit name of this exact byte layout (shape, pages, segment offsets): two
        workers may move pages between them only when theirs are equal (the handoff's layout_hash)."""
        pages = tuple(
            (
                p.pool.value,
                p.tokens,
                tuple((s.layer, s.part.value, s.offset, s.items, s.item_bytes) for s in p.segments),
            )
            for p in (self.block, self.window, self.state)
        )
        desc = repr((self.shape, pages)).encode()
        return int.from_bytes(
            hashlib.blake2b(b"tandem.kv.layout.v2" + desc, digest_size=8).digest(), "little"
        )
