"""Logprobs: the sampler against hand computation, the engine against the model run straight.

References are independent of the engine: `math` on small logit vectors and a float64 log_softmax
at DeepSeek-V4's vocabulary for the sampler (within 1e-6: the normaliser's terms are float32), and
one full forward pass of the tiny model over prompt + generated tokens (fresh cache, every row's
logits) for the engine, whose tokens came from batched, chunked prefill and step-by-step decode;
plain decoding for MTP speculation (several tokens per delta, one logprob each).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from workers_util import make_engine, random_prompts

from tandem.request import GenerationRequest, SamplingConfig
from tandem.stream import Finish, TokenDelta, TokenLogprob
from tandem.tokenizer import ByteTokenizer
from workers.engine.engine import Engine, Role
from workers.engine.kv import BlockSpace, BlockSpaceConfig
from workers.engine.runner import LocalRunner
from workers.engine.sampler import sample_batch, token_logprobs
from workers.engine.scheduler import SchedulerConfig
from workers.engine.speculate import SpeculationConfig, Speculator
from workers.model.init import init_random
from workers.model.loader import load
from workers.model.model import DeepseekV4
from workers.model.presets import tiny

pytestmark = pytest.mark.workers

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "models" / "tiny-demo"


def _math_logprobs(logits: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in logits]
    m = max(scaled)
    z = math.log(sum(math.exp(v - m) for v in scaled)) + m
    return [v - z for v in scaled]


def test_sampler_logprobs_match_hand_computation_and_cover_a_tiny_vocab() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, 2.0, -1.0, 0.5, 2.5],
                           [0.3, -0.2, 0.9, 0.9, 0.1, 0.0, -2.0, 1.5],
                           [5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    params = [SamplingConfig(temperature=0.7, top_k=2, top_p=0.5, seed=1, logprobs=True, top_logprobs=20),
              SamplingConfig(logprobs=True, top_logprobs=3),  # greedy: temperature 1
              SamplingConfig(temperature=1.3, seed=2)]  # did not ask
    tokens = sample_batch(logits, params, [4, 4, 4])
    got = token_logprobs(logits, params, tokens)
    assert got[2] == ()
    # Row 0: top_logprobs 20 > vocab 8 gives the whole vocab; top-k / top-p do not change the values.
    want0 = _math_logprobs(logits[0].tolist(), 0.7)
    (lp0,) = got[0]
    assert lp0.token_id == tokens[0] and lp0.logprob == pytest.approx(want0[tokens[0]], abs=1e-6)
    assert [i for i, _ in lp0.top] == [1, 7, 2, 4, 0, 6, 3, 5]  # ties (ids 2 and 4) to the lower id
    assert [v for _, v in lp0.top] == pytest.approx([want0[i] for i, _ in lp0.top], abs=1e-6)
    assert math.fsum(math.exp(v) for _, v in lp0.top) == pytest.approx(1.0, abs=1e-6)
    # Row 1 greedy: the chosen token is the top-1 (tie 2/3 -> 2) and its logprob is the max.
    want1 = _math_logprobs(logits[1].tolist(), 1.0)
    (lp1,) = got[1]
    assert tokens[1] == 7 and lp1.top[0] == (7, lp1.logprob) and lp1.logprob == max(v for _, v in lp1.top)
    assert want1[7] == max(want1)
    assert lp1.logprob == pytest.approx(want1[7], abs=1e-6)
    assert [i for i, _ in lp1.top] == [7, 2, 3]
    # Only the chosen logprob when top_logprobs is 0.
    (only,) = token_logprobs(logits[:1], [SamplingConfig(logprobs=True)], [5])[0]
    assert only == TokenLogprob(5, only.logprob, ()) and only.logprob == pytest.approx(
        _math_logprobs(logits[0].tolist(), 1.0)[5], abs=1e-6)
    # Boundary tie: with n = 2 of [5, 1, 0, 0, ...] at row 2 the second is the lowest id of the zeros.
    (tie,) = token_logprobs(logits[2:], [SamplingConfig(logprobs=True, top_logprobs=2)], [0])[0]
    assert [i for i, _ in tie.top] == [0, 1]
    tie3 = token_logprobs(logits[2:], [SamplingConfig(logprobs=True, top_logprobs=4)], [0])[0][0]
    assert [i for i, _ in tie3.top] == [0, 1, 2, 3]


def test_sampler_logprobs_at_the_full_vocabulary_match_float64_log_softmax() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 129280, generator=g) * 4
    params = [SamplingConfig(logprobs=True, top_logprobs=20),
              SamplingConfig(temperature=0.6, seed=1, logprobs=True, top_logprobs=7),
              SamplingConfig(temperature=1.9, seed=2, logprobs=True)]
    tokens = [17, 4242, 129279]
    got = token_logprobs(logits, params, tokens)
    for r, sp in enumerate(params):
        ref = torch.log_softmax(logits[r].double() / (1.0 if sp.greedy else sp.temperature), dim=0)
        (lp,) = got[r]
        assert lp.logprob == pytest.approx(float(ref[tokens[r]]), abs=1e-6)
        want = torch.sort(ref, descending=True, stable=True)
        assert [i for i, _ in lp.top] == want.indices[: sp.top_logprobs].tolist()
        assert [v for _, v in lp.top] == pytest.approx(want.values[: sp.top_logprobs].tolist(), abs=1e-6)


def test_sampler_logprobs_refuse_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="2 params, 1 tokens"):
        token_logprobs(torch.zeros(2, 4), [SamplingConfig(), SamplingConfig()], [0])


def _run(engine: Engine) -> tuple[dict[str, list[int]], dict[str, list[TokenLogprob]], list[TokenDelta]]:
    """Step until idle: per request its tokens and logprobs; and every delta (to check lengths)."""
    toks: dict[str, list[int]] = {}
    lps: dict[str, list[TokenLogprob]] = {}
    deltas: list[TokenDelta] = []
    while engine.has_work:
        for d in engine.step().deltas:
            deltas.append(d)
            toks.setdefault(d.request_id, []).extend(d.token_ids)
            lps.setdefault(d.request_id, []).extend(d.logprobs)
    return toks, lps, deltas


def _straight(model: DeepseekV4, prompt: list[int], out: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) [len(out), vocab] of each generated position, from one
    forward pass of the model over prompt + out[:-1] (no engine, no paging, no batching)."""
    with torch.no_grad():
        logits = model.prefill(0, torch.tensor(prompt + out[:-1]), model.new_cache())
    return torch.log_softmax(logits[len(prompt) - 1:].double() / temperature, dim=1)


