"""Logprobs across the NIXL handoff: a request prefilled on one engine (its first token's logprob
comes from there) and decoded on another after a real pull carries exactly the logprobs, chosen and
top n, that an aggregated engine on the same pools' layout computes for it alone."""

from __future__ import annotations

import pytest
import torch
from engine_util import paged_engine, prompt_of

from tandem.request import GenerationRequest, SamplingConfig
from tandem.stream import TokenDelta, TokenLogprob
from workers.engine.engine import Engine, Role
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny
from workers.transfer.decode_side import DecodeTransfer
from workers.transfer.prefill_side import PrefillTransfer

pytestmark = pytest.mark.transfer

torch.set_num_threads(1)


def _logprobs(engine: Engine, request_id: str) -> tuple[list[TokenLogprob], list[TokenDelta]]:
    lps, deltas = [], []
    while engine.has_work:
        for d in engine.step().deltas:
            if d.request_id == request_id:
                lps += d.logprobs
                deltas.append(d)
    return lps, deltas


def test_logprobs_after_a_nixl_pull_equal_aggregated() -> None:
    model = init_random(DeepseekV4(tiny(), quant_sim=True, with_mtp=False), seed=0).eval()
    pre, dec = paged_engine(model, Role.PREFILL, "lp-p"), paged_engine(model, Role.DECODE, "lp-d")
    ptx = PrefillTransfer("lp-p", pre.kv.manager, 30.0, 30.0, hugepages=False)
    dtx = DecodeTransfer("lp-d", dec.kv.cache, 20.0, hugepages=False)
    try:
        dtx.pair(ptx.info())
        ptx.pair(dtx.info())
        for i, n in enumerate((1, 129, 300)):
            sp = SamplingConfig(temperature=0.9, seed=7 + i, max_tokens=4, ignore_eos=True, logprobs=True,
                                top_logprobs=4 * i)
            req = GenerationRequest(f"lp{n}", prompt_of(n, seed=n), sp)
            agg = paged_engine(model, Role.AGGREGATED, f"lp-a{i}")
            agg.add(req)
            want, _ = _logprobs(agg, req.request_id)
            pre.add(req)
            first, deltas = _logprobs(pre, req.request_id)
            assert len(first) == 1 and deltas[0].token_ids == (first[0].token_id,)
            desc = ptx.open(req.request_id, pre.handoff_seq(req.request_id), n)
            assert dec.add_pulled(req, first[0].token_id, dtx.fill_from(desc)).filled
            rest, deltas = _logprobs(dec, req.request_id)
            assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
            assert first + rest == want, n  # exact: the same floats, the same top lists
            assert [len(lp.top) for lp in want] == [4 * i] * 4
    finally:
        ptx.close()
        dtx.close()
