"""Decode-side reuse of pulled KV blocks: a decode keeps the full block pages it pulled, by hash, so
a later handoff of a prompt sharing that prefix pulls only the blocks it lacks.

Two PREFILL engines hand prompts to a fresh DECODE engine per test (NIXL over loopback, one
process); an AGGREGATED engine runs the same requests as the reference. Expected bytes come from
the geometry (engine_util.pages_bytes), expected events from tandem.blocks hashes of the prompts.
Checked: for a shared k-block prefix (k = 1, 2), from the same or the other prefill, the second
handoff pulls exactly k block pages and k block pages' bytes fewer and its greedy tokens equal the
reference; the decode's KV events name the pulled blocks; its pools end with nothing used (only
cached pages); a pulled prefix is never a point the decode resumes its own computation from; under
a 4-page block pool, eviction takes the pulled tail first and the next handoff re-pulls exactly
what went.
"""

from __future__ import annotations

import time

import pytest
import torch
from engine_util import CAP, paged_engine, pages_bytes, prefill_for_handoff, prompt_of, run

from tandem.blocks import block_hashes
from tandem.request import GenerationRequest, SamplingConfig
from tandem.tokenizer import ByteTokenizer
from workers.engine.engine import Engine, Role
from workers.engine.runner import LocalRunner
from workers.engine.scheduler import SchedulerConfig
from workers.kv.events import KvRemoved, KvStored
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import kv_shape
from workers.kv.space import PagedKvSpace
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny
from workers.transfer.decode_side import DecodeTransfer
from workers.transfer.prefill_side import PrefillTransfer

pytestmark = pytest.mark.transfer