def _check_against(ref: torch.Tensor, toks: list[int], lps: list[TokenLogprob], n: int, greedy: bool) -> None:
    assert [lp.token_id for lp in lps] == toks
    for pos, lp in enumerate(lps):
        assert lp.logprob == pytest.approx(float(ref[pos, lp.token_id]), abs=2e-4), pos
        assert len(lp.top) == n
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        # Each listed alternative has the reference's logprob, and they are the reference's n best.
        assert vals == pytest.approx([float(ref[pos, i]) for i, _ in lp.top], abs=2e-4)
        assert vals == pytest.approx(torch.topk(ref[pos], n).values.tolist(), abs=2e-4)
        partial = list(itertools.accumulate(math.exp(v) for v in vals))
        assert all(a <= b for a, b in zip(partial, partial[1:], strict=False))
        assert all(p <= 1.0 + 1e-6 for p in partial)
        if greedy:
            assert lp.top[0] == (lp.token_id, lp.logprob) and lp.logprob == max(vals)


def test_engine_logprobs_equal_the_model_run_straight(tiny_model, tokenizer) -> None:
    prompts = random_prompts((5, 90, 140, 33), seed=11)
    params = [SamplingConfig(max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5),
              SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True,
                             logprobs=True, top_logprobs=20),
              SamplingConfig(max_tokens=6, ignore_eos=True),  # did not ask: no logprobs at all
              SamplingConfig(temperature=1.7, seed=4, max_tokens=6, ignore_eos=True, logprobs=True)]
    # Chunked prefill mixed with decodes, all four requests batched.
    engine = make_engine(tiny_model, tokenizer, sched=SchedulerConfig(max_batched_tokens=64, prefill_chunk=48))
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add(GenerationRequest(f"r{i}", tuple(p), sp))
    toks, lps, deltas = _run(engine)
    assert all(len(d.logprobs) in (0, len(d.token_ids)) for d in deltas)
    assert all(d.logprobs == () for d in deltas if d.request_id == "r2") and toks["r2"]
    for i in (0, 1, 3):
        rid, sp = f"r{i}", params[i]
        assert len(lps[rid]) == len(toks[rid]) == 6
        ref = _straight(tiny_model, prompts[i], toks[rid], 1.0 if sp.greedy else sp.temperature)
        _check_against(ref, toks[rid], lps[rid], sp.top_logprobs, sp.greedy)


