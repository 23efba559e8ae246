"""The prefill and decode Ray actors on one local cluster: aggregated, disaggregated, cancel, leases.

References are the in-process engine and plain greedy generation on the same tiny model.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from workers_util import drain, greedy_reference, make_engine, random_prompts, requests

from tandem.request import GenerationRequest, SamplingConfig
from tandem.stream import Finish
from tandem.v1 import worker_pb2
from workers.actor_common import HandoffPath, ModelSource, WorkerConfig, actor_name
from workers.decode import DecodeActor
from workers.engine.engine import Role
from workers.engine.kv import BlockSpaceConfig
from workers.prefill import PrefillActor

pytestmark = [pytest.mark.workers, pytest.mark.slow]

MODEL = ModelSource(preset="tiny", seed=0, quant_sim=False)  # == the tiny_model fixture


def _start(actor_cls, cfg: WorkerConfig):
    handle = actor_cls.options(name=actor_name(cfg.instance, cfg.rank), num_cpus=0).remote(cfg)
    return handle


@pytest.fixture(scope="module")
def actors(ray_session):
    ray = ray_session
    kv = BlockSpaceConfig(num_blocks=48, block_size=16)
    # The contiguous cache has no pages for NIXL: these actors use the object-store test mode (the
    # NIXL path is tested in tests/transfer/test_transfer_actors.py).
    ray_mode = HandoffPath.RAY_OBJECT_STORE
    agg = _start(DecodeActor, WorkerConfig("agg-0", Role.AGGREGATED, model=MODEL, kv=kv, handoff=ray_mode))
    pre = _start(PrefillActor, WorkerConfig("prefill-0", Role.PREFILL, model=MODEL, kv=kv, handoff_lease_s=2.0,
                                            handoff=ray_mode))
    dec = _start(DecodeActor, WorkerConfig("decode-0", Role.DECODE, model=MODEL, kv=kv, handoff=ray_mode))
    assert ray.get([agg.ready.remote(), pre.ready.remote(), dec.ready.remote()], timeout=180) == [
        "agg-0/r0", "prefill-0/r0", "decode-0/r0"]
    yield agg, pre, dec
    for h in (agg, pre, dec):
        ray.kill(h)


async def _collect(gen) -> tuple[dict[str, list[int]], dict[str, Finish], list]:
    tokens: dict[str, list[int]] = {}
    finish: dict[str, Finish] = {}
    batches = []
    async for ref in gen:
        batch = await ref
        batches.append(batch)
        for d in batch.deltas:
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish is not None:
                finish[d.request_id] = d.finish
    return tokens, finish, batches


def test_aggregated_actor_streams_batched_steps_with_reference_tokens(actors, tiny_model) -> None:
    agg, _, _ = actors
    prompts = random_prompts((20, 90, 45), seed=12)
    reqs = requests(prompts, SamplingConfig(max_tokens=6, ignore_eos=True))
    tokens, finish, batches = asyncio.run(_collect(agg.generate.remote(reqs)))
    assert [tokens[r.request_id] for r in reqs] == [greedy_reference(tiny_model, p, 6) for p in prompts]
    assert set(finish.values()) == {Finish.LENGTH}
    # One message per engine step carrying every request's tokens: far fewer messages than tokens.
    assert len(batches) < 18 and max(len(b.deltas) for b in batches) == 3
    assert [b.step for b in batches] == sorted(b.step for b in batches)


def test_disaggregated_prefill_then_decode_matches_aggregated(actors, tiny_model, tokenizer, ray_session) -> None:
    agg, pre, dec = actors
    prompts = random_prompts((33, 70), seed=13)
    params = [SamplingConfig(temperature=0.8, seed=41 + i, max_tokens=7, ignore_eos=True) for i in range(2)]
    ref = make_engine(tiny_model, tokenizer)
    for r in requests(prompts, params):
        ref.add(r)
    want = drain(ref).tokens
    reqs = [GenerationRequest(f"d{i}", tuple(p), s) for i, (p, s) in enumerate(zip(prompts, params, strict=True))]
    results = ray_session.get([pre.prefill.remote(r) for r in reqs], timeout=120)
    assert all(res.handoff is not None and res.first.finish is None for res in results)
    desc = worker_pb2.HandoffDescriptor.FromString(results[0].handoff)
    assert (desc.request_id, desc.prefill.instance, desc.prompt_tokens) == ("d0", "prefill-0", 33)
    assert desc.first_token == results[0].first.token_ids[0]
    tokens, finish, _ = asyncio.run(_collect(dec.generate.remote(reqs, results)))
    for i, r in enumerate(reqs):
        assert [*results[i].first.token_ids, *tokens[r.request_id]] == want[f"r{i}"]
    stats = ray_session.get(pre.stats.remote())
    assert stats.kv_blocks_used == 0 and stats.role == worker_pb2.ROLE_PREFILL  # both handoffs taken


def test_prefill_that_ends_at_the_first_token_holds_nothing(actors, ray_session) -> None:
    _, pre, _ = actors
    req = GenerationRequest("one", tuple(range(40)), SamplingConfig(max_tokens=1))
    res = ray_session.get(pre.prefill.remote(req), timeout=60)
    assert res.handoff is None and res.first.finish is Finish.LENGTH
    assert ray_session.get(pre.handoffs_held.remote()) == 0


def test_expired_handoff_is_freed_and_the_decode_recomputes(actors, tiny_model, ray_session) -> None:
    _, pre, dec = actors
    prompt = random_prompts((50,), seed=14)[0]
    req = GenerationRequest("late", tuple(prompt), SamplingConfig(max_tokens=5, ignore_eos=True))
    res = ray_session.get(pre.prefill.remote(req), timeout=60)
    assert ray_session.get(pre.stats.remote()).kv_blocks_used == 4  # ceil(51 / 16)
    deadline = time.monotonic() + 10
    while ray_session.get(pre.stats.remote()).kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.2)  # the 2 s lease runs out
    assert ray_session.get(pre.stats.remote()).kv_blocks_used == 0
    tokens, _, _ = asyncio.run(_collect(dec.generate.remote([req], [res])))
    assert [*res.first.token_ids, *tokens["late"]] == greedy_reference(tiny_model, prompt, 5)


def test_cancel_frees_blocks_at_once_and_ends_the_stream(actors, ray_session) -> None:
    agg, _, _ = actors

    async def scenario():
        req = GenerationRequest("c", tuple(range(60)), SamplingConfig(max_tokens=400, ignore_eos=True))
        gen = agg.generate.remote([req])
        first = await (await gen.__anext__())
        assert first.deltas[0].token_ids
        assert (await agg.stats.remote()).kv_blocks_used >= 4
        assert await agg.cancel.remote("c")
        after = await agg.stats.remote()
        rest = [await ref async for ref in gen]
        return after, rest

    after, rest = asyncio.run(scenario())
    assert after.kv_blocks_used == 0 and after.running_requests == 0
    assert rest[-1].deltas[-1].finish is Finish.CANCELLED


def test_stats_and_kv_events_use_the_wire_types(actors, ray_session) -> None:
    agg, _, _ = actors
    st = ray_session.get(agg.stats.remote())
    assert isinstance(st, worker_pb2.WorkerStats)
    assert (st.worker.instance, st.worker.dp_rank, st.role) == ("agg-0", 0, worker_pb2.ROLE_AGGREGATED)
    assert st.kv_blocks_used + st.kv_blocks_free == 48
    ev = ray_session.get(agg.kv_events.remote())
    assert isinstance(ev, worker_pb2.KvEventBatch) and ev.worker.instance == "agg-0"
    assert ray_session.get(agg.bytes_dispatched.remote()) == 0  # no expert parallelism here


def test_paged_actor_serves_prefix_hits_and_reports_kv_events(ray_session, tiny_model_sim) -> None:
    from tandem.blocks import block_hashes
    from workers.actor_common import PagedPoolsConfig
    from workers.engine.scheduler import SchedulerConfig

    ray = ray_session
    cfg = WorkerConfig("paged-0", Role.AGGREGATED, model=ModelSource(preset="tiny", seed=0, quant_sim=True),
                       kv=PagedPoolsConfig(16, 24, 6), sched=SchedulerConfig(prefix_caching=True))
    actor = _start(DecodeActor, cfg)
    try:
        shared = random_prompts((300,), seed=40)[0]
        prompts = [shared + t for t in random_prompts((12, 30), seed=41)]
        sp = SamplingConfig(max_tokens=4, ignore_eos=True)
        finals, tokens = {}, {}
        for i, p in enumerate(prompts):
            req = GenerationRequest(f"h{i}", tuple(p), sp)
            got, _, batches = asyncio.run(_collect(actor.generate.remote([req])))
            tokens.update(got)
            finals.update({d.request_id: d for b in batches for d in b.deltas if d.finish is not None})
        assert [finals[f"h{i}"].summary.cached_tokens for i in (0, 1)] == [0, 256]
        assert [tokens[f"h{i}"] for i in (0, 1)] == [greedy_reference(tiny_model_sim, p, 4) for p in prompts]
        stats = ray.get(actor.stats.remote())
        assert stats.prefix_hit_rate == pytest.approx(256 / sum(len(p) for p in prompts))
        events = ray.get(actor.kv_events.remote())
        stored = [h for ev in events.events if ev.WhichOneof("kind") == "stored" for h in ev.stored.block_hashes]
        assert block_hashes(prompts[0])[0] in stored
        # Reading is not destructive: a second router from the start sees the same events; one that
        # read up to the last seq sees nothing new.
        assert ray.get(actor.kv_events.remote()) == events
        caught_up = ray.get(actor.kv_events.remote(events.events[-1].seq))
        assert list(caught_up.events) == []
        # every batch says the newest seq produced, so a reader can tell a lost last event
        assert events.last_seq == caught_up.last_seq == events.events[-1].seq
        assert [e.seq for e in events.events] == list(range(len(events.events)))
    finally:
        ray.kill(actor)


def test_ep2_instance_of_two_actors_serves_reference_tokens(ray_session, tiny_model) -> None:
    from ep_procs import free_port

    from workers.ep.group import EpConfig

    ray = ray_session
    port = free_port()
    ranks = [
        _start(DecodeActor, WorkerConfig("ep-0", Role.AGGREGATED, rank=r, model=MODEL,
                                         ep=EpConfig(r, 2, master_port=port, timeout_s=60),
                                         handoff=HandoffPath.RAY_OBJECT_STORE))
        for r in range(2)
    ]
    try:
        assert ray.get([a.ready.remote() for a in ranks], timeout=180) == ["ep-0/r0", "ep-0/r1"]
        prompts = random_prompts((30, 80, 55), seed=50)
        reqs = requests(prompts, SamplingConfig(max_tokens=5, ignore_eos=True))

        async def both():
            # Data-parallel attention: rank 0 serves two requests, rank 1 one; MoE layers exchange.
            return await asyncio.gather(_collect(ranks[0].generate.remote(reqs[:2])),
                                        _collect(ranks[1].generate.remote(reqs[2:])))

        (t0, _, _), (t1, _, _) = asyncio.run(both())
        got = {**t0, **t1}
        assert [got[r.request_id] for r in reqs] == [greedy_reference(tiny_model, p, 5) for p in prompts]
        assert all(b > 0 for b in ray.get([a.bytes_dispatched.remote() for a in ranks]))
    finally:
        for a in ranks:
            ray.kill(a)


def test_draining_rank_finishes_its_requests_and_refuses_new_ones(actors, ray_session) -> None:
    _, pre, dec = actors
    ray = ray_session

    async def scenario():
        req = GenerationRequest("dr0", tuple(range(30)), SamplingConfig(max_tokens=20, ignore_eos=True))
        gen = dec.generate.remote([req])
        first = await (await gen.__anext__())
        await dec.drain.remote()
        rest = [await ref async for ref in gen]
        return first, rest

    first, rest = asyncio.run(scenario())
    n = sum(len(d.token_ids) for b in [first, *rest] for d in b.deltas)
    assert n == 20 and rest[-1].deltas[-1].finish is Finish.LENGTH  # the running request completed
    assert ray.get(dec.stats.remote()).draining
    with pytest.raises(ray.exceptions.RayTaskError, match="draining"):
        ray.get(dec.submit.remote(GenerationRequest("dr1", (1, 2, 3), SamplingConfig())))
    ray.get(pre.drain.remote())
    with pytest.raises(ray.exceptions.RayTaskError, match="draining"):
        ray.get(pre.prefill.remote(GenerationRequest("dr2", (1, 2, 3), SamplingConfig())))