torch.set_num_threads(1)
GREEDY = SamplingConfig(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    return init_random(DeepseekV4(tiny(), quant_sim=True, with_mtp=False), seed=0).eval()


@pytest.fixture(scope="module")
def geom(model: DeepseekV4) -> KvGeometry:
    return KvGeometry.of(kv_shape(model.cfg, with_mtp=False))


class Prefills:
    """Two prefill engines with their transfer sides, and an aggregated reference engine."""

    def __init__(self, model: DeepseekV4) -> None:
        self.engines = [paged_engine(model, Role.PREFILL, f"p{i}") for i in range(2)]
        self.tx = [PrefillTransfer(f"p{i}", e.kv.manager, 30.0, 30.0, hugepages=False)
                   for i, e in enumerate(self.engines)]
        self.agg = paged_engine(model, Role.AGGREGATED, "agg")

    def reference(self, req: GenerationRequest) -> list[int]:
        self.agg.add(req)
        return run(self.agg)[req.request_id][0]

    def housekeeping(self) -> None:
        for eng, tx in zip(self.engines, self.tx, strict=True):
            for rid in tx.take_freed():
                if eng.holds_handoff(rid):
                    eng.release_handoff(rid)

    def close(self) -> None:
        for tx in self.tx:
            tx.close()


@pytest.fixture(scope="module")
def prefills(model: DeepseekV4):
    p = Prefills(model)
    yield p
    p.close()


class Decode:
    """A fresh decode engine (block pool of `capacity`) paired with both prefills."""

    def __init__(self, model: DeepseekV4, prefills: Prefills, name: str, capacity: KvCapacity = CAP) -> None:
        self.manager = KvCacheManager(KvGeometry.of(kv_shape(model.cfg, with_mtp=False)), capacity, name)
        space = PagedKvSpace(self.manager, model.cfg.num_layers, model.dtype)
        self.engine = Engine(Role.DECODE, model.cfg, SchedulerConfig(prefix_caching=True), space,
                             LocalRunner(model), ByteTokenizer())
        self.tx = DecodeTransfer(name, space.cache, 20.0, hugepages=False)
        self.prefills = prefills
        for ptx in prefills.tx:
            self.tx.pair(ptx.info())
            ptx.pair(self.tx.info())
        self.manager.flush_events()  # the fresh start's Cleared

    def handoff(self, req: GenerationRequest, via: int) -> tuple[list[int], object]:
        """Prefill `req` on prefill `via`, pull it here, decode to the end."""
        pre, ptx = self.prefills.engines[via], self.prefills.tx[via]
        first, desc = prefill_for_handoff(pre, ptx, req)
        got = self.engine.add_pulled(req, first, self.tx.fill_from(desc))
        assert got.filled, got.error
        toks, summary = run(self.engine)[req.request_id]
        deadline = time.monotonic() + 5  # the release is fire-and-forget: wait for the prefill to free
        while pre.holds_handoff(req.request_id) and time.monotonic() < deadline:
            time.sleep(0.005)
            self.prefills.housekeeping()
        assert not pre.holds_handoff(req.request_id)
        return [first, *toks], summary

    def events(self) -> list[object]:
        return [e.body for e in self.manager.flush_events().events]

    def assert_nothing_used(self) -> None:
        """Every page is free or cached (unreferenced, registered); returns nothing."""
        m = self.manager
        for pool in PoolKind:
            a = m.allocators[pool]
            cached = {PoolKind.BLOCK: m.prefix.evictable_blocks, PoolKind.WINDOW: m.prefix.evictable_windows,
                      PoolKind.STATE: 0}[pool]
            assert a.num_free + cached == a.num_pages, pool
        assert self.engine.kv.blocks_used == 0

    def close(self) -> None:
        self.tx.close()


def _hashes(req: GenerationRequest) -> list[int]:
    return block_hashes(list(req.prompt_ids))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("second", [0, 1], ids=["same-prefill", "other-prefill"])
def test_a_shared_k_block_prefix_is_pulled_once(
    model: DeepseekV4, geom: KvGeometry, prefills: Prefills, k: int, second: int
) -> None:
    dec = Decode(model, prefills, f"d-{k}-{second}")
    try:
        prefix = prompt_of(256 * k, seed=40 + k)
        # Same length (k full prefix blocks, 1 more full block, 44 tokens): a cold pull of either
        # moves the same bytes, so the second's saving is exactly the difference.
        a = GenerationRequest("a", prefix + prompt_of(300, seed=50 + k), GREEDY)
        b = GenerationRequest("b", prefix + prompt_of(300, seed=60 + k), GREEDY)
        n = len(a.prompt_ids)
        got_a, s_a = dec.handoff(a, via=0)
        assert got_a == prefills.reference(a)
        ha, hb = _hashes(a), _hashes(b)
        assert ha[:k] == hb[:k] and ha[k] != hb[k]
        assert dec.events() == [KvStored(tuple(ha), None, held_only=True)]  # the k + 1 full blocks pulled

        got_b, s_b = dec.handoff(b, via=second)
        assert got_b == prefills.reference(b)
        r_a, r_b = dec.tx.records[-2].result, dec.tx.records[-1].result
        assert (r_a.blocks_pulled, r_a.blocks_skipped) == (k + 2, 0)
        assert (r_b.blocks_pulled, r_b.blocks_skipped) == (2, k)
        assert s_a.kv_transfer_bytes == pages_bytes(geom, n)
        assert s_b.kv_transfer_bytes == s_a.kv_transfer_bytes - k * geom.page(PoolKind.BLOCK).nbytes
        assert s_b.cached_tokens == n
        assert dec.events() == [KvStored((hb[k],), hb[k - 1], held_only=True)]  # only the block it pulled is new
        assert dec.engine.stats().prefill_tokens == 0  # the decode computed no prompt token
        assert dec.tx.metrics.value("kv_transfer_bytes_total") == s_a.kv_transfer_bytes + s_b.kv_transfer_bytes
        dec.assert_nothing_used()
        assert dec.manager.prefix.evictable_blocks == k + 2  # the prefix, a's and b's next block
        snap = dec.manager.snapshot()  # held, none resumable: no window or state at their ends here
        assert snap.block_hashes == () and set(snap.held_only) == set(ha) | set(hb)
    finally:
        dec.close()


def test_a_pulled_prefix_is_never_where_local_computation_resumes(
    model: DeepseekV4, prefills: Prefills
) -> None:
    dec = Decode(model, prefills, "d-local")
    try:
        prefix = prompt_of(512, seed=70)
        pulled = GenerationRequest("pulled", prefix + prompt_of(100, seed=71), GREEDY)
        assert dec.handoff(pulled, via=1)[0] == prefills.reference(pulled)
        # reported as held only: the router may count them for a transfer, never for a local prefill
        assert dec.events() == [KvStored(tuple(_hashes(pulled)), None, held_only=True)]
        local = GenerationRequest("local", prefix + prompt_of(100, seed=72), GREEDY)
        hashes = _hashes(local)
        # Both blocks are held (a pull may skip them), none is resumable (no window or state here).
        assert dec.manager.prefix.held(hashes) == 2 and dec.manager.prefix.lookup(hashes[:2]) == 0
        dec.engine.add(local)
        toks, summary = run(dec.engine)["local"]
        assert toks == prefills.reference(local)
        assert summary.cached_tokens == 0
        # The whole prompt was computed here (plus the 3 tokens decoded after the first).
        assert dec.engine.stats().prefill_tokens == len(local.prompt_ids)
        assert dec.events() == []  # nothing of the prefix became resumable either
        dec.assert_nothing_used()
    finally:
        dec.close()


def test_eviction_in_a_small_pool_takes_the_pulled_tail_first(
    model: DeepseekV4, geom: KvGeometry, prefills: Prefills
) -> None:
    dec = Decode(model, prefills, "d-small", KvCapacity(block_pages=4, window_pages=4, state_pages=1))
    try:
        prefix = prompt_of(512, seed=80)
        a = GenerationRequest("a", prefix + prompt_of(88, seed=81), GREEDY)  # 3 block pages, 2 full
        c = GenerationRequest("c", prompt_of(600, seed=82), GREEDY)  # unrelated, 3 block pages
        b = GenerationRequest("b", prefix + prompt_of(88, seed=83), GREEDY)
        ha, hc, hb = _hashes(a), _hashes(c), _hashes(b)
        cold = pages_bytes(geom, 600)
        block = geom.page(PoolKind.BLOCK).nbytes

        got, s = dec.handoff(a, via=0)
        assert got == prefills.reference(a) and s.kv_transfer_bytes == cold
        assert dec.events() == [KvStored(tuple(ha), None, held_only=True)]
        # c needs 3 pages: 2 free, and the least recently used cached one, a's tail block (a
        # released its blocks tail first).
        got, s = dec.handoff(c, via=1)
        assert got == prefills.reference(c) and s.kv_transfer_bytes == cold
        assert dec.events() == [KvRemoved((ha[1],)), KvStored(tuple(hc), None, held_only=True)]
        # b still finds block 0 of the prefix (1 page skipped) and evicts c's tail for its pages.
        got, s = dec.handoff(b, via=0)
        assert got == prefills.reference(b)
        assert s.kv_transfer_bytes == cold - block
        assert (dec.tx.records[-1].result.blocks_pulled, dec.tx.records[-1].result.blocks_skipped) == (2, 1)
        assert dec.events() == [KvRemoved((hc[1],)), KvStored((hb[1],), hb[0], held_only=True)]
        dec.assert_nothing_used()
        assert dec.manager.prefix.evictable_blocks == 3  # prefix block 0, b's block 1, c's block 0
    finally:
        dec.close()
