"""The counter-based sampler against hand-computed distributions and its own determinism."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.request import SamplingConfig
from workers.engine.sampler import filtered_probs, sample_batch, sample_one, uniform

pytestmark = pytest.mark.workers


def test_uniform_is_a_pure_function_of_seed_and_position() -> None:
    a = [uniform(7, p) for p in range(1000)]
    assert a == [uniform(7, p) for p in range(1000)]
    assert all(0.0 <= u < 1.0 for u in a)
    assert a != [uniform(8, p) for p in range(1000)]
    # Roughly uniform: mean 0.5 and each decile near 10% over 20k draws (loose bounds, ~6 sigma).
    draws = torch.tensor([uniform(123, p) for p in range(20000)])
    assert abs(draws.mean().item() - 0.5) < 0.013
    counts = torch.histc(draws, bins=10, min=0, max=1)
    assert ((counts - 2000).abs() < 270).all(), counts


def test_uniform_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="position"):
        uniform(1, -1)
    with pytest.raises(ValueError, match="seed"):
        uniform(2**64, 0)


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert sample_one(logits, SamplingConfig(), 0) == 1
    batch = torch.tensor([[0.0, 1.0, 5.0], [9.0, 1.0, 9.0]])
    assert sample_batch(batch, [SamplingConfig(), SamplingConfig()], [0, 0]) == [2, 0]


def test_filtered_probs_matches_hand_computation() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, 2.0])
    # temperature 2, no filters: softmax(logits / 2), sorted by prob desc, ties by id.
    probs, ids = filtered_probs(logits, SamplingConfig(temperature=2.0))
    e = [math.exp(v / 2) for v in (1.0, 3.0, 2.0, 0.0, 2.0)]
    z = sum(e)
    assert ids.tolist() == [1, 2, 4, 0, 3]
    assert probs.tolist() == pytest.approx([e[i] / z for i in (1, 2, 4, 0, 3)], rel=1e-12)
    # top_k 3 keeps ids 1, 2, 4 renormalised.
    probs, ids = filtered_probs(logits, SamplingConfig(temperature=1.0, top_k=3))
    e = [math.exp(v) for v in (3.0, 2.0, 2.0)]
    assert ids.tolist() == [1, 2, 4]
    assert probs.tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-12)
    # top_p: p(1) = e^3 / Z ~ 0.52, so the nucleus for 0.6 is {1, 2}; for 0.5 it is {1}.
    full = [math.exp(v) for v in (1.0, 3.0, 2.0, 0.0, 2.0)]
    assert 0.5 < full[1] / sum(full) < 0.6 < (full[1] + full[2]) / sum(full)
    probs, ids = filtered_probs(logits, SamplingConfig(temperature=1.0, top_p=0.6))
    assert ids.tolist() == [1, 2]
    assert probs.tolist() == pytest.approx([full[1] / (full[1] + full[2]), full[2] / (full[1] + full[2])])
    probs, ids = filtered_probs(logits, SamplingConfig(temperature=1.0, top_p=0.5))
    assert ids.tolist() == [1] and probs.tolist() == [1.0]


def test_sampling_frequencies_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([0.5, 2.0, 1.0, -1.0, 1.5])
    params = SamplingConfig(temperature=0.8, top_k=4, seed=99)
    probs, ids = filtered_probs(logits, params)
    n = 20000
    counts = torch.zeros(5)
    for p in range(n):
        counts[sample_one(logits, params, p)] += 1
    assert counts[3] == 0  # cut by top_k
    for prob, tok in zip(probs.tolist(), ids.tolist(), strict=True):
        sigma = math.sqrt(n * prob * (1 - prob))
        assert abs(counts[tok] - n * prob) < 5 * sigma, (tok, counts[tok], n * prob)


def test_sample_batch_is_row_independent() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g)
    params = [SamplingConfig(temperature=1.0, seed=s) for s in range(3)] + [SamplingConfig()] * 3
    positions = [10, 11, 12, 13, 14, 15]
    batch = sample_batch(logits, params, positions)
    alone = [sample_one(logits[i], params[i], positions[i]) for i in range(6)]
    assert batch == alone
    # Reordering the rows reorders the result: nothing depends on the batch position.
    perm = [5, 3, 1, 0, 2, 4]
    assert sample_batch(logits[perm], [params[i] for i in perm], [positions[i] for i in perm]) == [
        batch[i] for i in perm
    ]
