"""Speculative decoding across a NIXL handoff: engines as plain objects, one process, UCX on loopback.

A speculating PREFILL engine (MTP window kept in its window pages, the MTP hidden row in the state
page) hands prompts to a speculating DECODE engine that pulls the pages through `add_pulled`.
Checked: the decode drafts on its very first step (no warm-up step), its output equals a plain
aggregated engine's token for token, it ran no prompt token, the bytes pulled are the pages of the
speculating layout (state page with the hidden row), pools are empty afterwards, and a decode
with the speculating layout refuses to pair with a prefill without it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from engine_util import CAP, pages_bytes, prompt_of, run

from tandem.request import GenerationRequest, SamplingConfig
from tandem.tokenizer import ByteTokenizer
from workers.engine.engine import Engine, Role
from workers.engine.runner import LocalRunner
from workers.engine.scheduler import SchedulerConfig
from workers.engine.speculate import SpeculationConfig, Speculator
from workers.kv.geometry import KvGeometry
from workers.kv.manager import KvCacheManager
from workers.kv.presets import kv_shape
from workers.kv.space import PagedKvSpace
from workers.model.loader import load
from workers.model.model import DeepseekV4
from workers.transfer.decode_side import DecodeTransfer
from workers.transfer.layout import LayoutMismatch
from workers.transfer.prefill_side import PrefillTransfer

pytestmark = pytest.mark.transfer

torch.set_num_threads(1)
DEMO = Path(__file__).resolve().parents[2] / "deploy" / "models" / "tiny-demo"
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    # The demo checkpoint: its MTP layer is trained, so drafts get accepted. quant_sim: the pools
    # store the model's FP8 / FP4 values exactly.
    return load(DEMO, dtype=torch.float32, quant_sim=True, progress=False)


def geometry(model: DeepseekV4, speculating: bool) -> KvGeometry:
    return KvGeometry.of(kv_shape(model.cfg, with_mtp=speculating, mtp_hidden=speculating))


def engine(model: DeepseekV4, role: Role, name: str, k: int) -> Engine:
    kv = PagedKvSpace(KvCacheManager(geometry(model, k > 0), CAP, name), model.cfg.num_layers, model.dtype)
    spec = Speculator(model, SpeculationConfig(k)) if k else None
    sched = SchedulerConfig(prefix_caching=role is Role.DECODE)
    return Engine(role, model.cfg, sched, kv, LocalRunner(model), TOK, spec)


def test_a_pulled_request_speculates_from_its_first_step_and_equals_aggregated(model: DeepseekV4) -> None:
    pre, dec, agg = engine(model, Role.PREFILL, "sp", 2), engine(model, Role.DECODE, "sd", 2), \
        engine(model, Role.AGGREGATED, "sa", 0)
    ptx = PrefillTransfer("sp", pre.kv.manager, 30.0, 30.0, hugepages=False)
    dtx = DecodeTransfer("sd", dec.kv.cache, 20.0, hugepages=False)
    try:
        dtx.pair(ptx.info())
        ptx.pair(dtx.info())
        prompts = [tuple(TOK.encode("The router picks")), prompt_of(1, seed=1), prompt_of(130, seed=2),
                   prompt_of(300, seed=3)]
        moved = 0
        for i, prompt in enumerate(prompts):
            sp = SamplingConfig(max_tokens=10, temperature=0.0 if i % 2 == 0 else 0.9, seed=i, ignore_eos=True)
            req = GenerationRequest(f"q{i}", prompt, sp)
            agg.add(req)
            want = run(agg)[req.request_id][0]
            pre.add(req)
            first = next(d.token_ids[0] for d in pre.step().deltas if d.request_id == req.request_id)
            desc = ptx.open(req.request_id, pre.handoff_seq(req.request_id), len(prompt))
            drafted = dec.stats().drafted_tokens
            pulled = dec.add_pulled(req, first, dtx.fill_from(desc))
            assert pulled.filled, pulled.error
            moved += pulled.nbytes
            step = dec.step()
            assert dec.stats().drafted_tokens == drafted + 2, i  # drafts on the first decode step
            got = [first, *[t for d in step.deltas for t in d.token_ids], *run(dec).get(req.request_id, ([],))[0]]
            assert got == want, i
            for rid in ptx.take_freed():
                pre.release_handoff(rid)
        assert dec.stats().prefill_tokens == 0 and dec.stats().accepted_tokens > 0
        geom = geometry(model, True)
        assert moved == sum(pages_bytes(geom, len(p)) for p in prompts)
        deadline = time.monotonic() + 5  # releases are fire-and-forget
        while pre.kv.blocks_used and time.monotonic() < deadline:
            time.sleep(0.01)
            for rid in ptx.take_freed():
                pre.release_handoff(rid)
        assert pre.kv.blocks_used == 0 and dec.kv.blocks_used == 0
    finally:
        ptx.close()
        dtx.close()


def test_a_speculating_decode_refuses_a_prefill_without_the_mtp_pages(model: DeepseekV4) -> None:
    plain = PrefillTransfer("plain-p", KvCacheManager(geometry(model, False), CAP, "plain-p"), 30.0, 30.0,
                            hugepages=False)
    dtx = DecodeTransfer("spec-d", engine(model, Role.DECODE, "spec-d", 1).kv.cache, 20.0, hugepages=False)
    try:
        with pytest.raises(LayoutMismatch, match="layer_kinds"):
            dtx.pair(plain.info())
        assert not dtx.is_paired("plain-p")
    finally:
        plain.close()
        dtx.close()
