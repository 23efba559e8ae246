"""THE 584-byte entry layout and the indexer key layouts, byte for byte."""

from __future__ import annotations

import pytest
import torch

from kernels.quant import fp4_e2m1_sim, fp8_e4m3_quantize, fp8_e4m3_sim
from workers.kv.entry import EntryLayout, KeyFormat, KeyLayout

pytestmark = pytest.mark.kv


def test_entry_is_584_bytes_at_documented_offsets() -> None:
    lay = EntryLayout()
    assert (lay.nbytes, lay.rope_offset, lay.scale_offset, lay.num_scales) == (584, 448, 576, 7)


def test_entry_bytes_decode_by_hand() -> None:
    """Decode the packed bytes with plain arithmetic (not unpack) and compare with the input."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(5, 512, generator=g) * torch.logspace(-3, 3, 5).unsqueeze(1)
    raw = EntryLayout().pack(kv)
    assert raw.dtype == torch.uint8 and raw.shape == (5, 584)
    assert torch.all(raw[:, 583] == 0)
    _, e_ref = fp8_e4m3_quantize(kv[:, :448], 64)
    assert torch.equal(raw[:, 576:583], e_ref)
    scale = torch.pow(2.0, raw[:, 576:583].double() - 127).repeat_interleave(64, dim=1)
    nope = raw[:, :448].view(torch.float8_e4m3fn).double() * scale
    assert torch.equal(nope.float(), fp8_e4m3_sim(kv[:, :448].float(), 64))
    # bf16 is the top half of a float32: rebuild it from the two little-endian bytes.
    lo, hi = raw[:, 448:576:2].int(), raw[:, 449:576:2].int()
    rope = ((hi << 24) | (lo << 16)).view(torch.float32)
    assert torch.equal(rope, kv[:, 448:].to(torch.bfloat16).float())


def test_entry_roundtrip_is_exact_on_quantised_values() -> None:
    """What the model's float cache holds under quant_sim (FP8 nope, bf16 rope) survives pack/unpack
    bit for bit, including all-zero groups and signed zeros."""
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(64, 512, generator=g) * 10
    kv[3, :64] = 0
    kv[4, 100:] = -0.0
    sim = torch.cat([fp8_e4m3_sim(kv[:, :448], 64), kv[:, 448:].to(torch.bfloat16).float()], dim=1)
    lay = EntryLayout()
    assert torch.equal(lay.unpack(lay.pack(sim)), sim)
    assert torch.equal(lay.unpack(lay.pack(kv)), sim)  # quantising raw values gives the same bytes


@pytest.mark.parametrize(("fmt", "nbytes"), [(KeyFormat.FP4, 68), (KeyFormat.FP8, 132)])
def test_indexer_key_sizes(fmt: KeyFormat, nbytes: int) -> None:
    assert KeyLayout(fmt, 128).nbytes == nbytes


def test_fp4_key_roundtrip_equals_fp4_sim() -> None:
    g = torch.Generator().manual_seed(2)
    k = torch.randn(33, 128, generator=g) * 3
    lay = KeyFormat.FP4.layout(128)
    raw = lay.pack(k)
    assert torch.equal(lay.unpack(raw), fp4_e2m1_sim(k, 32))
    assert torch.equal(lay.unpack(lay.pack(fp4_e2m1_sim(k, 32))), fp4_e2m1_sim(k, 32))
    # Low nibble first: element 0 of key 0 is the low nibble of byte 0.
    code = int(raw[0, 0]) & 0xF
    grid = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    scale = 2.0 ** (int(raw[0, 64]) - 127)
    assert (-1 if code & 8 else 1) * grid[code & 7] * scale == float(fp4_e2m1_sim(k, 32)[0, 0])


def test_fp8_key_roundtrip_with_fp32_scale() -> None:
    g = torch.Generator().manual_seed(3)
    k = torch.randn(9, 128, generator=g)
    lay = KeyFormat.FP8.layout(128)
    raw = lay.pack(k)
    scale = raw[:, 128:].contiguous().view(torch.float32).squeeze(1)
    _, e = fp8_e4m3_quantize(k, 128)
    assert torch.equal(scale, torch.pow(2.0, e.float().squeeze(1) - 127))
    assert torch.equal(lay.unpack(raw), fp8_e4m3_sim(k, 128))


def test_bad_shapes_name_the_value() -> None:
    with pytest.raises(ValueError, match="must be 512"):
        EntryLayout().pack(torch.zeros(2, 500))
    with pytest.raises(ValueError, match="scale_group"):
        EntryLayout(nope_dim=100, scale_group=64)
    with pytest.raises(ValueError, match="must be 68"):
        KeyFormat.FP4.layout(128).unpack(torch.zeros(1, 132, dtype=torch.uint8))
