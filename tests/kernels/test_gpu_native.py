"""Native Triton on a GPU at DeepSeek-V4 shapes (skipped without one): the same references."""

from __future__ import annotations

import pytest
import torch

from kernels import attention_ref, attention_triton, indexer_ref, indexer_triton, moe_ref, moe_triton
from kernels import quant as qref
from kernels import quant_triton as qtri
from workers.kv.entry import EntryLayout

pytestmark = [pytest.mark.kernels, pytest.mark.gpu]

CUDA = torch.device("cuda")


def _pool(pages: int, slots: int, g: torch.Generator) -> torch.Tensor:
    return EntryLayout().pack(torch.randn(pages, slots, 512, generator=g) * 2).to(CUDA)


@pytest.mark.parametrize("qdtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
def test_sparse_decode_flash_shape(qdtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, ctx, topk = 8, 64, 4096, 512
    n_ent = ctx // 4
    wpool, epool = _pool(b, 128, g), _pool(b * n_ent // 64, 64, g)
    wtable = torch.zeros(b, ctx // 128, dtype=torch.int32)
    wtable[:, -1] = torch.arange(b)
    etable = torch.arange(b * n_ent // 64, dtype=torch.int32).view(b, -1)
    idx = torch.stack([torch.randperm(n_ent, generator=g)[:topk] for _ in range(b)]).int()
    idx[0] = -1  # a sequence with no compressed entries selected
    lens = torch.tensor([ctx] * (b - 1) + [77], dtype=torch.int32)
    q = torch.randn(b, h, 512, generator=g).to(qdtype)
    sink = torch.randn(h, generator=g)
    args = [t.to(CUDA) for t in (q, wpool, wtable, lens)] + [128]
    args += [t.to(CUDA) for t in (epool, etable, idx, sink)] + [512**-0.5]
    got = attention_triton.sparse_decode_attention(*args)
    want = attention_ref.sparse_decode_attention(*args)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_quantisation_bit_exact_at_model_sizes() -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(256, 7168, generator=g) * 3).to(CUDA)
    for tri, ref, group in ((qtri.fp8_e4m3_quantize, qref.fp8_e4m3_quantize, 128),
                            (qtri.fp4_e2m1_quantize, qref.fp4_e2m1_quantize, 32)):  # fmt: skip
        (a, ea), (b, eb) = tri(x, group), ref(x, group)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(ea, eb)
    w = torch.randn(1000, 7168, generator=g).to(CUDA)
    (a, sa), (b, sb) = qtri.fp8_block_quantize(w), qref.fp8_block_quantize(w)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)


def test_topk_long_rows() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 16384, generator=g).to(CUDA)
    limits = torch.tensor([16384, 9000, 300, 0], device=CUDA)
    got = indexer_triton.topk_indices(scores, limits, 512)
    assert torch.equal(got.cpu(), indexer_ref.topk_indices(scores.cpu(), limits.cpu(), 512))


def test_moe_bf16() -> None:
    g = torch.Generator().manual_seed(3)
    n, hid, inter, e = 64, 1024, 512, 8
    x = torch.randn(n, hid, generator=g).to(torch.bfloat16).to(CUDA)
    w1, w3 = ((torch.randn(e, inter, hid, generator=g) * 0.03).to(torch.bfloat16).to(CUDA) for _ in range(2))
    w2 = (torch.randn(e, hid, inter, generator=g) * 0.03).to(torch.bfloat16).to(CUDA)
    ids = torch.stack([torch.randperm(e, generator=g)[:6] for _ in range(n)]).to(CUDA)
    wts = torch.rand(n, 6, generator=g).to(CUDA)
    args = (x, wts, ids, w1, w2, w3, list(range(e)), 10.0, None)
    want = moe_ref.routed_experts(*args)
    torch.testing.assert_close(
        moe_triton.routed_experts(*args), want, rtol=3e-2, atol=3e-2 * float(want.abs().max())
    )
