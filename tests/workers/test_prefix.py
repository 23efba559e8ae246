"""The engine on the paged pools of workers/kv with prefix caching: hits skip compute, keep tokens."""

from __future__ import annotations

import pytest
from workers_util import drain, make_engine, random_prompts

from tandem.blocks import block_hashes
from tandem.request import GenerationRequest, SamplingConfig
from workers.engine.engine import Engine, Role
from workers.engine.runner import LocalRunner
from workers.engine.scheduler import SchedulerConfig
from workers.kv.events import KvStored
from workers.kv.geometry import KvGeometry
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import kv_shape
from workers.kv.space import PagedKvSpace

pytestmark = pytest.mark.workers


def paged_engine(model, tokenizer) -> tuple[Engine, PagedKvSpace]:
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
    space = PagedKvSpace(KvCacheManager(geom, KvCapacity(16, 24, 6), "w"), model.cfg.num_layers)
    # Chunks up to 512: the hit below needs the scheduler to end a step at the 256-token block end.
    sched = SchedulerConfig(max_batched_tokens=1024, prefill_chunk=512, prefix_caching=True)
    return Engine(Role.AGGREGATED, model.cfg, sched, space, LocalRunner(model), tokenizer), space


def test_second_request_with_a_shared_prefix_hits_the_cache(tiny_model_sim, tokenizer) -> None:
    shared = random_prompts((300,), seed=30)[0]
    tails = random_prompts((20, 35), seed=31)
    prompts = [shared + t for t in tails]
    sp = SamplingConfig(max_tokens=6, ignore_eos=True)
    reference = make_engine(tiny_model_sim, tokenizer)  # no prefix cache
    for i, p in enumerate(prompts):
        reference.add(GenerationRequest(f"p{i}", tuple(p), sp))
    want = drain(reference).tokens

    engine, space = paged_engine(tiny_model_sim, tokenizer)
    finals = {}
    for i, p in enumerate(prompts):  # one after the other: the second finds the first's blocks
        engine.add(GenerationRequest(f"p{i}", tuple(p), sp))
        got = drain(engine)
        assert got.tokens[f"p{i}"] == want[f"p{i}"]
        finals.update({d.request_id: d for o in got.outputs for d in o.deltas if d.finish is not None})
    assert finals["p0"].summary.cached_tokens == 0
    assert finals["p1"].summary.cached_tokens == 256  # block 0 of the shared prefix
    assert engine.stats().prefill_tokens == len(prompts[0]) + len(prompts[1]) - 256
    assert space.prefix_hit_rate == pytest.approx(256 / (len(prompts[0]) + len(prompts[1])))
    stored = [h for ev in space.flush_events() if isinstance(ev.body, KvStored) for h in ev.body.block_hashes]
    assert block_hashes(prompts[0])[0] in stored
    assert engine.stats().blocks_used == 0
