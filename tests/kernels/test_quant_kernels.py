"""Triton quantisation kernels are bit-exact twins of kernels.quant's references."""

from __future__ import annotations

import pytest
import torch

from kernels import quant as ref
from kernels import quant_triton as tri

pytestmark = pytest.mark.kernels


def _values(shape: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    """Random values spanning many binades per row, with an all-zero row and exact ties mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(
        torch.randint(-12, 12, shape[:-1], generator=g)
    ).unsqueeze(-1)
    x = x.reshape(-1, shape[-1])
    x[0] = 0.0
    if x.shape[0] > 1:  # halfway points of the e4m3 / e2m1 grids, to exercise round-to-even
        x[1, : shape[-1] // 2] = torch.tensor([1.0625, 0.75, 1.25, 2.5, -3.5, 5.0, 0.25, -0.001])[
            torch.arange(shape[-1] // 2) % 8
        ]
    return x.reshape(shape).to(device)


@pytest.mark.parametrize("shape,group", [((5, 256), 64), ((3, 7, 128), 128), ((33, 64), 32), ((1, 448), 64)])
def test_fp8_group_quantize_is_bit_exact(shape: tuple[int, ...], group: int, device: torch.device) -> None:
    x = _values(shape, device, seed=sum(shape) + group)
    q, e = tri.fp8_e4m3_quantize(x, group)
    q_ref, e_ref = ref.fp8_e4m3_quantize(x.cpu(), group)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8))
    assert torch.equal(e.cpu(), e_ref)
    y = tri.fp8_e4m3_dequantize(q, e, group)
    assert torch.equal(y.cpu(), ref.fp8_e4m3_dequantize(q_ref, e_ref, group))


def test_fp8_group_quantize_reads_bf16(device: torch.device) -> None:
    x = _values((4, 128), device, seed=7).to(torch.bfloat16)
    q, e = tri.fp8_e4m3_quantize(x, 64)
    q_ref, e_ref = ref.fp8_e4m3_quantize(x.cpu(), 64)
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8)) and torch.equal(e.cpu(), e_ref)


def test_every_fp8_code_decodes_exactly(device: torch.device) -> None:
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    codes = torch.cat([codes, codes[:2]]).reshape(2, 128)  # 256 codes, grouped by 128
    e = torch.tensor([[127], [130]], dtype=torch.uint8)
    y = tri.fp8_e4m3_dequantize(codes.view(torch.float8_e4m3fn).to(device), e.to(device), 128)
    want = codes.view(torch.float8_e4m3fn).float() * torch.tensor([[1.0], [8.0]])
    assert torch.equal(y.cpu(), want)


@pytest.mark.parametrize("shape,group", [((6, 128), 32), ((2, 3, 64), 32), ((1, 256), 64)])
def test_fp4_quantize_is_bit_exact(shape: tuple[int, ...], group: int, device: torch.device) -> None:
    x = _values(shape, device, seed=3 * sum(shape) + group)
    packed, e = tri.fp4_e2m1_quantize(x, group)
    p_ref, e_ref = ref.fp4_e2m1_quantize(x.cpu(), group)
    assert torch.equal(packed.cpu(), p_ref) and torch.equal(e.cpu(), e_ref)
    assert torch.equal(
        tri.fp4_e2m1_dequantize(packed, e, group).cpu(), ref.fp4_e2m1_dequantize(p_ref, e_ref, group)
    )


def test_fp4_ties_round_to_even_codes(device: torch.device) -> None:
    # Scaled by 1 (amax 6 -> e = 127): each value sits exactly between two grid points.
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4, device=device)[None]
    packed, e = tri.fp4_e2m1_quantize(mids, 32)
    assert int(e) == 127
    codes = torch.stack([packed.cpu() & 15, packed.cpu() >> 4], -1).flatten()[:8].tolist()
    assert codes == [0, 2, 2, 4, 4, 6, 6, 7]


@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (1, 5), (257, 129)])
def test_fp8_block_quantize_is_bit_exact(shape: tuple[int, int], device: torch.device) -> None:
    w = _values(shape, device, seed=shape[0] * 7 + shape[1])
    q, s = tri.fp8_block_quantize(w)
    q_ref, s_ref = ref.fp8_block_quantize(w.cpu())
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    assert torch.equal(tri.fp8_block_dequantize(q, s).cpu(), ref.fp8_block_dequantize(q_ref, s_ref))


def test_wrappers_reject_bad_shapes(device: torch.device) -> None:
    with pytest.raises(ValueError, match="not a multiple of group 64"):
        tri.fp8_e4m3_quantize(torch.zeros(2, 100, device=device), 64)
    with pytest.raises(ValueError, match="group 48 must be a power of two"):
        tri.fp4_e2m1_quantize(torch.zeros(2, 96, device=device), 48)
    with pytest.raises(ValueError, match="block scale shape"):
        q, _ = tri.fp8_block_quantize(torch.zeros(130, 10, device=device))
        tri.fp8_block_dequantize(q, torch.ones(1, 1, device=device))


def test_fp8_ties_round_to_even_codes(device: torch.device) -> None:
    # amax 448 gives scale 1, so these sit exactly halfway between e4m3 neighbours.
    sub = 2.0**-9
    vals = [448.0, 1.0625, 1.1875, -1.0625, 1.5 * sub, 2.5 * sub, 0.5 * sub, 0.4 * sub]
    x = torch.tensor(vals * 8, device=device)[None]
    q, e = tri.fp8_e4m3_quantize(x, 64)
    assert int(e[0, 0]) == 127
    assert q.view(torch.uint8)[0, :8].cpu().tolist() == [0x7E, 0x38, 0x3A, 0xB8, 0x02, 0x02, 0x00, 0x00]
