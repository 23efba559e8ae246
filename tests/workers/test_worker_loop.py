"""The actor loop without Ray: one StepBatch per step, cancellation between steps, failure handling."""

from __future__ import annotations

import asyncio

import pytest
from workers_util import greedy_reference, make_engine, random_prompts

from tandem.request import GenerationRequest, SamplingConfig
from tandem.stream import Finish
from workers.worker_loop import EngineLoop

pytestmark = pytest.mark.workers


def test_loop_publishes_one_batch_per_step_with_every_request(tiny_model, tokenizer) -> None:
    prompts = random_prompts((10, 40, 25), seed=20)

    async def scenario():
        engine = make_engine(tiny_model, tokenizer)
        loop = EngineLoop(engine, None, "agg/r0")
        sub = loop.subscribe()
        loop.start()
        for i, p in enumerate(prompts):
            await loop.call(engine.add, GenerationRequest(f"q{i}", tuple(p), SamplingConfig(max_tokens=5,
                                                                                              ignore_eos=True)))
        batches, done = [], set()
        while len(done) < 3:
            b = await asyncio.wait_for(sub.get(), 60)
            batches.append(b)
            done |= {d.request_id for d in b.deltas if d.finish is not None}
        sub.close()
        await loop.stop()
        return batches

    batches = asyncio.run(scenario())
    steps = [b.step for b in batches]
    assert steps == sorted(set(steps))  # one batch per step, in order
    assert all(b.worker == "agg/r0" for b in batches)
    tokens = {f"q{i}": [] for i in range(3)}
    for b in batches:
        for d in b.deltas:
            tokens[d.request_id].extend(d.token_ids)
    assert [tokens[f"q{i}"] for i in range(3)] == [greedy_reference(tiny_model, p, 5) for p in prompts]
    assert any(len(b.deltas) == 3 for b in batches)


class _Broken:
    """A runner that fails on its second step."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def run(self, chunks, cache):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("device lost")
        return self.inner.run(chunks, cache)


def test_a_failing_step_aborts_every_request_and_later_calls_raise(tiny_model, tokenizer) -> None:
    async def scenario():
        engine = make_engine(tiny_model, tokenizer)
        engine.runner = _Broken(engine.runner)
        loop = EngineLoop(engine, None, "agg/r0")
        sub = loop.subscribe()
        loop.start()
        for i in range(2):
            await loop.call(engine.add, GenerationRequest(f"f{i}", (1, 2, 3), SamplingConfig(max_tokens=9)))
        ended = {}
        while len(ended) < 2:
            b = await asyncio.wait_for(sub.get(), 60)
            ended |= {d.request_id: d for d in b.deltas if d.finish is not None}
        with pytest.raises(RuntimeError, match="engine loop failed"):
            await loop.call(engine.stats)
        return ended

    ended = asyncio.run(scenario())
    assert {d.finish for d in ended.values()} == {Finish.ABORTED}
    assert all("device lost" in d.summary.error for d in ended.values())
