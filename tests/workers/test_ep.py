"""Expert parallelism over gloo with ranks as plain processes: exchanges, sharding, same tokens."""

from __future__ import annotations

import pytest
from ep_procs import engine_rank, exchange_rank, spawn
from workers_util import drain, make_engine, random_prompts, requests

from tandem.request import SamplingConfig

pytestmark = [pytest.mark.workers, pytest.mark.slow]


@pytest.mark.parametrize("capacity", [0, 2], ids=["variable", "padded"])
def test_exchange_delivers_rows_by_source_and_back(capacity: int) -> None:
    world = 3
    results = spawn(exchange_rank, world, capacity)
    sent = [r[3] for r in results]
    for rank, (got, recv, back, rows, nbytes) in enumerate(results):
        # What rank receives: every source's rows addressed to it, grouped by source in order.
        expected = [row for src in range(world) for row in sent[src] if row[1] == rank]
        assert got == expected
        assert recv == [sum(1 for row in sent[src] if row[1] == rank) for src in range(world)]
        # The return trip brings each row back to its sender, in the sender's order, x10.
        assert back == [[10 * v for v in row] for row in rows]
        to_others = sum(1 for row in rows if row[1] != rank)
        if capacity == 0:
            from_others = sum(recv) - recv[rank]
            assert nbytes == (to_others + from_others) * 3 * 4  # there and back, float32 rows of 3
        else:
            assert nbytes > 0 and nbytes % (2 * (world - 1) * 3 * 4) == 0  # whole padded messages


@pytest.mark.parametrize("capacity", [0, 16], ids=["variable", "padded"])
def test_ep2_serves_the_same_tokens_as_ep1(tiny_model, tokenizer, capacity: int) -> None:
    prompts = random_prompts((12, 140, 70, 30), seed=8)
    params = [SamplingConfig(max_tokens=8, ignore_eos=True)] * 2 + [
        SamplingConfig(temperature=0.9, seed=31, max_tokens=8, ignore_eos=True),
        SamplingConfig(max_tokens=3, ignore_eos=True),
    ]
    reqs = requests(prompts, params)
    ep1 = make_engine(tiny_model, tokenizer)
    for r in reqs:
        ep1.add(r)
    want = drain(ep1).tokens
    # Data-parallel attention: rank 0 serves three requests, rank 1 one short one, then idles.
    runs = spawn(engine_rank, 2, [reqs[:3], reqs[3:]], capacity)
    got = {**runs[0].tokens, **runs[1].tokens}
    assert got == want
    assert runs[0].total_expert_params == expert_params_of(tiny_model)
    assert [r.expert_params for r in runs] == [runs[0].total_expert_params // 2] * 2
    assert all(r.bytes_dispatched > 0 for r in runs)
    assert runs[0].steps == runs[1].steps  # lockstep: the idle rank stepped too


def expert_params_of(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
