"""Attention with a sink: dense (the model's form) and paged sparse decode over 584-byte entries.

Independent references: the model's own Attention._attend, a float64 softmax written here, and
pools built and packed by workers/kv (PagePool views, EntryLayout.pack / unpack).
"""

from __future__ import annotations

import pytest
import torch

from kernels import attention_ref as ref
from kernels import attention_triton as tri
from kernels.entry_format import EntryFormat
from workers.kv.entry import EntryLayout
from workers.kv.geometry import KvGeometry, KvShape, Part
from workers.kv.pool import PagePool
from workers.model.attention import Attention
from workers.model.config import LayerKind
from workers.model.presets import tiny

pytestmark = pytest.mark.kernels

D = 512
WINDOW = 128


def _naive(
    q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """float64 softmax with a sink column, written from the formula (not from either implementation)."""
    logits = torch.einsum("thd,sd->ths", q.double(), keys.double()) * scale
    ex = torch.where(mask[:, None, :], torch.exp(logits), torch.zeros_like(logits))
    denom = ex.sum(-1, keepdim=True) + torch.exp(sink.double())[None, :, None]
    return torch.einsum("ths,sd->thd", ex / denom, keys.double())


def test_reference_matches_the_models_float64_attend() -> None:
    # A float64 model computes _attend in-module (float32 models call kernels.ops): an
    # independent implementation of the same function.
    cfg = tiny()
    attn = Attention(cfg, LayerKind.SWA, sim=False).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        attn.attn_sink.copy_(torch.randn(cfg.num_heads, generator=g))
    q = torch.randn(5, cfg.num_heads, cfg.head_dim, generator=g)
    keys = torch.randn(9, cfg.head_dim, generator=g)
    mask = torch.rand(5, 9, generator=g) < 0.5
    mask[2] = False
    got = ref.attend_with_sink(q, keys, mask, attn.attn_sink.float(), cfg.head_dim**-0.5)
    want = attn._attend(q.double(), keys.double(), mask)
    assert want.dtype == torch.float64
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "t,h,s,d,dtype,tol",
    [
        (3, 4, 40, 512, torch.float32, 1e-5),
        (2, 20, 1, 64, torch.float32, 1e-5),  # heads beyond one 16-row tile
        (4, 16, 70, 128, torch.float32, 1e-5),
        (1, 4, 0, 512, torch.float32, 1e-5),  # no keys at all
        (5, 4, 33, 512, torch.bfloat16, 2e-2),
    ],
)
def test_dense_attend_matches_reference(
    t: int, h: int, s: int, d: int, dtype: torch.dtype, tol: float, device: torch.device
) -> None:
    g = torch.Generator().manual_seed(t * 100 + s)
    q, keys = torch.randn(t, h, d, generator=g).to(dtype), torch.randn(s, d, generator=g).to(dtype)
    mask = torch.rand(t, s, generator=g) < 0.6
    mask[0] = False  # a query that sees nothing gets zeros
    sink = torch.randn(h, generator=g)
    scale = d**-0.5
    got = tri.attend_with_sink(q.to(device), keys.to(device), mask.to(device), sink.to(device), scale)
    want = ref.attend_with_sink(q, keys, mask, sink, scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)
    naive = _naive(q.float(), keys.float(), mask, sink, scale)
    torch.testing.assert_close(want.double(), naive, rtol=tol, atol=tol)
    assert torch.equal(got[0].cpu().float(), torch.zeros(h, d))


def _pools(seed: int) -> tuple[PagePool, PagePool, KvGeometry]:
    geo = KvGeometry.of(KvShape(compress_ratios=(0, 4, 128)))
    window = PagePool(geo.window, 12)
    block = PagePool(geo.block, 6)
    g = torch.Generator().manual_seed(seed)
    window.buffer.copy_(torch.randint(0, 256, window.buffer.shape, generator=g, dtype=torch.uint8))
    block.buffer.copy_(torch.randint(0, 256, block.buffer.shape, generator=g, dtype=torch.uint8))
    return window, block, geo


