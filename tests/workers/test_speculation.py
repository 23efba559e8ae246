"""MTP speculative decoding (workers/engine/speculate.py, staged_cache.py).

References are independent of the speculating path: the same engine with speculation off, and a
plain sequential greedy loop on the model. Checked: greedy and seeded output with k = 1 and 2
equals k = 0 token for token (prompts crossing the CSA / HCA / window / block boundaries), on the
contiguous cache and on the paged pools with prefix hits; drafts are accepted on the demo
checkpoint (its MTP layer is trained) and output stays exact when an untrained MTP layer gets
nearly every draft rejected; a staged verify committed at n positions leaves exactly the cache a
step of n positions leaves; max_tokens and stop ids / strings cut a multi-token accept exactly;
a handed-off request (object-store path) drafts on its first decode step; KV is freed after.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from workers_util import drain, greedy_reference, random_prompts, requests

from orchestrator.spec import SpecError, parse_spec
from orchestrator.worker_plan import instance_plan
from tandem.request import GenerationRequest, SamplingConfig
from tandem.tokenizer import ByteTokenizer
from workers.actor_common import BuiltRank, ModelSource, PagedPoolsConfig, WorkerConfig, build_rank
from workers.engine.engine import Engine, Role
from workers.engine.kv import BlockSpace, BlockSpaceConfig
from workers.engine.runner import LocalRunner
from workers.engine.scheduler import SchedulerConfig
from workers.engine.speculate import SpeculationConfig, Speculator, model_compressors
from workers.engine.staged_cache import StagedCache
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import kv_shape
from workers.kv.space import PagedKvSpace
from workers.model.cache import ContiguousCache, EntryKind
from workers.model.init import init_random
from workers.model.loader import load
from workers.model.model import DeepseekV4

pytestmark = pytest.mark.workers

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "models" / "tiny-demo"
TOK = ByteTokenizer()
TEXTS = ("The router picks", "Compressed KV blocks move from prefill",
         "Tandem keeps the compression end to end: in the pools, on the wire")


@pytest.fixture(scope="module")
def demo() -> DeepseekV4:
    return load(DEMO, dtype=torch.float32, quant_sim=False, progress=False)


@pytest.fixture(scope="module")
def demo_sim() -> DeepseekV4:
    return load(DEMO, dtype=torch.float32, quant_sim=True, progress=False)


@pytest.fixture(scope="module")
def untrained_mtp(demo: DeepseekV4) -> DeepseekV4:
    """The demo's main model with a random MTP layer: its drafts are almost always wrong."""
    m = init_random(DeepseekV4(demo.cfg, quant_sim=False, with_mtp=True), seed=3)
    m.load_state_dict({k: v for k, v in demo.state_dict().items() if not k.startswith("mtp.")}, strict=False)
    return m.eval()


def engine(model: DeepseekV4, k: int, role: Role = Role.AGGREGATED, paged: bool = False) -> Engine:
    spec = Speculator(model, SpeculationConfig(k)) if k else None
    if paged:
        geom = KvGeometry.of(kv_shape(model.cfg, with_mtp=k > 0, mtp_hidden=k > 0))
        kv = PagedKvSpace(KvCacheManager(geom, KvCapacity(16, 24, 6), f"w{k}"), model.cfg.num_layers, model.dtype)
    else:
        kv = BlockSpace(BlockSpaceConfig(64, 256), model.cfg.window)
    return Engine(role, model.cfg, SchedulerConfig(prefix_caching=paged), kv, LocalRunner(model), TOK, spec)


def run_all(eng: Engine, reqs: list[GenerationRequest]) -> dict[str, list[int]]:
    for r in reqs:
        eng.add(r)
    return drain(eng).tokens


def prompts() -> list[list[int]]:
    # Text the demo knows (drafts accepted), and random prompts whose decode crosses the CSA ratio,
    # the window / HCA ratio (128) and the 256-token block.
    return [TOK.encode(t) for t in TEXTS] + random_prompts((3, 121, 250), seed=5)


