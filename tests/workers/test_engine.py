"""The engine on the tiny model: batching, chunking, preemption, cancellation, handoff, stops.

References are independent: greedy generation straight on the model, one request at a time.
"""

from __future__ import annotations

import pytest
from workers_util import drain, greedy_reference, make_engine, random_prompts, requests

from tandem.request import GenerationRequest, SamplingConfig
from tandem.stream import Finish
from workers.engine.engine import Role
from workers.engine.scheduler import SchedulerConfig

pytestmark = pytest.mark.workers

LENGTHS = (3, 37, 129, 200, 260, 9)


def test_greedy_batch_equals_sequential_generation(tiny_model, tokenizer) -> None:
    prompts = random_prompts(LENGTHS)
    sp = SamplingConfig(max_tokens=10, ignore_eos=True)
    expected = [greedy_reference(tiny_model, p, 10) for p in prompts]
    # Small budget and chunk: long prompts are prefilled in several chunks, mixed with decodes.
    engine = make_engine(tiny_model, tokenizer, sched=SchedulerConfig(max_batched_tokens=96, prefill_chunk=64))
    for r in requests(prompts, sp):
        engine.add(r)
    got = drain(engine)
    assert [got.tokens[f"r{i}"] for i in range(len(prompts))] == expected
    assert all(got.finish[f"r{i}"] is Finish.LENGTH for i in range(len(prompts)))
    assert all(o.num_tokens <= 96 for o in got.outputs)
    assert max(len([d for d in o.deltas if d.token_ids]) for o in got.outputs) > 1  # really batched
    st = engine.stats()
    assert (st.running, st.queued, st.blocks_used) == (0, 0, 0)
    assert st.prefill_tokens == sum(LENGTHS) and st.decode_tokens == 10 * len(prompts)


def test_requests_join_and_leave_every_step(tiny_model, tokenizer) -> None:
    prompts = random_prompts((20, 30, 40), seed=5)
    caps = [3, 8, 5]
    engine = make_engine(tiny_model, tokenizer)
    engine.add(GenerationRequest("r0", tuple(prompts[0]), SamplingConfig(max_tokens=caps[0], ignore_eos=True)))
    first = engine.step()
    assert [d.request_id for d in first.deltas] == ["r0"]
    for i in (1, 2):  # join while r0 decodes
        engine.add(GenerationRequest(f"r{i}", tuple(prompts[i]), SamplingConfig(max_tokens=caps[i], ignore_eos=True)))
    got = drain(engine)
    tokens = {"r0": list(first.deltas[0].token_ids) + got.tokens["r0"], "r1": got.tokens["r1"], "r2": got.tokens["r2"]}
    for i, cap in enumerate(caps):
        assert tokens[f"r{i}"] == greedy_reference(tiny_model, prompts[i], cap)
    # r0 leaves after 3 tokens while the others keep running.
    running_after = [len(o.deltas) for o in got.outputs]
    assert running_after[0] == 3 and running_after[-1] == 1


def test_sampled_output_is_reproducible_and_batch_independent(tiny_model, tokenizer) -> None:
    prompts = random_prompts((15, 50, 140), seed=2)
    params = [SamplingConfig(temperature=0.9, top_p=0.95, top_k=50, seed=s, max_tokens=12, ignore_eos=True)
              for s in (11, 12, 13)]

    def run_batch():
        engine = make_engine(tiny_model, tokenizer)
        for r in requests(prompts, params):
            engine.add(r)
        return drain(engine).tokens

    a, b = run_batch(), run_batch()
    assert a == b
    greedy = [greedy_reference(tiny_model, p, 12) for p in prompts]
    assert any(a[f"r{i}"] != greedy[i] for i in range(3))  # it really sampled
    # Alone, with a different chunking, the same request yields the same tokens.
    solo = make_engine(tiny_model, tokenizer, sched=SchedulerConfig(prefill_chunk=32))
    solo.add(GenerationRequest("r1", tuple(prompts[1]), params[1]))
    assert drain(solo).tokens["r1"] == a["r1"]


def test_preemption_under_a_small_pool_keeps_outputs(tiny_model, tokenizer) -> None:
    prompts = random_prompts((40, 60, 50, 30), seed=3)
    params = [SamplingConfig(max_tokens=24, ignore_eos=True), SamplingConfig(max_tokens=24, ignore_eos=True),
              SamplingConfig(temperature=1.0, seed=4, max_tokens=24, ignore_eos=True),
              SamplingConfig(temperature=0.7, seed=5, max_tokens=24, ignore_eos=True)]
    roomy = make_engine(tiny_model, tokenizer, num_blocks=64, block_size=16)
    tight = make_engine(tiny_model, tokenizer, num_blocks=14, block_size=16)
    for r in requests(prompts, params):
        roomy.add(r)
        tight.add(r)
    want, got = drain(roomy), drain(tight)
    assert roomy.stats().preemptions == 0
    assert tight.stats().preemptions > 0
    assert got.tokens == want.tokens
    assert [got.tokens[f"r{i}"] for i in (0, 1)] == [greedy_reference(tiny_model, prompts[i], 24) for i in (0, 1)]
    assert tight.stats().blocks_used == 0