def _fill(view: torch.Tensor, g: torch.Generator) -> None:
    """Valid entries everywhere (random bytes are not valid FP8: they may hold NaN codes)."""
    kv = torch.randn(*view.shape[:2], D, generator=g) * 2.0
    view.copy_(EntryLayout().pack(kv))


@pytest.mark.parametrize(
    "layer,qdtype,splits",
    [
        (1, torch.float32, 1),
        (2, torch.float32, 1),
        (1, torch.bfloat16, 1),
        (1, torch.float32, 3),  # flash-decoding: three key splits merged by the combine kernel
        (2, torch.float32, 6),  # more splits than tiles: empty splits must not disturb the merge
    ],
)
def test_sparse_decode_matches_reference(
    layer: int, qdtype: torch.dtype, splits: int, device: torch.device
) -> None:
    """Ragged batch: a 1-token sequence (no entries yet), one inside the first window page, ones
    ending on and just past a window page, one on and past a 256-token block; CSA (layer 1) or
    HCA (layer 2) entries; one or several key splits."""
    g = torch.Generator().manual_seed(layer + 10)
    window, block, _ = _pools(layer)
    wview, eview = window.view(layer, Part.WINDOW), block.view(layer, Part.ENTRY)
    _fill(wview, g)
    _fill(eview, g)
    lens = torch.tensor([1, 7, 128, 130, 256, 300, 520], dtype=torch.int32)
    ratio = 4 if layer == 1 else 128
    wtable = torch.stack([torch.randperm(12, generator=g)[:5] for _ in lens]).int()
    etable = torch.stack([torch.randperm(6, generator=g)[:3] for _ in lens]).int()
    k = 8
    idx = torch.full((len(lens), k), -1, dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        n_ent = n // ratio
        pick = torch.randperm(n_ent, generator=g)[: min(k, n_ent)]
        idx[b, : pick.numel()] = pick.int()
        idx[b] = idx[b][torch.randperm(k, generator=g)]  # -1 holes anywhere
    h = 4
    q = torch.randn(len(lens), h, D, generator=g).to(qdtype)
    sink = torch.randn(h, generator=g)
    args = (wtable, lens, WINDOW, eview, etable, idx, sink, D**-0.5)
    want = ref.sparse_decode_attention(q, wview, *args)
    on = [a.to(device) if isinstance(a, torch.Tensor) else a for a in (q, wview, *args)]
    got = tri.sparse_decode_attention(*on, splits=splits)
    tol = 1e-5 if qdtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want.float(), rtol=tol, atol=tol)
    # The reference against the float keys workers/kv unpacks, through the float64 formula.
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(max(0, n - WINDOW), n)
        keys = [EntryLayout().unpack(wview[wtable[b, pos // 128].long(), pos % 128])]
        sel = idx[b][idx[b] >= 0].long()
        keys.append(
            EntryLayout().unpack(eview[etable[b, sel // eview.shape[1]].long(), sel % eview.shape[1]])
        )
        kf = torch.cat(keys)
        mask = torch.ones(1, kf.shape[0], dtype=torch.bool)
        naive = _naive(q[b : b + 1].float(), kf, mask, sink, D**-0.5)
        torch.testing.assert_close(want[b : b + 1].double(), naive, rtol=tol, atol=tol)


def test_entry_format_matches_the_pools_layout() -> None:
    fmt, layout = EntryFormat(), EntryLayout()
    assert (fmt.nbytes, fmt.scale_offset, fmt.head_dim) == (
        layout.nbytes,
        layout.scale_offset,
        layout.head_dim,
    )
    raw = layout.pack(torch.randn(6, D, generator=torch.Generator().manual_seed(3)) * 5)
    assert torch.equal(fmt.decode(raw), layout.unpack(raw))


def test_sparse_decode_rejects_a_bad_pool() -> None:
    q = torch.zeros(1, 4, D)
    pool = torch.zeros(2, 4, 580, dtype=torch.uint8)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="window_pool"):
        tri.sparse_decode_attention(
            q,
            pool,
            tables,
            torch.ones(1, dtype=torch.int32),
            WINDOW,
            pool,
            tables,
            tables,
            torch.zeros(4),
            1.0,
        )