GREEDY = SamplingConfig(max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 2])
def test_greedy_speculation_equals_plain_decoding(demo: DeepseekV4, k: int) -> None:
    reqs = requests(prompts(), GREEDY)
    plain = engine(demo, 0)
    want = run_all(plain, reqs)
    eng = engine(demo, k)
    got = run_all(eng, reqs)
    assert got == want
    for r in reqs[:2]:  # and both equal a sequential greedy loop on the model itself
        assert got[r.request_id] == greedy_reference(demo, list(r.prompt_ids), GREEDY.max_tokens)
    st = eng.stats()
    assert st.drafted_tokens > 0 and 0 < st.accepted_tokens <= st.drafted_tokens
    assert st.steps < plain.stats().steps  # some steps emitted several tokens
    assert eng.kv.blocks_used == 0


def test_seeded_sampling_equals_plain_decoding(demo: DeepseekV4) -> None:
    sp = [SamplingConfig(max_tokens=20, temperature=t, top_p=p, seed=s, ignore_eos=True)
          for t, p, s in ((0.9, 1.0, 11), (1.3, 0.9, 12), (0.7, 0.95, 13), (1.0, 1.0, 14), (2.0, 1.0, 15),
                          (0.8, 1.0, 16))]
    reqs = requests(prompts(), sp)
    want = run_all(engine(demo, 0), reqs)
    eng = engine(demo, 2)
    assert run_all(eng, reqs) == want
    assert eng.stats().accepted_tokens > 0


def test_rejected_drafts_leave_the_output_exact(untrained_mtp: DeepseekV4) -> None:
    reqs = requests(prompts(), GREEDY)
    want = run_all(engine(untrained_mtp, 0), reqs)
    eng = engine(untrained_mtp, 2)
    assert run_all(eng, reqs) == want
    st = eng.stats()
    # Nearly every draft is rejected, so almost every verify rolls back 1 or 2 positions.
    assert st.drafted_tokens > 100 and st.accepted_tokens < st.drafted_tokens // 4


def test_paged_pools_with_prefix_hits_equal_and_free(demo_sim: DeepseekV4) -> None:
    sp = SamplingConfig(max_tokens=16, ignore_eos=True)
    reqs = requests([TOK.encode(TEXTS[2]), *random_prompts((300,), seed=8)], sp)
    again = [GenerationRequest(f"again{i}", r.prompt_ids, sp) for i, r in enumerate(reqs)]
    ref = engine(demo_sim, 0, paged=True)
    want, want2 = run_all(ref, reqs), run_all(ref, again)
    eng = engine(demo_sim, 2, paged=True)
    assert run_all(eng, reqs) == want
    assert run_all(eng, again) == want2  # the 300-token prompt now hits its cached block
    assert eng.stats().prefix_hit_rate > 0 and eng.stats().accepted_tokens > 0
    states = eng.kv.manager.allocators[PoolKind.STATE]
    assert eng.kv.blocks_used == 0 and states.num_free == states.num_pages


@pytest.mark.parametrize("pos0,n", [(120, 3), (125, 3), (126, 3), (127, 3), (250, 3), (254, 3), (2, 3), (6, 3),
                                    (7, 2)])
def test_a_committed_prefix_is_the_cache_a_shorter_step_leaves(demo: DeepseekV4, pos0: int, n: int) -> None:
    """Stage a step of n positions after pos0 tokens, commit each length m: the cache equals one that
    ran just those m positions (windows, entries, compressor states; all layers)."""
    ids = torch.tensor(random_prompts((pos0 + n,), seed=pos0)[0])
    comps = model_compressors(demo)
    for m in range(1, n + 1):  # every length commits, an HCA entry finished inside the step too
        got = staged_commit(demo, ids, pos0, n, m, comps)
        want = demo.new_cache()
        demo.step([(0, ids[:pos0])], want)
        demo.step([(0, ids[pos0 : pos0 + m])], want)
        assert_same_cache(demo, got, want, pos0 + m)