def test_with_a_16_token_vocabulary_the_top_20_is_the_whole_distribution(tokenizer) -> None:
    model = init_random(DeepseekV4(dataclasses.replace(tiny(), vocab_size=16), quant_sim=False, with_mtp=False),
                        seed=3).eval()
    engine = make_engine(model, tokenizer)
    params = [SamplingConfig(max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=20),
              SamplingConfig(temperature=0.5, seed=9, max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=20)]
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]]
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add(GenerationRequest(f"v{i}", tuple(p), sp))
    toks, lps, _ = _run(engine)
    for i in range(2):
        assert len(lps[f"v{i}"]) == 5
        for lp in lps[f"v{i}"]:
            assert sorted(t for t, _ in lp.top) == list(range(16))  # capped at the vocabulary
            assert math.fsum(math.exp(v) for _, v in lp.top) == pytest.approx(1.0, abs=1e-6)
            assert dict(lp.top)[lp.token_id] == lp.logprob
        ref = _straight(model, prompts[i], toks[f"v{i}"], 1.0 if params[i].greedy else params[i].temperature)
        _check_against(ref, toks[f"v{i}"], lps[f"v{i}"], 16, params[i].greedy)


def test_speculative_decoding_keeps_one_logprob_per_token_equal_to_plain_decoding() -> None:
    """MTP drafts accepted in one step give a delta of several tokens: each keeps its own logprob,
    as plain decoding computes it (a max_tokens that cuts an accept cuts its logprobs too)."""
    demo = load(DEMO, dtype=torch.float32, quant_sim=False, progress=False)
    tok = ByteTokenizer()
    prompts = [tok.encode("The router picks"), tok.encode("Compressed KV blocks move from prefill")]
    params = [SamplingConfig(max_tokens=13, ignore_eos=True, logprobs=True, top_logprobs=3),
              SamplingConfig(temperature=0.7, seed=5, max_tokens=11, ignore_eos=True, logprobs=True)]
    out = {}
    for k in (0, 2):
        kv = BlockSpace(BlockSpaceConfig(16, 256), demo.cfg.window)
        spec = Speculator(demo, SpeculationConfig(k)) if k else None
        eng = Engine(Role.AGGREGATED, demo.cfg, SchedulerConfig(), kv, LocalRunner(demo), tok, spec)
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            eng.add(GenerationRequest(f"s{i}", tuple(p), sp))
        out[k] = _run(eng)
        assert all(len(d.logprobs) == len(d.token_ids) for d in out[k][2])
    (toks0, lps0, _), (toks2, lps2, deltas2) = out[0], out[2]
    assert max(len(d.token_ids) for d in deltas2) > 1  # drafts were accepted
    assert toks2 == toks0
    for rid in toks0:
        assert [lp.token_id for lp in lps2[rid]] == toks0[rid]
        assert [lp.logprob for lp in lps2[rid]] == pytest.approx([lp.logprob for lp in lps0[rid]], abs=1e-4)
        assert [[t for t, _ in lp.top] for lp in lps2[rid]] == [[t for t, _ in lp.top] for lp in lps0[rid]]


