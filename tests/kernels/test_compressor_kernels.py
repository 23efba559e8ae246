"""Compressor pooling: Triton against the torch reference, and the reference against the model.

The model check drives workers.model.compressor.Compressor through prefill chunks and one-token
decode steps and rebuilds every entry it emits from the reference pooling of the same raw rows
(then the compressor's own RMSNorm and RoPE).
"""

from __future__ import annotations

import pytest
import torch

from kernels import compressor_ref as ref
from kernels import compressor_triton as tri
from kernels.compressor_ref import PoolSpec
from workers.model.compressor import Compressor
from workers.model.config import LayerKind
from workers.model.presets import tiny
from workers.model.rope import Rope

pytestmark = pytest.mark.kernels


def _rows(spec: PoolSpec, extra: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = spec.rows_needed() + extra
    return torch.randn(n, spec.width, generator=g), torch.randn(n, spec.width, generator=g) * 3


@pytest.mark.parametrize(
    "spec",
    [
        PoolSpec(0, 0, 6, 4, 512, True),  # CSA prefill from position 0 (entry 0 has no A slots)
        PoolSpec(2, 3, 4, 4, 128, True),  # CSA decode step finishing entry 3
        PoolSpec(4, 5, 6, 4, 96, True),  # rows start exactly at the previous block
        PoolSpec(0, 0, 2, 128, 64, False),  # HCA prefill, two blocks
        PoolSpec(1, 1, 2, 128, 48, False),  # HCA decode step, width not a power of two
        PoolSpec(3, 4, 4, 4, 64, True),  # nothing finished this step
    ],
)
def test_pool_matches_reference(spec: PoolSpec, device: torch.device) -> None:
    kv, score = _rows(spec, extra=3, seed=spec.n_total * 7 + spec.head_dim)
    got = tri.compress_pool(kv.to(device), score.to(device), spec)
    want = ref.compress_pool(kv, score, spec)
    assert got.shape == (spec.n_total - spec.n_done, spec.head_dim)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio,overlap", [(4, True), (128, False)])
def test_batched_ragged_decode(ratio: int, overlap: bool, device: torch.device) -> None:
    d = 64
    width = (2 if overlap else 1) * d
    first = torch.tensor([0, 3, 1, 0])
    done = torch.tensor([0, 4, 1, 2])
    total = torch.tensor([1, 5, 1, 5])  # ragged: 1, 1, 0 and 3 new entries
    rows = int(((total - first) * ratio).max())
    g = torch.Generator().manual_seed(ratio)
    kv, score = torch.randn(4, rows, width, generator=g), torch.randn(4, rows, width, generator=g)
    got = tri.compress_pool_batched(
        kv.to(device),
        score.to(device),
        first.to(device),
        done.to(device),
        total.to(device),
        ratio,
        d,
        overlap,
    ).cpu()
    assert got.shape == (4, 3, d)
    want_all = ref.compress_pool_batched(kv, score, first, done, total, ratio, d, overlap)
    torch.testing.assert_close(got, want_all, rtol=1e-5, atol=1e-6)
    for b in range(4):
        spec = PoolSpec(int(first[b]), int(done[b]), int(total[b]), ratio, d, overlap)
        want = ref.compress_pool(kv[b], score[b], spec)
        n = want.shape[0]
        torch.testing.assert_close(got[b, :n], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[b, n:], torch.zeros(3 - n, d))


@pytest.mark.parametrize("kind", [LayerKind.CSA, LayerKind.HCA])
def test_reference_reproduces_the_models_compressor(kind: LayerKind) -> None:
    """Drive a float64 Compressor (which pools in-module; float32 models call kernels.ops)
    through prefill chunks and decode steps; rebuild each step's entries from the reference
    pooling of the same rows in float32, then the compressor's own RMSNorm and RoPE."""
    cfg = tiny()
    ratio = cfg.ratio(kind)
    overlap = kind is LayerKind.CSA
    dim, head_dim = 32, 128
    comp = Compressor(dim, head_dim, ratio, overlap=overlap, eps=cfg.norm_eps).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    rope = Rope.for_kind(cfg, kind)
    state = comp.empty_state("cpu", torch.float64)
    # Every raw row since position 0, kept here: the HCA state holds running accumulators only.
    kv = score = torch.zeros(0, comp.width, dtype=torch.float64)
    chunks = [5, 11, 1, 1, 1, 20, 3] if overlap else [100, 27, 1, 1, 130]
    made = 0
    for size in chunks:
        x = torch.randn(size, dim, generator=g, dtype=torch.float64)
        n_done = state.end // ratio
        pos = torch.arange(state.end, state.end + size)
        kv = torch.cat([kv, comp.wkv(x)])
        score = torch.cat([score, comp.wgate(x) + comp.ape[pos % ratio]])
        spec = PoolSpec(0, n_done, (state.end + size) // ratio, ratio, head_dim, overlap)
        entries, state = comp(x, state, rope)
        assert (state.pool is None) == overlap and state.end == kv.shape[0]
        assert entries.dtype == torch.float64 and entries.shape[0] == spec.n_total - spec.n_done
        pooled = ref.compress_pool(kv.float(), score.float(), spec)
        rebuilt = rope.apply(comp.norm(pooled.double()), torch.arange(spec.n_done, spec.n_total) * ratio)
        torch.testing.assert_close(rebuilt, entries, rtol=1e-5, atol=1e-5)
        made += entries.shape[0]
    assert made == sum(chunks) // ratio