def staged_commit(model: DeepseekV4, ids: torch.Tensor, pos0: int, n: int, m: int, comps: dict
                  ) -> ContiguousCache:
    cache = model.new_cache()
    model.step([(0, ids[:pos0])], cache)
    staged = StagedCache(cache, model.cfg.window, comps, [0])
    model.step([(0, ids[pos0 : pos0 + n])], staged)
    assert cache.length(0) == pos0  # nothing reached the base cache yet
    staged.commit(0, m)
    return cache


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, same values up to float rounding: a forward over n rows and one over m rows do
    not round alike (matmul blocking), so rows agree to ~1e-6, not bit for bit."""
    return a.shape == b.shape and (a.numel() == 0 or float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max())))


def assert_same_cache(model: DeepseekV4, got: ContiguousCache, want: ContiguousCache, length: int) -> None:
    assert got.length(0) == want.length(0) == length
    for layer in range(model.cfg.num_layers):
        assert close(got.window(layer, 0), want.window(layer, 0)), layer
        for kind in (EntryKind.ATTN, EntryKind.INDEX):
            s, t = got.compressor_state(layer, 0, kind), want.compressor_state(layer, 0, kind)
            assert (s is None) == (t is None), (layer, kind)
            if s is not None and t is not None:
                assert s.start == t.start and close(s.kv, t.kv) and close(s.score, t.score), (layer, kind)
                assert (s.pool is None) == (t.pool is None), (layer, kind)
                if s.pool is not None and t.pool is not None:
                    assert s.pool.count == t.pool.count and s.end == t.end, (layer, kind)
                if s.pool is not None and t.pool is not None and t.pool.count:
                    assert close(s.pool.max, t.pool.max) and close(s.pool.sum, t.pool.sum), (layer, kind)
                    assert close(s.pool.wsum, t.pool.wsum), (layer, kind)
                assert close(got.entries(layer, 0, kind), want.entries(layer, 0, kind)), (layer, kind)


def test_max_tokens_and_stops_cut_a_multi_token_accept_exactly(demo: DeepseekV4) -> None:
    prompt = tuple(TOK.encode(TEXTS[0]))
    ref = greedy_reference(demo, list(prompt), 16)
    cases: list[SamplingConfig] = [SamplingConfig(max_tokens=n, ignore_eos=True) for n in range(1, 9)]
    cases += [SamplingConfig(max_tokens=16, ignore_eos=True, stop_token_ids=(ref[j],)) for j in range(1, 9)
              if ref[j] not in ref[:j]]
    cases += [SamplingConfig(max_tokens=16, ignore_eos=True, stop=(TOK.decode(ref[j : j + 2]),)) for j in (2, 5, 7)]
    reqs = [GenerationRequest(f"c{i}", prompt, sp) for i, sp in enumerate(cases)]
    plain, spec = engine(demo, 0), engine(demo, 2)
    for r in reqs:
        plain.add(r)
        spec.add(r)
    want, got = drain(plain), drain(spec)
    assert got.tokens == want.tokens and got.text == want.text and got.finish == want.finish
    for i, sp in enumerate(cases[:8]):
        assert got.tokens[f"c{i}"] == ref[: sp.max_tokens]
    # The cuts really fell inside multi-token accepts: some deltas carry more than one token.
    assert max(len(d.token_ids) for o in got.outputs for d in o.deltas) == 3
    assert spec.kv.blocks_used == 0


def test_handed_off_request_drafts_on_its_first_decode_step(demo: DeepseekV4) -> None:
    sp = SamplingConfig(max_tokens=12, temperature=0.8, seed=4, ignore_eos=True)
    reqs = requests([TOK.encode(t) for t in TEXTS] + random_prompts((130,), seed=9), sp)
    want = run_all(engine(demo, 0), reqs)
    pre, dec = engine(demo, 2, Role.PREFILL), engine(demo, 2, Role.DECODE)
    firsts = {}
    for r in reqs:
        pre.add(r)
    while pre.has_work:
        for d in pre.step().deltas:
            firsts[d.request_id] = d.token_ids[0]
    for r in reqs:
        dec.add_prefilled(r, firsts[r.request_id], pre.take_handoff(r.request_id))
    assert pre.kv.blocks_used == 0
    first_step = dec.step()
    assert dec.stats().drafted_tokens == 2 * len(reqs)  # every request drafted on its first step
    rest = drain(dec).tokens
    for r in reqs:
        first_delta = [t for d in first_step.deltas if d.request_id == r.request_id for t in d.token_ids]
        assert [firsts[r.request_id], *first_delta, *rest.get(r.request_id, [])] == want[r.request_id]
    assert dec.kv.blocks_used == 0


def test_a_speculating_decode_refuses_a_handoff_without_mtp_state(demo: DeepseekV4) -> None:
    r = GenerationRequest("plain", tuple(TOK.encode(TEXTS[0])), GREEDY)
    pre = engine(demo, 0, Role.PREFILL)
    pre.add(r)
    first = next(d.token_ids[0] for d in pre.step().deltas)
    dec = engine(demo, 1, Role.DECODE)
    with pytest.raises(ValueError, match="MTP"):
        dec.add_prefilled(r, first, pre.take_handoff("plain"))
    assert dec.request_ids() == ()


def test_config_and_model_are_checked(tiny_model: DeepseekV4) -> None:
    with pytest.raises(ValueError, match="mtp_tokens"):
        SpeculationConfig(3)
    with pytest.raises(ValueError, match="no MTP layer"):
        Speculator(tiny_model, SpeculationConfig(1))


def test_a_rank_built_with_speculation_drafts_and_keeps_the_mtp_pages() -> None:
    cfg = WorkerConfig(instance="decode-0", role=Role.DECODE, model=ModelSource(checkpoint=str(DEMO)),
                       kv=PagedPoolsConfig(8, 16, 4), speculation=SpeculationConfig(2))
    built = build_rank(cfg)
    eng = built.engine
    assert eng.speculator is not None and eng.kv.cache.holds_draft_hidden
    assert eng.kv.manager.geometry.shape.compress_ratios[-1] == 0  # the MTP layer's window is paged
    want = greedy_reference(demo_model(built), list(TOK.encode(TEXTS[0])), 10)
    assert run_all(eng, requests([TOK.encode(TEXTS[0])], SamplingConfig(max_tokens=10, ignore_eos=True))) == {
        "r0": want}
    assert eng.stats().accepted_tokens > 0


def demo_model(built: BuiltRank) -> DeepseekV4:
    runner = built.runner
    assert isinstance(runner, LocalRunner)
    return runner.model


def test_the_spec_turns_speculation_on_for_every_rank_of_both_pools() -> None:
    data = yaml.safe_load((DEMO.parents[2] / "deploy" / "local.yaml").read_text())
    assert parse_spec(data, "local").decode.speculation.mtp_tokens == 0  # off unless asked
    data["decode"]["speculation"] = {"mtp_tokens": 2}
    data["prefill"]["ep_ranks"] = 2
    spec = parse_spec(data, "local")
    for role in (Role.PREFILL, Role.DECODE):
        assert [c.speculation for c in instance_plan(spec, role, "i").configs] == [SpeculationConfig(2)] * (
            2 if role is Role.PREFILL else 1)
    data["decode"]["speculation"] = {"mtp_tokens": 3}
    with pytest.raises(SpecError, match="mtp_tokens"):
        parse_spec(data, "local")


@pytest.mark.slow  # two spawned rank processes: 10-20 s on this machine
def test_expert_parallel_ranks_speculate_in_lockstep_and_equal_one_rank(demo: DeepseekV4) -> None:
    from ep_procs import spawn
    from spec_ep_procs import speculating_rank

    sp = [SamplingConfig(max_tokens=12, ignore_eos=True), SamplingConfig(max_tokens=12, ignore_eos=True),
          SamplingConfig(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True),
          SamplingConfig(max_tokens=3, ignore_eos=True)]
    reqs = requests([TOK.encode(t) for t in TEXTS] + random_prompts((40,), seed=2), sp)
    want = run_all(engine(demo, 0), reqs)
    # Data-parallel attention: rank 0 serves three requests, rank 1 one short one and then idles
    # (its steps make empty MoE calls, chained MTP pass included).
    runs = spawn(speculating_rank, 2, [reqs[:3], reqs[3:]], 2)
    assert {**runs[0][0], **runs[1][0]} == want
    assert runs[0][1] == runs[1][1]  # lockstep: the idle rank stepped too
    assert runs[0][2] > 0 and runs[0][3] > 0


def test_preempted_speculating_requests_recompute_to_the_same_tokens(demo: DeepseekV4) -> None:
    """KV for 7 blocks of 16 positions: requests are preempted (their drafts' extra positions too)
    and recomputed, after which their MTP state is rebuilt and they draft again."""
    reqs = requests([TOK.encode(t)[:14] for t in TEXTS], SamplingConfig(max_tokens=40, ignore_eos=True))
    want = run_all(engine(demo, 0), reqs)
    kv = BlockSpace(BlockSpaceConfig(7, 16), demo.cfg.window)
    eng = Engine(Role.AGGREGATED, demo.cfg, SchedulerConfig(), kv, LocalRunner(demo), TOK,
                 Speculator(demo, SpeculationConfig(2)))
    assert run_all(eng, reqs) == want
    st = eng.stats()
    assert st.preemptions > 0 and st.accepted_tokens > 0 and kv.blocks_used == 0
