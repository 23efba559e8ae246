"""Writer and loader: round trips, real formats, sharding, expert parallelism, clear errors,
and the full V4-Flash tensor listing on meta tensors."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.model import CheckpointError, DeepseekV4, load, preset, save
from workers.model.init import init_random
from workers.model.loader import check_plan
from workers.model.quant import WeightFormat
from workers.model.writer import planned_tensors

pytestmark = pytest.mark.model

IDS = torch.randint(0, 1024, (150,), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def model():
    return init_random(DeepseekV4(preset("tiny"), quant_sim=True), seed=12)


@pytest.fixture(scope="module")
def native(model, tmp_path_factory):
    return save(model, tmp_path_factory.mktemp("native"))


def rewrite(src, dst, edit):
    """Copy checkpoint `src` to `dst` with its tensors passed through `edit(dict)`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"))
    return dst


def test_fp32_round_trip_reproduces_logits_exactly(model, tmp_path):
    loaded = load(save(model, tmp_path / "ck", fmt=WeightFormat.FP32), progress=False)
    assert torch.equal(loaded.logits(IDS), model.logits(IDS))
    out_a = model.step([(0, IDS)], c1 := model.new_cache())
    out_b = loaded.step([(0, IDS)], c2 := loaded.new_cache())
    assert torch.equal(model.mtp_logits(out_a, IDS.roll(-1), c1), loaded.mtp_logits(out_b, IDS.roll(-1), c2))


def test_native_formats_are_the_released_ones(native):
    tensors = load_file(str(native / "model.safetensors"))
    assert tensors["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert tensors["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert tensors["layers.0.attn.wq_a.scale"].shape == (1, 1)
    assert tensors["layers.1.ffn.experts.2.w2.weight"].dtype == torch.int8
    assert tensors["layers.1.ffn.experts.2.w2.weight"].shape == (128, 64)  # two FP4 values a byte
    assert tensors["layers.1.ffn.experts.2.w2.scale"].shape == (128, 4)  # one scale per 32
    assert tensors["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert tensors["layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    assert tensors["layers.2.hc_attn_fn"].dtype == torch.float32


def test_native_load_dequantises_within_format_precision_and_is_idempotent(model, native, tmp_path):
    loaded = load(native, progress=False)
    w0, w1 = model.layers[0].attn.wq_b.weight, loaded.layers[0].attn.wq_b.weight
    assert not torch.equal(w0, w1)  # FP8 really happened
    assert float((w1 - w0).abs().max() / w0.abs().max()) < 2 ** -3
    e0, e1 = model.layers[1].ffn.experts["3"].w1.weight, loaded.layers[1].ffn.experts["3"].w1.weight
    grid = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}  # FP4 magnitudes
    scale = e1[0, :32].abs().max() / 6  # the block's power-of-two scale fits its max exactly
    assert {float(v) for v in (e1[0, :32].abs() / scale)} <= grid
    assert float((e1 - e0).abs().max() / e0.abs().max()) < 0.5
    again = load(save(loaded, tmp_path / "again"), progress=False)
    assert torch.equal(again.logits(IDS), loaded.logits(IDS))


def test_sharded_checkpoint_with_index(model, tmp_path):
    path = save(model, tmp_path / "sharded", fmt=WeightFormat.FP32, max_shard_bytes=1 << 20)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert torch.equal(load(path, progress=False).logits(IDS), model.logits(IDS))


def test_checkpoint_without_mtp_is_accepted(model, native, tmp_path):
    path = rewrite(native, tmp_path / "nomtp", lambda t: {k: v for k, v in t.items() if not k.startswith("mtp.")})
    loaded = load(path, progress=False)
    assert len(loaded.mtp) == 0
    assert torch.equal(loaded.logits(IDS), load(native, progress=False).logits(IDS))


def test_expert_parallel_rank_reads_only_its_experts(native, tmp_path):
    def drop_odd(t):
        return {k: v for k, v in t.items() if not any(f".experts.{e}." in k for e in (1, 3))}

    path = rewrite(native, tmp_path / "even", drop_odd)
    rank = load(path, local_experts=[0, 2], progress=False)
    assert rank.layers[1].ffn.local_experts == (0, 2) and set(rank.layers[1].ffn.experts) == {"0", "2"}
    full = load(native, progress=False)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(13))
    ids = torch.arange(9)
    # This rank's partial sum is the full routed sum restricted to experts 0 and 2.
    w, sel = full.layers[1].ffn.gate(x, ids)
    want = torch.zeros(9, 128)
    for e in (0, 2):
        r, s = torch.where(sel == e)
        want[r] += full.layers[1].ffn.experts[str(e)](x[r], w[r, s, None])
    torch.testing.assert_close(rank.layers[1].ffn.routed(x, ids), want)
    with pytest.raises(CheckpointError, match=r"missing tensor layers\.0\.ffn\.experts\.1\.w1\.weight"):
        load(path, progress=False)


