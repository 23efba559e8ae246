"""A prefilled sequence's model state as plain tensors, for handing a request to another engine.

This is the in-process form of a KV handoff (Ray object store): the NIXL path of workers/transfer/
moves the same pieces page by page. Per layer it carries the window, and for compressed layers the
entries and compressor state of each series (CSA: attention and indexer; HCA: attention). With
speculative decoding it also carries the MTP layer's window and its output streams at the last
position, so the decode drafts from its first step (workers/engine/speculate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.model.cache import CompressorState, EntryKind, ModelCache
from workers.model.config import LayerKind, ModelConfig


@dataclass(frozen=True)
class SeriesKv:
    """One compressed series of one layer: finished entries [n, dim] and the compressor state."""

    layer: int
    kind: EntryKind
    entries: torch.Tensor
    state: CompressorState


@dataclass(frozen=True)
class SequenceKv:
    """Everything a model needs to continue a sequence of `length` tokens."""

    length: int
    windows: tuple[torch.Tensor, ...]  # per layer: [min(length, window), head_dim]
    series: tuple[SeriesKv, ...]
    mtp_windows: tuple[torch.Tensor, ...] = ()  # per MTP layer kept (speculation), like `windows`
    draft_hidden: torch.Tensor | None = None  # MTP output streams [hc, d] at position length - 1

    @property
    def nbytes(self) -> int:
        tensors = [*self.windows, *self.mtp_windows]
        if self.draft_hidden is not None:
            tensors.append(self.draft_hidden)
        for s in self.series:
            tensors.append(s.entries)
        return sum(t.numel() * t.element_size() for t in tensors) + sum(s.state.nbytes for s in self.series)


def _series_kinds(kind: LayerKind) -> tuple[EntryKind, ...]:
    if kind is LayerKind.CSA:
        return (EntryKind.ATTN, EntryKind.INDEX)
    if kind is LayerKind.HCA:
        return (EntryKind.ATTN,)
    return ()


def export_kv(cache: ModelCache, cfg: ModelConfig, seq: int, mtp_layers: int = 0,
              draft_hidden: torch.Tensor | None = None) -> SequenceKv:
    """Copy `seq`'s state out of `cache`: the main layers, and the windows of the first
    `mtp_layers` MTP layers (which speculation keeps) with `draft_hidden`."""
    length = cache.length(seq)
    if length <= 0:
        raise ValueError(f"export_kv: sequence {seq} holds no tokens")
    windows = tuple(cache.window(i, seq).clone() for i in range(cfg.num_layers))
    series = []
    for i, kind in enumerate(cfg.layer_kinds):
        for ek in _series_kinds(kind):
            state = cache.compressor_state(i, seq, ek)
            if state is None:
                raise ValueError(f"export_kv: layer {i} sequence {seq} has no {ek.value} compressor state")
            series.append(SeriesKv(i, ek, cache.entries(i, seq, ek).clone(), state.clone()))
    mtp = tuple(cache.window(cfg.num_layers + j, seq).clone() for j in range(mtp_layers))
    hidden = None if draft_hidden is None else draft_hidden.clone()
    return SequenceKv(length, windows, tuple(series), mtp, hidden)


def import_kv(cache: ModelCache, cfg: ModelConfig, seq: int, kv: SequenceKv) -> None:
    """Write `kv` into `cache` as sequence `seq`, which must be empty there."""
    if cache.length(seq) != 0:
        raise ValueError(f"import_kv: sequence {seq} already holds {cache.length(seq)} tokens")
    if len(kv.windows) != cfg.num_layers:
        raise ValueError(f"import_kv: {len(kv.windows)} windows for a model of {cfg.num_layers} layers")
    for i, w in enumerate(kv.windows + kv.mtp_windows):
        cache.append_window(i, seq, w)
    for s in kv.series:
        cache.append_entries(s.layer, seq, s.kind, s.entries)
        cache.set_compressor_state(s.layer, seq, s.kind, s.state)
    cache.advance(seq, kv.length)
