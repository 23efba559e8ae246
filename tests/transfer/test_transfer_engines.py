"""The NIXL handoff wired between two real engines (one process, two agents, UCX on loopback).

A PREFILL engine with a `PrefillTransfer` (server thread) hands prompts to a DECODE engine that
pulls them with a `DecodeTransfer` through `Engine.add_pulled`. References: an AGGREGATED engine
on the same pools' layout runs the same requests itself. Checked: token-for-token equality for
prompts of 1 .. 1000 tokens, that the decode never ran a prompt token through the model, that the
bytes reported equal the pages pulled (from the geometry, independently), that one corrupted byte
changes the output, decode-side prefix reuse (exactly 2 fewer block pages for a 2-block prefix),
and lease expiry (the prefill frees, the late decode recomputes and still answers right).
"""

from __future__ import annotations

import time

import pytest
import torch
from engine_util import CAP, LENGTHS, paged_engine, pages_bytes, prompt_of, run

from tandem.request import GenerationRequest, SamplingConfig
from workers.engine.engine import PulledKv, Role
from workers.kv.entry import KeyFormat
from workers.kv.geometry import KvGeometry, Part, PoolKind
from workers.kv.manager import AdmissionRefused, KvCacheManager
from workers.kv.presets import kv_shape
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny
from workers.transfer.decode_side import DecodeTransfer
from workers.transfer.layout import LayoutMismatch
from workers.transfer.prefill_side import PrefillTransfer

pytestmark = pytest.mark.transfer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    # quant_sim: the paged pools store the model's FP8 / FP4 values exactly
    return init_random(DeepseekV4(tiny(), quant_sim=True, with_mtp=False), seed=0).eval()


class Pair:
    """A prefill engine and a decode engine, paired both ways, plus an aggregated reference."""

    def __init__(self, model: DeepseekV4, lease_s: float = 30.0) -> None:
        self.pre = paged_engine(model, Role.PREFILL, "p")
        self.dec = paged_engine(model, Role.DECODE, "d", prefix_caching=True)
        self.agg = paged_engine(model, Role.AGGREGATED, "a")
        self.ptx = PrefillTransfer("p", self.pre.kv.manager, lease_s, 30.0, hugepages=False)
        self.dtx = DecodeTransfer("d", self.dec.kv.cache, 20.0, hugepages=False)
        self.dtx.pair(self.ptx.info())
        self.ptx.pair(self.dtx.info())

    def prefill(self, req: GenerationRequest) -> tuple[int, object]:
        """Run `req` on the prefill engine to its first token; open its handoff."""
        self.pre.add(req)
        first = None
        while first is None:
            for d in self.pre.step().deltas:
                if d.request_id == req.request_id and d.token_ids:
                    first = d.token_ids[0]
        seq = self.pre.handoff_seq(req.request_id)
        return first, self.ptx.open(req.request_id, seq, len(req.prompt_ids))

    def housekeeping(self) -> None:
        """What the prefill actor's loop does: free the handoffs the table gave back."""
        for rid in self.ptx.take_freed():
            if self.pre.holds_handoff(rid):
                self.pre.release_handoff(rid)

    def close(self) -> None:
        self.ptx.close()
        self.dtx.close()


def _disagg(pair: Pair, req: GenerationRequest) -> tuple[list[int], object]:
    first, desc = pair.prefill(req)
    pair.dec.add_pulled(req, first, pair.dtx.fill_from(desc))
    toks, summary = run(pair.dec)[req.request_id]
    pair.housekeeping()
    return [first, *toks], summary


def _reference(pair: Pair, req: GenerationRequest) -> list[int]:
    pair.agg.add(req)
    return run(pair.agg)[req.request_id][0]


@pytest.fixture(scope="module")
def pair(model: DeepseekV4):
    p = Pair(model)
    yield p
    p.close()


def test_disaggregated_equals_aggregated_and_only_the_kv_moved(pair: Pair, model: DeepseekV4) -> None:
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
    for i, n in enumerate(LENGTHS):
        sp = SamplingConfig(temperature=0.8, seed=100 + i, max_tokens=5, ignore_eos=True)
        req = GenerationRequest(f"len{n}", prompt_of(n, seed=n), sp)
        got, summary = _disagg(pair, req)
        assert got == _reference(pair, req), n
        assert summary.kv_transfer_bytes == pages_bytes(geom, n), n
        assert summary.cached_tokens == n and summary.transfer_s > 0
        # The decode ran no prompt token through its model: only the 4 sampled steps.
        assert pair.dec.stats().prefill_tokens == 0
    assert pair.dec.stats().decode_tokens == 4 * len(LENGTHS)
    assert pair.dtx.metrics.value("kv_transfer_bytes_total") == sum(pages_bytes(geom, n) for n in LENGTHS)
    assert pair.dtx.metrics.value("kv_transfer_failures_total") == 0
    deadline = time.monotonic() + 5  # releases are fire-and-forget: the server thread frees soon after
    while pair.pre.kv.blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
        pair.housekeeping()
    assert pair.pre.kv.blocks_used == 0 and len(pair.ptx.table) == 0


def test_one_corrupted_byte_changes_the_output(pair: Pair) -> None:
    sp = SamplingConfig(max_tokens=6, ignore_eos=True)
    prompt = prompt_of(200, seed=7)
    clean, _ = _disagg(pair, GenerationRequest("clean", prompt, sp))
    first, desc = pair.prefill(GenerationRequest("bad", prompt, sp))
    assert first == clean[0]
    # One byte in the prefill's pool: the UE8M0 scale of the first nope group of the last prompt
    # position's window entry in layer 0, which the first decode step attends to (+16 multiplies
    # that group by 2**16).
    m = pair.pre.kv.manager
    entry = m.geometry.shape.entry
    view = m.pools[PoolKind.WINDOW].view(0, Part.WINDOW)
    page, row, byte = desc.pages.window[-1], (200 - 1) % m.window_tokens, entry.nope_dim + 2 * entry.rope_dim
    view[page, row, byte] = int(view[page, row, byte]) + 16
    pair.dec.add_pulled(GenerationRequest("bad", prompt, sp), first, pair.dtx.fill_from(desc))
    bad = [first, *run(pair.dec)["bad"][0]]
    pair.housekeeping()
    assert bad != clean