def test_a_stop_token_and_a_cut_stop_string_keep_their_logprobs(tiny_model, tokenizer) -> None:
    prompt = tokenizer.encode("logprobs at the stop")
    free = make_engine(tiny_model, tokenizer)
    free.add(GenerationRequest("free", tuple(prompt), SamplingConfig(max_tokens=8, ignore_eos=True)))
    out = _run(free)[0]["free"]
    stop_id = out[3]
    sp = SamplingConfig(max_tokens=8, ignore_eos=True, stop_token_ids=(stop_id,), logprobs=True, top_logprobs=2)
    engine = make_engine(tiny_model, tokenizer)
    engine.add(GenerationRequest("s", tuple(prompt), sp))
    toks, lps, deltas = _run(engine)
    k = out.index(stop_id)
    assert toks["s"] == out[: k + 1] and deltas[-1].finish is Finish.STOP
    assert deltas[-1].token_ids == (stop_id,) and deltas[-1].logprobs[0].token_id == stop_id
    _check_against(_straight(tiny_model, prompt, toks["s"], 1.0), toks["s"], lps["s"], 2, True)
    # A stop string made of the text of the first byte token that has any: its text is cut, its
    # logprob stays (token_ids and logprobs keep the same length).
    texts = [tokenizer.decode([t]) for t in out]
    j = next((j for j, t in enumerate(texts) if t.isprintable() and t), None)
    if j is None:
        pytest.fail(f"no printable byte token in the greedy output {out}: pick another prompt")
    stop_text = texts[j]
    engine.add(GenerationRequest("t", tuple(prompt), SamplingConfig(max_tokens=8, ignore_eos=True,
                                                                    stop=(stop_text,), logprobs=True)))
    toks, lps, deltas = _run(engine)
    last = deltas[-1]
    assert last.finish is Finish.STOP and stop_text not in "".join(d.text for d in deltas)
    assert len(toks["t"]) == len(lps["t"]) and toks["t"][-1] == out[j] and lps["t"][-1].token_id == out[j]


def test_disaggregated_logprobs_equal_aggregated(tiny_model, tokenizer) -> None:
    prompts = random_prompts((70, 150, 33), seed=6)
    params = [SamplingConfig(temperature=0.8, seed=21 + i, max_tokens=5, ignore_eos=True, logprobs=True,
                             top_logprobs=3 * i) for i in range(3)]
    reqs = [GenerationRequest(f"r{i}", tuple(p), sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    want: dict[str, list[TokenLogprob]] = {}
    for r in reqs:  # each alone, as the prefill and the decode will run it
        agg = make_engine(tiny_model, tokenizer)
        agg.add(r)
        want[r.request_id] = _run(agg)[1][r.request_id]
    pre = make_engine(tiny_model, tokenizer, role=Role.PREFILL)
    dec = make_engine(tiny_model, tokenizer, role=Role.DECODE)
    for r in reqs:
        pre.add(r)
        _, first, _ = _run(pre)  # the prefill's first token, with its logprob
        assert len(first[r.request_id]) == 1
        dec.add_prefilled(r, first[r.request_id][0].token_id, pre.take_handoff(r.request_id))
        _, rest, _ = _run(dec)
        got = first[r.request_id] + rest[r.request_id]
        assert got == want[r.request_id], r.request_id  # exact: same floats, same top lists
        assert [len(lp.top) for lp in got] == [r.sampling.top_logprobs] * 5
