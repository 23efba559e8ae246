"""The NIXL handoff between the prefill and decode Ray actors (the session's local cluster).

The actors pair on first meeting (the decode fetches the prefill's AgentInfo by actor call and
pairs both ways), the prefill answers claims from its server thread and frees released pages in
its loop, the decode pulls into its paged pools and reports the bytes in the request's summary.
The reference is an in-process AGGREGATED engine on the same model.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import torch
from engine_util import LENGTHS, paged_engine, pages_bytes, prompt_of, run

from tandem.request import GenerationRequest, SamplingConfig
from tandem.stream import Finish
from tandem.v1 import worker_pb2
from workers.actor_common import ModelSource, PagedPoolsConfig, WorkerConfig, actor_name
from workers.decode import DecodeActor
from workers.engine.engine import Role
from workers.engine.scheduler import SchedulerConfig
from workers.ep.group import EpConfig
from workers.kv.geometry import KvGeometry
from workers.kv.presets import kv_shape
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny
from workers.prefill import PrefillActor

pytestmark = pytest.mark.transfer

MODEL = ModelSource(preset="tiny", seed=0, quant_sim=True)
POOLS = PagedPoolsConfig(block_pages=24, window_pages=24, state_pages=6)


def _start(actor_cls, cfg: WorkerConfig):  # noqa: ANN001, ANN202
    return actor_cls.options(name=actor_name(cfg.instance, cfg.rank), num_cpus=0).remote(cfg)


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    torch.set_num_threads(1)
    return init_random(DeepseekV4(tiny(), quant_sim=True, with_mtp=False), seed=0).eval()


@pytest.fixture(scope="module")
def actors(ray_session):  # noqa: ANN001, ANN201
    ray = ray_session
    pre = _start(PrefillActor, WorkerConfig("nx-prefill", Role.PREFILL, model=MODEL, kv=POOLS,
                                            handoff_lease_s=1.5))
    dec = _start(DecodeActor, WorkerConfig("nx-decode", Role.DECODE, model=MODEL, kv=POOLS,
                                           sched=SchedulerConfig(prefix_caching=True)))
    assert ray.get([pre.ready.remote(), dec.ready.remote()], timeout=180) == ["nx-prefill/r0", "nx-decode/r0"]
    yield pre, dec
    for h in (pre, dec):
        ray.kill(h)


async def _tokens(gen) -> tuple[list[int], object]:  # noqa: ANN001
    toks, summary = [], None
    async for ref in gen:
        for d in (await ref).deltas:
            toks += d.token_ids
            summary = d.summary if d.finish is not None else summary
    return toks, summary


def _reference(model: DeepseekV4, reqs: list[GenerationRequest]) -> dict[str, list[int]]:
    """Each request alone on an aggregated engine: batched with others, shared GEMMs can differ in
    their last float bits, which the FP8 simulation may turn into another token."""
    agg = paged_engine(model, Role.AGGREGATED, "ref")
    out = {}
    for r in reqs:
        agg.add(r)
        out[r.request_id] = run(agg)[r.request_id][0]
    return out


def test_actors_hand_off_over_nixl_token_for_token(actors, model, ray_session) -> None:  # noqa: ANN001
    pre, dec = actors
    geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
    reqs = [GenerationRequest(f"a{n}", prompt_of(n, seed=n + 1),
                              SamplingConfig(temperature=0.7, seed=n, max_tokens=4, ignore_eos=True))
            for n in LENGTHS]
    want = _reference(model, reqs)
    for r in reqs:
        res = ray_session.get(pre.prefill.remote(r), timeout=120)
        desc = worker_pb2.HandoffDescriptor.FromString(res.handoff)
        assert (desc.agent_name, desc.prompt_tokens, desc.epoch > 0) == ("nx-prefill/r0", len(r.prompt_ids), True)
        assert len(desc.pools) == 3 and desc.layout_hash != 0
        toks, summary = asyncio.run(_tokens(dec.generate.remote([r], [res])))
        assert [*res.first.token_ids, *toks] == want[r.request_id], r.request_id
        assert summary.kv_transfer_bytes == pages_bytes(geom, len(r.prompt_ids)) and summary.transfer_s > 0
    # The decode's model never ran a prompt token: only 3 sampled steps per request.
    assert ray_session.get(dec.tokens_run.remote()) == (0, 3 * len(LENGTHS))
    pulls = ray_session.get(dec.pulls.remote())
    assert [(p[0], p[1], p[4]) for p in pulls] == [
        (r.request_id, pages_bytes(geom, len(r.prompt_ids)), None) for r in reqs]
    deadline = time.monotonic() + 5  # released pages are freed by the prefill's loop soon after
    while ray_session.get(pre.handoffs_held.remote()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray_session.get(pre.handoffs_held.remote()) == 0
    assert ray_session.get(pre.stats.remote()).kv_blocks_used == 0
    d_info, p_info = ray_session.get([dec.agent_info.remote(), pre.agent_info.remote()])
    assert (d_info.name, p_info.name) == ("nx-decode/r0", "nx-prefill/r0") and d_info.layout == p_info.layout
    with pytest.raises(Exception, match="KV moves over NIXL"):  # no KV through Ray's object store
        ray_session.get(pre.take_handoff.remote("a1"))


def test_request_ending_at_the_prefill_frees_at_once(actors, ray_session) -> None:  # noqa: ANN001
    pre, _ = actors
    req = GenerationRequest("one", prompt_of(40, seed=5), SamplingConfig(max_tokens=1))
    res = ray_session.get(pre.prefill.remote(req), timeout=60)
    assert res.handoff is None and res.first.finish is Finish.LENGTH
    assert ray_session.get(pre.handoffs_held.remote()) == 0
    assert ray_session.get(pre.stats.remote()).kv_blocks_used == 0


def test_expired_lease_frees_the_prefill_and_the_decode_recomputes(actors, model, ray_session) -> None:  # noqa: ANN001
    pre, dec = actors
    req = GenerationRequest("late", prompt_of(300, seed=9), SamplingConfig(max_tokens=4, ignore_eos=True))
    res = ray_session.get(pre.prefill.remote(req), timeout=60)
    assert ray_session.get(pre.handoffs_held.remote()) == 1
    deadline = time.monotonic() + 10
    while ray_session.get(pre.handoffs_held.remote()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the 1.5 s lease runs out
    assert ray_session.get(pre.handoffs_held.remote()) == 0
    assert ray_session.get(pre.transfer_metric.remote("kv_lease_expiries_total")) == 1
    before = ray_session.get(dec.tokens_run.remote())
    toks, summary = asyncio.run(_tokens(dec.generate.remote([req], [res])))
    assert [*res.first.token_ids, *toks] == _reference(model, [req])["late"]
    assert summary.kv_transfer_bytes == 0
    after = ray_session.get(dec.tokens_run.remote())
    assert after[0] - before[0] == 301  # the prompt and the first token, recomputed on the decode
    last = ray_session.get(dec.pulls.remote())[-1]
    assert last[0] == "late" and "HandoffExpired" in last[4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_instance(actor_cls, instance: str, role: Role, world: int) -> list:  # noqa: ANN001
    port = _free_port()
    return [_start(actor_cls, WorkerConfig(instance, role, rank=r, model=MODEL, kv=POOLS,
                                           ep=EpConfig(r, world, master_port=port, timeout_s=60)))
            for r in range(world)]


@pytest.mark.slow
def test_instances_of_different_ep_sizes_hand_off_rank_by_rank(actors, model, ray_session) -> None:  # noqa: ANN001
    """A 2-rank prefill instance hands off to the 1-rank decode, and the 1-rank prefill to a 2-rank
    decode instance: KV is per dp rank, so every pair is an ordinary rank pair."""
    pre1, dec1 = actors
    pre2 = _ep_instance(PrefillActor, "nx-prefill-ep2", Role.PREFILL, 2)
    dec2 = _ep_instance(DecodeActor, "nx-decode-ep2", Role.DECODE, 2)
    try:
        assert len(ray_session.get([a.ready.remote() for a in pre2 + dec2], timeout=240)) == 4
        sp = SamplingConfig(max_tokens=4, ignore_eos=True)
        # First meeting under concurrency: two handoffs from the same new prefill rank reach the
        # decode at once; both must wait for the one pairing (a claim sent before the prefill paired
        # back would go unanswered until the pull's timeout) and pull, none recomputes.
        first = [GenerationRequest(f"meet{i}", prompt_of(100 + i, seed=70 + i), sp) for i in range(2)]

        async def meet() -> float:
            results = [await pre2[0].prefill.remote(r) for r in first]
            t0 = time.monotonic()
            await asyncio.gather(*(_tokens(dec1.generate.remote([r], [res]))
                                   for r, res in zip(first, results, strict=True)))
            return time.monotonic() - t0

        assert asyncio.run(meet()) < 10  # far below the 30 s pull timeout an unanswered claim waits
        met = [p for p in ray_session.get(dec1.pulls.remote()) if p[0].startswith("meet")]
        assert [(p[0], p[4]) for p in met] == [("meet0", None), ("meet1", None)] or \
            [(p[0], p[4]) for p in met] == [("meet1", None), ("meet0", None)]
        reqs = [GenerationRequest(f"ep{i}", prompt_of(n, seed=60 + i), sp) for i, n in enumerate((270, 90, 140, 400))]
        want = _reference(model, reqs)
        # (prefill rank, decode rank): both ranks of the EP prefill -> the single decode; the single
        # prefill -> both ranks of the EP decode.
        routes = [(pre2[0], dec1), (pre2[1], dec1), (pre1, dec2[0]), (pre1, dec2[1])]

        async def scenario() -> list[tuple[list[int], object]]:
            # One request at a time, as in the reference (see _reference).
            out = []
            for (p, d), r in zip(routes, reqs, strict=True):
                res = await p.prefill.remote(r)
                toks, s = await _tokens(d.generate.remote([r], [res]))
                out.append(([*res.first.token_ids, *toks], s))
            return out

        got = asyncio.run(scenario())
        geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=False))
        for r, (toks, summary) in zip(reqs, got, strict=True):
            assert toks == want[r.request_id], r.request_id
            assert summary.kv_transfer_bytes == pages_bytes(geom, len(r.prompt_ids)), r.request_id
        agents = {desc for d in (dec1, *dec2) for desc in ray_session.get(d.pulls.remote()) if desc[0] in want}
        assert {a[0] for a in agents} == set(want) and all(a[4] is None for a in agents)
    finally:
        for h in pre2 + dec2:
            ray_session.kill(h)
