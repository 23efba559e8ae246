"""A follow-up turn prefilled locally on the decode that served the previous turn.

Turn 1: a 600-token prompt is prefilled on a PREFILL engine and PULLED by a DECODE engine with
prefix caching (NIXL over loopback, one process), which then decodes 300 tokens, so the sequence
crosses the 768-token block end with tokens it generated itself. Turn 2: a LOCAL request on that
decode whose prompt is turn 1's prompt + its 300 output tokens + 50 new ones (same cache salt).

The prompt's two full blocks are held only there (pulled: no window or compressor state at their
ends), block 2 (prompt tail + answer) was computed there and ends on a boundary: so turn 2 resumes
after block 2, a run of held blocks ending at the deepest resumable one. Checked against hashes
computed independently with tandem.blocks: the decode's KV events (2 blocks held only, then block 2
resumable), `lookup` / `held` depths, turn 2's cached_tokens == 768 and the prompt tokens the
decode computed (only the 182 after block 2). Reference: an AGGREGATED prefix-caching engine runs
both turns itself with the same chunking (prefill chunks end at block ends on both sides, then one
token per step), so greedy tokens must match exactly (quant_sim's FP8/FP4 rounding makes other
chunkings free to differ); its own turn 2 must hit the same 768 tokens.
"""

from __future__ import annotations

import time

import pytest
import torch
from engine_util import paged_engine, prefill_for_handoff, prompt_of, run

from tandem.blocks import block_hashes
from tandem.request import GenerationRequest, SamplingConfig
from workers.engine.engine import Engine, Role
from workers.kv.events import KvStored
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny
from workers.transfer.decode_side import DecodeTransfer
from workers.transfer.prefill_side import PrefillTransfer

pytestmark = pytest.mark.transfer

torch.set_num_threads(1)
SALT = "tenant-7"
PROMPT, ANSWER, NEW, REPLY = 600, 300, 50, 8


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    return init_random(DeepseekV4(tiny(), quant_sim=True, with_mtp=False), seed=0).eval()


def _events(engine: Engine) -> list[object]:
    return [e.body for e in engine.kv.flush_events()]


def _pull(pre: Engine, ptx: PrefillTransfer, dec: Engine, dtx: DecodeTransfer,
          req: GenerationRequest) -> list[int]:
    """Prefill `req` on `pre`, pull its KV into `dec`, decode it to the end there; all its tokens."""
    first, desc = prefill_for_handoff(pre, ptx, req)
    got = dec.add_pulled(req, first, dtx.fill_from(desc))
    assert got.filled, got.error
    toks, _ = run(dec)[req.request_id]
    deadline = time.monotonic() + 5  # the release is fire-and-forget: wait for the prefill to free
    while pre.holds_handoff(req.request_id) and time.monotonic() < deadline:
        time.sleep(0.005)
        for rid in ptx.take_freed():
            if pre.holds_handoff(rid):
                pre.release_handoff(rid)
    assert not pre.holds_handoff(req.request_id)
    return [first, *toks]


def test_a_follow_up_turn_resumes_after_pulled_then_computed_blocks(model: DeepseekV4) -> None:
    # Prefix caching on every engine: their prompt chunks all end at block ends (same chunking).
    pre = paged_engine(model, Role.PREFILL, "p", prefix_caching=True)
    dec = paged_engine(model, Role.DECODE, "d", prefix_caching=True)
    agg = paged_engine(model, Role.AGGREGATED, "agg", prefix_caching=True)
    ptx = PrefillTransfer("p", pre.kv.manager, 30.0, 30.0, hugepages=False)
    dtx = DecodeTransfer("d", dec.kv.cache, 20.0, hugepages=False)
    try:
        dtx.pair(ptx.info())
        ptx.pair(dtx.info())
        _events(dec)  # the fresh start's Cleared
        turn1 = GenerationRequest("t1", prompt_of(PROMPT, seed=90),
                                  SamplingConfig(max_tokens=ANSWER, ignore_eos=True), cache_salt=SALT)
        out1 = _pull(pre, ptx, dec, dtx, turn1)
        agg.add(turn1)
        assert out1 == run(agg)["t1"][0] and len(out1) == ANSWER
        # The decode computed positions up to 600 + 299: block 2 (512..768) is full, block 3 is not.
        h1 = block_hashes([*turn1.prompt_ids, *out1[:-1]], salt=SALT)
        assert len(h1) == 3
        assert _events(dec) == [KvStored(tuple(h1[:2]), None, held_only=True), KvStored((h1[2],), h1[1])]
        snap = dec.kv.manager.snapshot()
        assert (snap.block_hashes, snap.held_only) == ((h1[2],), tuple(h1[:2]))

        turn2 = GenerationRequest("t2", (*turn1.prompt_ids, *out1, *prompt_of(NEW, seed=91)),
                                  SamplingConfig(max_tokens=REPLY, ignore_eos=True), cache_salt=SALT)
        n2 = len(turn2.prompt_ids)
        h2 = block_hashes(list(turn2.prompt_ids), salt=SALT)
        assert h2 == h1 and n2 == 950  # the same three full blocks; the rest is new
        prefix = dec.kv.manager.prefix
        assert (prefix.held(h2), prefix.lookup(h2)) == (3, 3)
        assert prefix.lookup(h2[:2]) == 0  # the pulled blocks alone are nowhere to resume from
        # A different tenant's salt names other blocks: nothing to resume.
        assert prefix.lookup(block_hashes(list(turn2.prompt_ids), salt="other")) == 0

        computed = dec.stats().prefill_tokens
        dec.add(turn2)
        toks, summary = run(dec)["t2"]
        assert summary.cached_tokens == 3 * 256 and summary.prompt_tokens == n2
        assert dec.stats().prefill_tokens - computed == n2 - 3 * 256  # only the rest was computed here
        agg.add(turn2)
        want, want_summary = run(agg)["t2"]
        assert want_summary.cached_tokens == 3 * 256  # the reference resumed at the same block end
        assert toks == want and len(toks) == REPLY
        assert _events(dec) == []  # 950 + 7 positions end inside block 3: nothing new to cache
        assert dec.kv.blocks_used == 0
    finally:
        ptx.close()
        dtx.close()