def test_a_shared_two_block_prefix_pulls_exactly_two_fewer_blocks(pair: Pair, model: DeepseekV4) -> None:
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
    prefix = prompt_of(512, seed=21)
    sp = SamplingConfig(max_tokens=4, ignore_eos=True)
    # A prompt the decode served itself (conditional disaggregation) leaves the prefix's 2 blocks
    # and their boundary in its prefix cache (a pulled prompt caches its blocks, but a boundary only
    # where a step ends on a block end).
    local = GenerationRequest("local", prefix + prompt_of(100, seed=22), sp)
    pair.dec.add(local)
    assert [*run(pair.dec)["local"][0]] == _reference(pair, local)
    cold = GenerationRequest("cold", prompt_of(702, seed=24), sp)
    warm = GenerationRequest("warm", prefix + prompt_of(190, seed=23), sp)
    got_cold, s_cold = _disagg(pair, cold)
    got_warm, s_warm = _disagg(pair, warm)
    assert got_cold == _reference(pair, cold) and got_warm == _reference(pair, warm)
    r_cold, r_warm = pair.dtx.records[-2].result, pair.dtx.records[-1].result
    assert (r_cold.blocks_pulled, r_cold.blocks_skipped) == (3, 0)
    assert (r_warm.blocks_pulled, r_warm.blocks_skipped) == (1, 2)
    assert s_cold.kv_transfer_bytes == pages_bytes(geom, 702)
    assert s_warm.kv_transfer_bytes == s_cold.kv_transfer_bytes - 2 * geom.page(PoolKind.BLOCK).nbytes
    assert s_warm.cached_tokens == 702  # every prompt token came from the prefix cache or the pull


def test_lease_expiry_frees_the_prefill_and_the_late_decode_recomputes(model: DeepseekV4) -> None:
    pair = Pair(model, lease_s=0.3)
    try:
        req = GenerationRequest("late", prompt_of(300, seed=31), SamplingConfig(max_tokens=4, ignore_eos=True))
        first, desc = pair.prefill(req)
        assert pair.pre.kv.blocks_used == 2
        deadline = time.monotonic() + 5
        while pair.pre.kv.blocks_used and time.monotonic() < deadline:
            time.sleep(0.05)
            pair.housekeeping()
        assert pair.pre.kv.blocks_used == 0 and not pair.pre.holds_handoff("late")
        assert pair.ptx.metrics.value("kv_lease_expiries_total") == 1
        got = pair.dec.add_pulled(req, first, pair.dtx.fill_from(desc))
        assert not got.filled and "HandoffExpired" in got.error
        toks, summary = run(pair.dec)["late"]
        assert [first, *toks] == _reference(pair, req)
        assert summary.kv_transfer_bytes == 0 and summary.cached_tokens == 0
        assert pair.dec.stats().prefill_tokens == 301  # recomputed here: the prompt and the first token
        assert pair.dtx.metrics.value("kv_transfer_failures_total") == 1
    finally:
        pair.close()


def test_a_layout_mismatch_refuses_the_pairing_before_anything_is_loaded(pair: Pair, model: DeepseekV4) -> None:
    # A prefill whose indexer keys are FP8 where the decode's are FP4: same model, other bytes.
    geom = KvGeometry.of(kv_shape(model.cfg, KeyFormat.FP8, with_mtp=False))
    other = PrefillTransfer("p-fp8", KvCacheManager(geom, CAP, "p-fp8"), 30.0, 30.0, hugepages=False)
    try:
        with pytest.raises(LayoutMismatch, match="key_layout"):
            pair.dtx.pair(other.info())
        assert not pair.dtx.is_paired("p-fp8")
        with pytest.raises(LayoutMismatch):
            other.pair(pair.dtx.info())
        assert not other.agent.is_paired("d")
    finally:
        other.close()


def test_a_fill_that_raises_leaves_nothing_behind(model: DeepseekV4) -> None:
    dec = paged_engine(model, Role.DECODE, "solo")
    req = GenerationRequest("boom", prompt_of(300, seed=3), SamplingConfig(max_tokens=3))

    def fill(seq: int, length: int) -> PulledKv:
        assert dec.kv.manager.is_admitted(seq) and length == 300
        raise ValueError("fill failed")

    with pytest.raises(ValueError, match="fill failed"):
        dec.add_pulled(req, 5, fill)
    assert dec.request_ids() == () and dec.kv.blocks_used == 0 and not dec.has_work
    dec.add(req)  # the id is free again
    assert dec.request_ids() == ("boom",)


def test_no_room_for_a_pulled_request_refuses_before_any_claim(model: DeepseekV4) -> None:
    dec = paged_engine(model, Role.DECODE, "full")
    calls = []
    dec.kv.admit_prompt(900, [1, 2, 3], CAP.block_pages * 256, None)  # another sequence reserves every block
    big = GenerationRequest("big", prompt_of(300, seed=4), SamplingConfig(max_tokens=3))
    with pytest.raises(AdmissionRefused, match="block pool"):
        dec.add_pulled(big, 5, lambda seq, n: calls.append(seq))  # type: ignore[arg-type, return-value]
    assert calls == [] and dec.request_ids() == () and not dec.has_work
