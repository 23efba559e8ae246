"""PagedModelCache against the model's ContiguousCache through the ModelCache protocol alone:
random step sizes, the model's write order and state rules, quant_sim'd values; every read must
be bit-identical (windows across page edges, entries across blocks, states, the MTP layer)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.kv.geometry import KvGeometry, LayerKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.paged_cache import PagedModelCache
from workers.kv.presets import Preset
from workers.model.cache import CompressorState, ContiguousCache, EntryKind, RunningPool
from workers.model.quant import index_sim, kv_sim

pytestmark = pytest.mark.kv
CFG = Preset.TINY.config()  # layers SWA, CSA, HCA, then one MTP layer
WIDTH = {
    (LayerKind.CSA, EntryKind.ATTN): 1024,
    (LayerKind.CSA, EntryKind.INDEX): 256,
    (LayerKind.HCA, EntryKind.ATTN): 512,
}


def state_start(kind: LayerKind, n_done: int) -> int:
    """The model's rule (workers/model/compressor.py): CSA keeps the previous block's rows, HCA folds
    its unfinished block into running accumulators."""
    return max(n_done - 1, 0) * 4 if kind is LayerKind.CSA else n_done * 128


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.one_of(st.integers(1, 3), st.integers(100, 300)), min_size=1, max_size=8),
    st.integers(0, 2**31 - 1),
)
def test_paged_reads_equal_contiguous_reads(steps: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    geom = KvGeometry.of(Preset.TINY.shape())
    kinds = geom.shape.kinds
    total = sum(steps)
    paged = PagedModelCache(KvCacheManager(geom, KvCapacity(16, 8, 2), "w"), CFG.num_layers)
    paged.admit(0, list(range(total)), total)
    ref = ContiguousCache(CFG.window)
    caches = (paged, ref)

    def same(read) -> None:  # noqa: ANN001 - a callable taking a cache
        a, b = read(paged), read(ref)
        assert torch.equal(a, b), f"mismatch at length {ref.length(0)}"

    def write_window(layer: int, p: int, t: int) -> None:
        if p > 0:
            same(lambda c: c.window(layer, 0))
        kv = kv_sim(torch.randn(t, 512, generator=g) * 4, 64, True)
        for c in caches:
            c.append_window(layer, 0, kv)

    p = 0
    for t in steps:
        for layer, kind in enumerate(kinds[: CFG.num_layers]):
            for ek in (
                (EntryKind.ATTN, EntryKind.INDEX)
                if kind is LayerKind.CSA
                else (EntryKind.ATTN,)
                if kind is LayerKind.HCA
                else ()
            ):
                m, width = kind.value, WIDTH[(kind, ek)]
                states = [c.compressor_state(layer, 0, ek) for c in caches]
                assert (states[0] is None) == (states[1] is None) == (p == 0)
                if p:
                    assert states[0].start == states[1].start
                    assert torch.equal(states[0].kv, states[1].kv) and torch.equal(
                        states[0].score, states[1].score
                    )
                    pools = [s.pool for s in states]
                    assert (pools[0] is None) == (pools[1] is None) == (kind is LayerKind.CSA)
                    if pools[0] is not None and pools[1] is not None:
                        assert pools[0].count == pools[1].count
                        if pools[1].count:  # an empty pool's page bytes are never read
                            for a, b in ((pools[0].max, pools[1].max), (pools[0].sum, pools[1].sum),
                                         (pools[0].wsum, pools[1].wsum)):
                                assert torch.equal(a, b)
                n_new = (p + t) // m - p // m
                dim = 512 if ek is EntryKind.ATTN else 128
                x = torch.randn(n_new, dim, generator=g)
                new = kv_sim(x, 64, True) if ek is EntryKind.ATTN else index_sim(x, True)
                start = state_start(kind, (p + t) // m)
                rows = p + t - start
                if kind is LayerKind.CSA:  # raw rows
                    st_new = CompressorState(
                        start, torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)
                    )
                else:  # running accumulators (any fp32 values: the cache stores them as they are)
                    acc = torch.randn(3, width, generator=g)
                    none = torch.zeros(0, width)
                    st_new = CompressorState(start, none, none, RunningPool(rows, acc[0], acc[1].abs(), acc[2]))
                for c in caches:
                    c.append_entries(layer, 0, ek, new)
                    c.set_compressor_state(layer, 0, ek, st_new)
                same(lambda c, layer=layer, ek=ek: c.entries(layer, 0, ek))
            write_window(layer, p, t)
        for c in caches:
            c.advance(0, t)
        write_window(CFG.num_layers, p, t)  # the MTP layer, after the step
        p += t
    assert paged.length(0) == ref.length(0) == total
    paged.free(0)
