"""Indexer scores and top-k: Triton against the torch references, the references against the model.

Paged keys are packed by workers/kv (KeyLayout, FP4 and FP8) into a block pool's key segment.
"""

from __future__ import annotations

import pytest
import torch

from kernels import indexer_ref as ref
from kernels import indexer_triton as tri
from kernels.indexer_ref import KeyFormat
from workers.kv import entry as kv_entry
from workers.kv.geometry import KvGeometry, KvShape, Part
from workers.kv.pool import PagePool
from workers.model.config import LayerKind
from workers.model.indexer import Indexer
from workers.model.presets import tiny
from workers.model.rope import Rope

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("t,h,n,d", [(3, 16, 70, 128), (1, 64, 5, 128), (2, 4, 33, 32)])
def test_scores_match_reference(t: int, h: int, n: int, d: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(t * n + h)
    q, w, keys = (
        torch.randn(t, h, d, generator=g),
        torch.randn(t, h, generator=g),
        torch.randn(n, d, generator=g),
    )
    got = tri.index_scores(q.to(device), w.to(device), keys.to(device))
    torch.testing.assert_close(got.cpu(), ref.index_scores(q, w, keys), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", [KeyFormat.FP4, KeyFormat.FP8])
def test_paged_scores_read_the_pools_key_bytes(fmt: KeyFormat, device: torch.device) -> None:
    kv_fmt = kv_entry.KeyFormat.FP4 if fmt is KeyFormat.FP4 else kv_entry.KeyFormat.FP8
    geo = KvGeometry.of(KvShape(compress_ratios=(0, 4, 128), key_format=kv_fmt))
    pool = PagePool(geo.block, 5)
    view = pool.view(1, Part.KEY)  # [pages, 64 keys, nbytes], strided inside the block page
    assert view.shape[2] == fmt.nbytes(128)
    g = torch.Generator().manual_seed(2)
    view.copy_(geo.shape.key.pack(torch.randn(5, view.shape[1], 128, generator=g)))
    n_keys = torch.tensor([0, 3, 64, 150], dtype=torch.int32)  # none yet, one page, exactly one page, three
    table = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(4)]).int()
    q, w = torch.randn(4, 16, 128, generator=g), torch.randn(4, 16, generator=g)
    got = tri.index_scores_paged(
        q.to(device), w.to(device), view.to(device), table.to(device), n_keys.to(device), 160, fmt
    )
    want = ref.index_scores_paged(q, w, view, table, n_keys, 160, fmt)
    assert torch.equal(got.isinf().cpu(), want.isinf()) and int(want.isfinite().sum()) == 3 + 64 + 150
    torch.testing.assert_close(got.cpu()[want.isfinite()], want[want.isfinite()], rtol=1e-5, atol=1e-4)
    # The reference decodes exactly what workers/kv unpacks.
    raw = view[table[3, :3].long()].reshape(-1, view.shape[2])[:150]
    assert torch.equal(fmt.decode(raw, 128), geo.shape.key.unpack(raw))


@pytest.mark.parametrize("n,k", [(70, 8), (300, 16), (5, 8)])
def test_topk_matches_reference(n: int, k: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(5, n, generator=g)
    limits = torch.tensor([0, 1, k - 1, n // 2, n + 10])  # nothing visible .. more than n visible
    got = tri.topk_indices(scores.to(device), limits.to(device), k).cpu()
    want = ref.topk_indices(scores, limits, k)
    assert torch.equal(got, want)
    assert torch.equal(
        tri.topk_mask(scores.to(device), limits.to(device), k).cpu(), ref.topk_mask(scores, limits, k)
    )
    # Independent check: each row holds the min(k, visible) largest visible scores.
    for i in range(5):
        vis = scores[i, : min(int(limits[i]), n)]
        top = set(vis.topk(min(k, vis.numel())).indices.tolist()) if vis.numel() else set()
        assert set(got[i][got[i] >= 0].tolist()) == top


def test_topk_ties_in_long_rows_take_the_lowest_ids(device: torch.device) -> None:
    # 200 visible entries (the bitwise-search path): 30 share the top value, 5 are wanted.
    scores = torch.linspace(-1.0, 0.5, 200)[None].repeat(2, 1)
    scores[:, torch.arange(7, 200, 6)[:30]] = 1.0
    limits = torch.tensor([200, 150])
    got = tri.topk_indices(scores.to(device), limits.to(device), 5).cpu()
    assert got[0].tolist() == torch.arange(7, 200, 6)[:5].tolist()
    assert torch.equal(got, ref.topk_indices(scores, limits, 5))


def test_topk_ties_take_the_lowest_ids(device: torch.device) -> None:
    scores = torch.tensor(
        [[1.0, 2.0, 2.0, 2.0, 0.0, 2.0, -1.0, 2.0], [-0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    )
    got = tri.topk_indices(scores.to(device), torch.tensor([8, 8], device=device), 3).cpu()
    assert got.tolist() == [[1, 2, 3], [0, 1, 3]]
    assert torch.equal(got, ref.topk_indices(scores, torch.tensor([8, 8]), 3))


def test_references_reproduce_the_models_indexer() -> None:
    """A float64 Indexer scores and selects in-module (float32 models call kernels.ops). Without
    FP4 simulation, whose rounding would differ between float64 and float32 inputs."""
    cfg = tiny()
    idx = Indexer(
        cfg.hidden_size, cfg.q_lora_rank, cfg.index_heads, cfg.index_head_dim, 4, cfg.index_topk,
        cfg.norm_eps, sim=False,
    ).double()  # fmt: skip
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in idx.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    rope = Rope.for_kind(cfg, LayerKind.CSA)
    t, n = 6, 40
    x = torch.randn(t, cfg.hidden_size, generator=g, dtype=torch.float64)
    qr = torch.randn(t, cfg.q_lora_rank, generator=g, dtype=torch.float64)
    positions = torch.tensor([3, 17, 40, 90, 130, 159])
    keys = torch.randn(n, cfg.index_head_dim, generator=g, dtype=torch.float64)
    model_scores = idx.scores(x, qr, positions, keys, rope)
    assert model_scores.dtype == torch.float64
    q = rope.apply(idx.wq_b(qr).view(t, idx.heads, idx.head_dim), positions)
    w = idx.weights_proj(x) * (idx.head_dim**-0.5 * idx.heads**-0.5)
    mine = ref.index_scores(q.float(), w.float(), keys.float())
    torch.testing.assert_close(mine.double(), model_scores, rtol=1e-5, atol=1e-5)
    limits = (positions + 1) // 4
    assert torch.equal(ref.topk_mask(mine, limits, cfg.index_topk), idx.select(x, qr, positions, keys, rope))
