"""kernels.quant: the number-format references, against plain float64 spellings of the formats."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import quant

pytestmark = pytest.mark.kernels


def _e4m3_values() -> torch.Tensor:
    """Every finite FP8 e4m3fn value, from the 256 bit patterns (not from a rounding cast)."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return torch.unique(v[torch.isfinite(v)])


def _nearest_even(grid: torch.Tensor, codes_even: torch.Tensor, y: float) -> float:
    d = (grid - y).abs()
    best = d.min()
    ties = (d == best).nonzero().flatten()
    if len(ties) == 1:
        return grid[ties[0]].item()
    return grid[ties[codes_even[ties].argmax()]].item()


def _ref_fp8_sim(x: torch.Tensor, group: int) -> torch.Tensor:
    vals = _e4m3_values()
    # e4m3 mantissa is even when the value's bit pattern is even; recover it per value.
    bits = torch.arange(256, dtype=torch.uint8)
    all_v = bits.view(torch.float8_e4m3fn).double()
    even = torch.tensor([any((all_v == v).logical_and(bits % 2 == 0)) for v in vals.tolist()])
    out = torch.empty_like(x, dtype=torch.float64)
    flat, oflat = x.double().reshape(-1, group), out.view(-1, group)
    for r in range(flat.shape[0]):
        amax = max(flat[r].abs().max().item(), quant.AMAX_FLOOR)
        s = 2.0 ** math.ceil(math.log2(amax / 448.0))
        for c in range(group):
            oflat[r, c] = _nearest_even(vals, even, flat[r, c].item() / s) * s
    return out


@pytest.mark.parametrize("group", [64, 128])
def test_fp8_sim_matches_float64_reference(group: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2 * group) * torch.tensor([1e-3, 1.0, 300.0]).repeat_interleave(2 * group).view(3, -1)
    assert torch.equal(quant.fp8_e4m3_sim(x, group).double(), _ref_fp8_sim(x, group).float().double())


def test_fp8_quantize_layout_and_scales() -> None:
    x = torch.zeros(1, 128)
    x[0, :64] = 448.0
    x[0, 64:] = 449.0
    q, e = quant.fp8_e4m3_quantize(x, 64)
    assert q.dtype == torch.float8_e4m3fn and e.dtype == torch.uint8 and e.tolist() == [[127, 128]]
    assert torch.equal(quant.fp8_e4m3_dequantize(q, e, 64)[0, :64], x[0, :64])
    zero_e = quant.ue8m0_exponent(torch.tensor([0.0]), 448.0)
    assert zero_e.item() == 127 + math.ceil(math.log2(1e-4 / 448))


FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_fp4_rounds_to_nearest_ties_to_even_code() -> None:
    # scale 1 (amax 6): midpoints go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.3, -5.9, 0.1, 2.9] + [0.0] * 20])
    got = quant.fp4_e2m1_sim(x, 32)[0, :12].tolist()
    assert got == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.5, -6.0, 0.0, 3.0]


def test_fp4_packing_is_low_nibble_first() -> None:
    x = torch.tensor([[1.0, -6.0] + [0.0] * 30])  # amax 6 -> scale 1; codes 0b0010 and 0b1111
    packed, e = quant.fp4_e2m1_quantize(x, 32)
    assert packed.shape == (1, 16) and e.tolist() == [[127]]
    assert packed[0, 0].item() == 0x2 | (0xF << 4)
    assert torch.equal(quant.fp4_e2m1_dequantize(packed, e, 32), x)


def test_fp4_sim_matches_float64_reference() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 64) * 10
    got = quant.fp4_e2m1_sim(x, 32).double()
    grid = torch.tensor(FP4, dtype=torch.float64)
    codes_even = torch.tensor([i % 2 == 0 for i in range(8)])
    for r in range(4):
        for g in range(2):
            blk = x[r, 32 * g : 32 * (g + 1)].double()
            s = 2.0 ** math.ceil(math.log2(max(blk.abs().max().item(), 1e-4) / 6.0))
            want = [math.copysign(_nearest_even(grid, codes_even, abs(v) / s) * s, v) for v in blk.tolist()]
            assert got[r, 32 * g : 32 * (g + 1)].tolist() == pytest.approx(want, abs=0)


def test_fp8_block_dequantize_matches_a_loop() -> None:
    torch.manual_seed(2)
    w = (torch.randn(200, 300) * 3).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3) + 0.5
    got = quant.fp8_block_dequantize(w, s)
    for i in (0, 127, 128, 199):
        for j in (0, 255, 256, 299):
            assert got[i, j].item() == pytest.approx(w[i, j].float().item() * s[i // 128, j // 128].item(), rel=1e-6)
    with pytest.raises(ValueError, match="does not fit weight"):
        quant.fp8_block_dequantize(w, torch.ones(1, 3))


def test_fp8_block_quantize_round_trip_is_close() -> None:
    torch.manual_seed(3)
    w = torch.randn(130, 260)
    q, s = quant.fp8_block_quantize(w)
    assert s.shape == (2, 3)
    back = quant.fp8_block_dequantize(q, s)
    # e4m3 keeps 3 mantissa bits (relative error <= 2**-4); subnormals step by 2**-9 of the tile scale.
    tile_scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:130, :260]
    assert ((back - w).abs() <= w.abs() * 2**-4 + tile_scale * 2**-9).all()


def test_hadamard_is_the_normalised_sylvester_matrix() -> None:
    n = 16
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(quant.hadamard(x), x @ h.T / math.sqrt(n))
    assert torch.allclose(quant.hadamard(quant.hadamard(x)), x)
    with pytest.raises(ValueError, match="power-of-two"):
        quant.hadamard(torch.zeros(3, 12))


def test_group_must_divide_last_dim() -> None:
    with pytest.raises(ValueError, match="not a multiple of group 64"):
        quant.fp8_e4m3_sim(torch.zeros(2, 100), 64)
