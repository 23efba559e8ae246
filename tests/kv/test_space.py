"""The engine on the paged pools (PagedKvSpace): the same tokens as on the engine's own block
space, aggregated and through a prefill -> decode handoff, and nothing held afterwards."""

from __future__ import annotations

import pytest
import torch

from tandem.request import GenerationRequest, SamplingConfig
from tandem.tokenizer import ByteTokenizer
from workers.engine.engine import Engine, Role
from workers.engine.kv import BlockSpace, BlockSpaceConfig
from workers.engine.runner import LocalRunner
from workers.engine.scheduler import SchedulerConfig
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import kv_shape
from workers.kv.space import PagedKvSpace
from workers.model import DeepseekV4, preset
from workers.model.init import init_random

pytestmark = pytest.mark.kv
SCHED = SchedulerConfig(max_batched_tokens=256, prefill_chunk=256)


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    return init_random(DeepseekV4(preset("tiny"), quant_sim=True, with_mtp=False), seed=5)


def paged_space(model: DeepseekV4) -> PagedKvSpace:
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
    return PagedKvSpace(KvCacheManager(geom, KvCapacity(12, 16, 4), "w"), model.cfg.num_layers)


def engine(model: DeepseekV4, kv: object, role: Role = Role.AGGREGATED) -> Engine:
    return Engine(role, model.cfg, SCHED, kv, LocalRunner(model), ByteTokenizer())


def drain(e: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while e.has_work:
        for d in e.step().deltas:
            out.setdefault(d.request_id, []).extend(d.token_ids)
    return out


def reqs() -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (300, 40, 130)]
    sp = SamplingConfig(max_tokens=4, ignore_eos=True)
    return [GenerationRequest(f"r{i}", tuple(p), sp) for i, p in enumerate(prompts)]


def test_engine_on_paged_pools_matches_block_space(model: DeepseekV4) -> None:
    want_engine = engine(model, BlockSpace(BlockSpaceConfig(16, 256), model.cfg.window))
    space = paged_space(model)
    got_engine = engine(model, space)
    for r in reqs():
        want_engine.add(r)
        got_engine.add(r)
    assert drain(got_engine) == drain(want_engine)
    assert space.blocks_used == 0 and not space.manager.is_admitted(0)
    assert all(
        space.manager.allocators[p].num_free == space.manager.allocators[p].num_pages
        for p in (PoolKind.WINDOW, PoolKind.STATE)
    )


def test_handoff_between_paged_engines(model: DeepseekV4) -> None:
    """Prefill on one paged engine, export; import on another (only the window's last rows come
    with the handoff, placed at the sequence's last positions); decode gives the aggregated tokens."""
    agg = engine(model, paged_space(model))
    for r in reqs():
        agg.add(r)
    want = drain(agg)
    pre, dec = engine(model, paged_space(model), Role.PREFILL), engine(model, paged_space(model), Role.DECODE)
    for r in reqs():
        pre.add(r)
    first = drain(pre)
    for r in reqs():
        dec.add_prefilled(r, first[r.request_id][0], pre.take_handoff(r.request_id))
    rest = drain(dec)
    assert {k: first[k] + rest[k] for k in want} == want
