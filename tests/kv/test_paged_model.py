"""The tiny model running on the paged cache: same logits as on the model's contiguous cache, and a
prefix hit gives the no-hit output with exactly 256*k fewer computed tokens."""

from __future__ import annotations

import pytest
import torch

from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.paged_cache import PagedModelCache
from workers.kv.presets import kv_shape
from workers.model import DeepseekV4, ModelCache, preset
from workers.model.init import init_random

pytestmark = pytest.mark.kv


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    # quant_sim on: the real KV numerics, which the 584-byte layout holds exactly; fp32 as served.
    return init_random(DeepseekV4(preset("tiny"), quant_sim=True, with_mtp=False), seed=3)


def paged(model: DeepseekV4) -> PagedModelCache:
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
    mgr = KvCacheManager(geom, KvCapacity(block_pages=40, window_pages=24, state_pages=4), "w0")
    return PagedModelCache(mgr, model.cfg.num_layers, model.dtype)


def run(model: DeepseekV4, cache: ModelCache, seq: int, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Prefill ids in `chunks` starting at the cache's length; the logits of every computed row."""
    out, pos = [], cache.length(seq)
    for n in chunks:
        out.append(model.prefill(seq, ids[pos : pos + n], cache))
        pos += n
    return torch.cat(out)


def block_chunks(start: int, end: int) -> list[int]:
    """Chunks from start to end that end on every 256-token block end (where boundaries cache)."""
    cuts = [*range((start // 256 + 1) * 256, end, 256), end]
    return [b - a for a, b in zip([start, *cuts[:-1]], cuts, strict=True)]


def test_paged_cache_is_a_model_cache(model: DeepseekV4) -> None:
    assert isinstance(paged(model), ModelCache)


def test_same_logits_as_the_contiguous_cache(model: DeepseekV4) -> None:
    """Chunked prefill across the 128 / 256 boundaries, then decode steps, bit for bit."""
    ids = torch.randint(0, model.cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    chunks = [100, 28, 127, 1, 1, 3]
    ref_cache, cache = model.new_cache(), paged(model)
    cache.admit(5, ids.tolist(), 300)
    ref = run(model, ref_cache, 5, ids, chunks)
    got = run(model, cache, 5, ids, chunks)
    assert torch.equal(got, ref)
    for t in range(260, 264):
        assert torch.equal(
            model.decode([5], ids[t : t + 1], cache), model.decode([5], ids[t : t + 1], ref_cache)
        )
    assert cache.length(5) == ref_cache.length(5) == 264
    cache.free(5)


def test_prefix_hit_equals_no_hit_with_256k_fewer_tokens(model: DeepseekV4) -> None:
    """Prompts sharing 1, 2 and 3 blocks, then diverging: the hit run computes 256*k fewer tokens
    and its logits equal those of a run that computes everything (same chunk boundaries from 256*k
    on, so the same arithmetic), bit for bit, and so does a decode step after it."""
    g = torch.Generator().manual_seed(2)
    base = torch.randint(0, model.cfg.vocab_size, (3 * 256,), generator=g)
    cache = paged(model)
    for k in (3, 2, 1):
        prompt = torch.cat([base[: 256 * k], torch.randint(0, model.cfg.vocab_size, (20,), generator=g)])
        # k = 3 runs first, on an empty cache, and leaves the boundaries at 256, 512 and 768 that all
        # three hits use; the other no-hit runs use another salt, which names other blocks.
        miss = cache.admit(10 + k, prompt.tolist(), len(prompt) + 1, salt=None if k == 3 else f"no-hit-{k}")
        assert miss.hit_blocks == 0
        chunks = block_chunks(0, len(prompt))
        full = run(model, cache, 10 + k, prompt, chunks)
        hit = cache.admit(20 + k, prompt.tolist(), len(prompt) + 1)
        assert (hit.hit_blocks, hit.hit_tokens, cache.length(20 + k)) == (k, 256 * k, 256 * k)
        rest = block_chunks(256 * k, len(prompt))
        got = run(model, cache, 20 + k, prompt, rest)
        assert sum(chunks) - sum(rest) == 256 * k
        assert torch.equal(got, full[256 * k :])
        tok = got[-1].argmax().reshape(1)
        assert torch.equal(model.decode([20 + k], tok, cache), model.decode([10 + k], tok, cache))
        cache.free(10 + k)
        cache.free(20 + k)


def test_mtp_layer_after_each_step_and_a_hit_after_it() -> None:
    """The MTP layer writes its window after the step advanced the length; the paged cache keeps the
    previous window for it, gives the contiguous cache's logits, and caches the block boundary only
    once the MTP layer reached it too."""
    mtp_model = init_random(DeepseekV4(preset("tiny"), quant_sim=True, with_mtp=True), seed=4)
    cfg = mtp_model.cfg
    geom = KvGeometry.of(kv_shape(cfg))
    cache = PagedModelCache(KvCacheManager(geom, KvCapacity(8, 12, 3), "w1"), cfg.num_layers, mtp_model.dtype)
    ref_cache = mtp_model.new_cache()
    ids = torch.randint(0, cfg.vocab_size, (264,), generator=torch.Generator().manual_seed(6))
    cache.admit(1, ids.tolist(), 264)

    def steps(c: ModelCache, seq: int, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        out = []
        for a, b in spans:
            res = mtp_model.step([(seq, ids[a:b])], c)
            out += [res.logits, mtp_model.mtp_logits(res, ids[a + 1 : b + 1], c)]
        return out

    spans = [(0, 256), (256, 260), (260, 261), (261, 262)]
    got, ref = steps(cache, 1, spans), steps(ref_cache, 1, spans)
    assert all(torch.equal(x, y) for x, y in zip(got, ref, strict=True))
    # Block 0's boundary was settled by the step at 256 once the MTP layer had written it.
    cache.admit(2, ids[:260].tolist(), 264)
    assert cache.length(2) == 256
    again = steps(cache, 2, [(256, 260)])
    assert torch.equal(again[0], got[2]) and torch.equal(again[1], got[3])


def test_adopting_copied_pages_continues_the_sequence(model: DeepseekV4) -> None:
    """What a decode does after pulling a handoff: copy the prefill's block pages, last window pages
    and state page into its own (here by tensor copy, not NIXL), adopt the length, decode on."""
    ids = torch.randint(0, model.cfg.vocab_size, (301,), generator=torch.Generator().manual_seed(8))
    src, dst = paged(model), paged(model)
    src.admit(1, ids.tolist(), 310)
    run(model, src, 1, ids, [300])
    dst.admit(2, [], 310)
    dst.m.ensure(2, 300)
    pools_src, pools_dst = src.m.pools, dst.m.pools
    for a, b in zip(src.m.block_pages(1), dst.m.block_pages(2), strict=True):
        pools_dst[PoolKind.BLOCK].buffer[b] = pools_src[PoolKind.BLOCK].buffer[a]
    wins = dst.m.window_pages(2)
    for i, a in src.m.window_pages(1).items():
        if i >= (300 - 128) // 128:
            pools_dst[PoolKind.WINDOW].buffer[wins[i]] = pools_src[PoolKind.WINDOW].buffer[a]
    pools_dst[PoolKind.STATE].buffer[dst.m.state_page(2)] = pools_src[PoolKind.STATE].buffer[
        src.m.state_page(1)
    ]
    dst.adopt(2, 300)
    assert dst.length(2) == 300
    assert torch.equal(model.decode([2], ids[300:301], dst), model.decode([1], ids[300:301], src))
    assert torch.equal(dst.window(0, 2), src.window(0, 1))
