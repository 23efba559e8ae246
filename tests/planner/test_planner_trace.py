"""Trace loading and generated loads: block hashes through tandem.blocks, sharing, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.planner.generators import Lengths, bursty, multi_turn, poisson, shared_prefix
from orchestrator.planner.trace import content_tokens, load_mooncake, parse_mooncake_line
from tandem.blocks import block_hashes

pytestmark = pytest.mark.planner

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake-synthetic.jsonl"


def _line(ts: int, n_in: int, n_out: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids})


def test_hash_ids_become_chained_block_hashes() -> None:
    a = parse_mooncake_line(_line(1500, 1300, 7, [10, 11, 12]), 0)
    b = parse_mooncake_line(_line(2000, 1290, 3, [10, 11, 99]), 1)
    assert (a.arrival_s, a.prompt_tokens, a.output_tokens) == (1.5, 1300, 7)
    assert len(a.block_hashes) == 1300 // 256 and len(b.block_hashes) == 1290 // 256
    # ids 10 and 11 = 1024 shared tokens = 4 shared blocks; id 12 vs 99 differ from block 4 on
    assert a.block_hashes[:4] == b.block_hashes[:4]
    assert a.block_hashes[4] != b.block_hashes[4]
    # exactly what the router computes from the tokens the ids stand for
    tokens = list(content_tokens(10, 512)) + list(content_tokens(11, 512)) + list(content_tokens(12, 276))
    assert a.block_hashes == tuple(block_hashes(tokens))


def test_uncovered_tail_gets_its_own_content() -> None:
    a = parse_mooncake_line(_line(0, 1000, 1, [5]), 0)  # one id covers 512 of 1000 tokens
    b = parse_mooncake_line(_line(0, 1000, 1, [5]), 1)
    assert len(a.block_hashes) == 3
    assert a.block_hashes[:2] == b.block_hashes[:2] and a.block_hashes[2] != b.block_hashes[2]


@pytest.mark.parametrize(("record", "field"), [
    ({"timestamp": 0, "input_length": 10, "output_length": 1}, "hash_ids"),
    ({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}, "input_length"),
    ({"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}, "timestamp"),
    ({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": ["x"]}, "hash_ids"),
])
def test_bad_records_name_line_and_field(record: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"t\.jsonl:4: .*{field}"):
        parse_mooncake_line(json.dumps(record), 3, "t.jsonl")


def test_synthetic_trace_slice_loads() -> None:
    reqs = load_mooncake(TRACE, limit=50)
    assert len(reqs) == 50
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    assert all(len(r.block_hashes) == r.prompt_tokens // 256 for r in reqs)


def test_generators_are_deterministic_for_a_seed() -> None:
    lengths = Lengths(700, 20, jitter=0.3)
    assert poisson(40, 5.0, lengths, seed=3) == poisson(40, 5.0, lengths, seed=3)
    assert poisson(40, 5.0, lengths, seed=3) != poisson(40, 5.0, lengths, seed=4)
    assert bursty(40, 5.0, lengths, seed=3) == bursty(40, 5.0, lengths, seed=3)


def test_poisson_and_bursty_rates() -> None:
    lengths = Lengths(300, 5)
    for reqs in (poisson(4000, 10.0, lengths, seed=1), bursty(4000, 10.0, lengths, cv=3.0, seed=1)):
        assert len(reqs) / reqs[-1].arrival_s == pytest.approx(10.0, rel=0.15)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv > 2.0  # bursty: far more variable than Poisson's 1


def test_shared_prefix_groups_share_their_system_prompt() -> None:
    reqs = shared_prefix(groups=3, per_group=4, system_tokens=2048, question_tokens=128, output_tokens=8,
                         rate_rps=10.0, seed=0)
    firsts = {r.block_hashes[:8] for r in reqs}  # 2048 tokens = 8 blocks
    assert len(firsts) == 3
    assert all(len(r.block_hashes) == (2048 + 128) // 256 for r in reqs)


def test_multi_turn_prompts_extend_the_history() -> None:
    reqs = multi_turn(sessions=2, turns=3, first_prompt_tokens=600, turn_tokens=100, output_tokens=50,
                      rate_rps=1.0, think_time_s=5.0, seed=0)
    for s in ("s0", "s1"):
        turns = [r for r in reqs if r.session_id == s]
        assert [r.prompt_tokens for r in turns] == [600, 750, 900]
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.arrival_s > prev.arrival_s
            assert nxt.block_hashes[:len(prev.block_hashes)] == prev.block_hashes


@pytest.mark.parametrize("top_gap", [300, 1, 5000])
def test_content_tokens_count_up_and_wrap_at_2_pow_32(top_gap: int) -> None:
    space, mix = 2**32, 2654435761
    content_id = ((space - top_gap) * pow(mix, -1, space)) % space  # starts top_gap below 2**32
    tokens = list(content_tokens(content_id, 1000))
    start = space - top_gap
    assert tokens == [(start + i) % space for i in range(1000)]
    assert content_tokens(content_id, 0).tolist() == []