def test_cancel_frees_blocks_at_once(tiny_model, tokenizer) -> None:
    prompts = random_prompts((100, 80), seed=4)
    engine = make_engine(tiny_model, tokenizer, num_blocks=40, block_size=16)
    for r in requests(prompts, SamplingConfig(max_tokens=50, ignore_eos=True)):
        engine.add(r)
    engine.step()
    engine.step()
    before = engine.stats()
    assert before.running == 2 and before.blocks_used == 7 + 6  # ceil(101/16) + ceil(81/16)
    assert engine.cancel("r0")
    after = engine.stats()
    assert (after.running, after.blocks_used, after.blocks_free) == (1, 6, 34)
    assert not engine.cancel("r0") and not engine.cancel("nope")
    out = engine.step()
    cancelled = [d for d in out.deltas if d.request_id == "r0"]
    assert len(cancelled) == 1 and cancelled[0].finish is Finish.CANCELLED
    assert cancelled[0].token_ids == () and cancelled[0].summary.completion_tokens == 2


def test_stop_string_cuts_the_engine_text_exactly(tiny_model, tokenizer) -> None:
    # Find what the model says greedily, then stop on two characters from the middle of it.
    prompt = random_prompts((25,), seed=9)[0]
    ref = greedy_reference(tiny_model, prompt, 40)
    full = tokenizer.decode(ref)
    k = next(i for i in range(len(full) // 2, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    stop = full[k : k + 2]
    engine = make_engine(tiny_model, tokenizer)
    engine.add(GenerationRequest("s", tuple(prompt), SamplingConfig(max_tokens=40, ignore_eos=True, stop=(stop,))))
    got = drain(engine)
    assert got.finish["s"] is Finish.STOP
    assert got.text["s"] == full[: full.index(stop)]
    assert len(got.tokens["s"]) < 40


def test_prefill_handoff_then_decode_equals_aggregated(tiny_model, tokenizer) -> None:
    prompts = random_prompts((70, 150, 33), seed=6)
    params = [SamplingConfig(temperature=0.8, seed=21 + i, max_tokens=9, ignore_eos=True) for i in range(3)]
    agg = make_engine(tiny_model, tokenizer)
    for r in requests(prompts, params):
        agg.add(r)
    want = drain(agg).tokens
    pre = make_engine(tiny_model, tokenizer, role=Role.PREFILL)
    dec = make_engine(tiny_model, tokenizer, role=Role.DECODE)
    reqs = requests(prompts, params)
    for r in reqs:
        pre.add(r)
    first = drain(pre)
    assert all(len(first.tokens[r.request_id]) == 1 for r in reqs)
    assert sorted(h for o in first.outputs for h in o.handoffs) == ["r0", "r1", "r2"]
    assert not first.finish  # handed off, not finished
    assert pre.stats().handoffs_held == 3 and pre.stats().blocks_used == 1 + 1 + 1
    for i, r in enumerate(reqs):
        # r1 "loses" its transfer and is recomputed on the decode: same tokens either way.
        kv = None if i == 1 else pre.take_handoff(r.request_id)
        if kv is None:
            pre.release_handoff(r.request_id)
        dec.add_prefilled(r, first.tokens[r.request_id][0], kv)
    assert pre.stats().blocks_used == 0
    done = drain(dec)
    rest = done.tokens
    for r in reqs:
        assert first.tokens[r.request_id] + rest[r.request_id] == want[r.request_id]
    last = {d.request_id: d for o in done.outputs for d in o.deltas if d.finish is not None}
    # The KV came by handoff for r0 and r2 (not computed here); r1 was recomputed.
    assert [last[f"r{i}"].summary.cached_tokens for i in range(3)] == [70, 0, 33]
    assert all(last[f"r{i}"].summary.completion_tokens == 9 for i in range(3))


def test_request_too_long_for_the_pool_is_refused(tiny_model, tokenizer) -> None:
    engine = make_engine(tiny_model, tokenizer, num_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="more than this engine's KV can ever hold"):
        engine.add(GenerationRequest("big", tuple(range(30)), SamplingConfig(max_tokens=3)))


def test_migrated_request_continues_exactly(tiny_model, tokenizer) -> None:
    prompt = random_prompts((90,), seed=15)[0]
    sp = SamplingConfig(temperature=0.9, top_k=40, seed=77, max_tokens=14, ignore_eos=True)
    whole = make_engine(tiny_model, tokenizer)
    whole.add(GenerationRequest("m", tuple(prompt), sp))
    want = drain(whole)
    # The first worker streamed 6 tokens (and their text) before it died.
    first = make_engine(tiny_model, tokenizer)
    first.add(GenerationRequest("m", tuple(prompt), sp))
    streamed, text = [], ""
    while len(streamed) < 6:
        for d in first.step().deltas:
            streamed += d.token_ids
            text += d.text
    second = make_engine(tiny_model, tokenizer)
    second.add_resumed(GenerationRequest("m", tuple(prompt), sp), streamed)
    rest = drain(second)
    assert streamed + rest.tokens["m"] == want.tokens["m"]
    assert text + rest.text["m"] == want.text["m"]
    assert second.stats().prefill_tokens == 90 + 6  # prompt + streamed tokens recomputed
    with pytest.raises(ValueError, match="already end the request"):
        second.add_resumed(GenerationRequest("m2", tuple(prompt), sp), want.tokens["m"])