def test_missing_misshaped_and_unknown_tensors_are_named(native, tmp_path):
    miss = rewrite(native, tmp_path / "miss", lambda t: {k: v for k, v in t.items() if k != "layers.2.attn.wkv.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor layers\.2\.attn\.wkv\.weight"):
        load(miss, progress=False)
    bad = rewrite(native, tmp_path / "bad", lambda t: t | {"layers.1.attn.attn_sink": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.attn_sink: expected shape \[4\], found \[5\]"):
        load(bad, progress=False)
    extra = rewrite(native, tmp_path / "extra", lambda t: t | {"layers.9.attn.wkv.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"layers\.9\.attn\.wkv\.weight"):
        load(extra, progress=False)


def test_bfloat16_load_stays_close_to_float32(native):
    f32 = load(native, progress=False).logits(IDS)
    b16 = load(native, dtype=torch.bfloat16, progress=False).logits(IDS)
    assert float((b16 - f32).norm() / f32.norm()) < 0.1


def test_v4_flash_listing_matches_the_released_checkpoint():
    """Every tensor name and shape the real V4-Flash config implies, on meta tensors: the counts and
    shapes of the released checkpoint's index and headers."""
    with torch.device("meta"):
        flash = DeepseekV4(preset("v4-flash"))
    plan = planned_tensors(flash)
    assert len(plan) == 69187  # num_tensors of the released model.safetensors.index.json
    suffix = collections.Counter(k.rsplit(".", 1)[-1] for k in plan)
    assert (suffix["weight"], suffix["scale"], suffix["ape"], suffix["bias"], suffix["tid2eid"]) == (
        34600, 34167, 62, 41, 3)
    assert sum(1 for k in plan if ".experts." in k and k.endswith("scale")) == 33792
    published = {  # released safetensors headers
        "layers.0.attn.wq_a.weight": ((1024, 4096), torch.float8_e4m3fn),
        "layers.0.attn.wq_a.scale": ((8, 32), torch.float8_e8m0fnu),
        "layers.0.attn.wq_b.scale": ((256, 8), torch.float8_e8m0fnu),
        "layers.0.attn.wo_a.weight": ((8192, 4096), torch.float8_e4m3fn),
        "layers.0.attn.wo_b.scale": ((32, 64), torch.float8_e8m0fnu),
        "layers.0.ffn.experts.0.w1.weight": ((2048, 2048), torch.int8),
        "layers.0.ffn.experts.0.w1.scale": ((2048, 128), torch.float8_e8m0fnu),
        "layers.0.ffn.experts.0.w2.weight": ((4096, 1024), torch.int8),
        "layers.0.ffn.experts.0.w2.scale": ((4096, 64), torch.float8_e8m0fnu),
        "layers.0.ffn.shared_experts.w1.scale": ((16, 32), torch.float8_e8m0fnu),
        "layers.0.ffn.gate.weight": ((256, 4096), torch.bfloat16),
        "layers.0.ffn.gate.tid2eid": ((129280, 6), torch.int64),
        "layers.3.ffn.gate.bias": ((256,), torch.float32),
        "layers.3.attn.compressor.wkv.weight": ((512, 4096), torch.bfloat16),
        "head.weight": ((129280, 4096), torch.bfloat16),
        "norm.weight": ((4096,), torch.bfloat16),
    }
    for name, want in published.items():
        assert plan[name] == want, name
    assert check_plan(preset("v4-flash"), plan) == 35020
    broken = dict(plan, **{"layers.7.attn.wkv.weight": ((512, 4095), torch.float8_e4m3fn)})
    with pytest.raises(CheckpointError, match=r"layers\.7\.attn\.wkv\.weight: expected shape \[512, 4096\]"):
        check_plan(preset("v4-flash"), broken)


def test_quantised_weights_can_be_kept_for_kernels(native):
    from workers.model.quant import dequantize

    m = load(native, keep_quantized=True, progress=False)
    q = m.layers[0].attn.wq_a.quantized
    assert q is not None and q.fmt is WeightFormat.FP8_BLOCK and q.data.dtype == torch.float8_e4m3fn
    assert torch.equal(dequantize(q.data, q.scale, q.fmt), m.layers[0].attn.wq_a.weight)
    e = m.layers[2].ffn.experts["1"].w3.quantized
    assert e is not None and e.fmt is WeightFormat.FP4_GROUP and e.data.dtype == torch.int8
    assert torch.equal(dequantize(e.data, e.scale, e.fmt), m.layers[2].ffn.experts["1"].w3.weight)
    assert m.layers[1].attn.compressor.wkv.quantized is None  # BF16 in the checkpoint
    assert load(native, progress=False).layers[0].attn.wq_a.quantized is None
