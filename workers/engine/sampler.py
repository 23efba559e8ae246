"""Counter-based sampling: the random draw for a token depends only on (request seed, position).

So a request produces the same tokens wherever it runs (aggregated, disaggregated, migrated,
preempted and recomputed): no generator state travels with it. The uniform for position p is a
SplitMix64 mix of the seed and p, read as a 53-bit float in [0, 1). Sampling then inverts the CDF of
the filtered distribution: logits / temperature in float64, top-k, softmax, top-p over tokens sorted
by probability (ties broken by token id, lower first), renormalise, and pick the first token whose
cumulative probability exceeds u. Greedy (temperature 0) is argmax with ties to the lowest id.

Logprobs (`token_logprobs`, only for the rows whose request asked): log_softmax of logits /
temperature (greedy: temperature 1, the raw softmax), before top-k / top-p, so they do not depend
on the truncation; the top list is the n largest, ties to the lower id like sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.request import SamplingConfig
from tandem.stream import TokenLogprob

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """The draw in [0, 1) for the token at absolute `position` of a request with `seed`."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"uniform: seed {seed} outside [0, 2**64)")
    if position < 0:
        raise ValueError(f"uniform: position {position} must be >= 0")
    bits = _splitmix64(seed ^ _splitmix64(position))
    return (bits >> 11) * (1.0 / (1 << 53))


def filtered_probs(logits: torch.Tensor, params: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of the candidates left by temperature, top-k and top-p, sorted by
    probability descending (ties: lower id first); probabilities sum to 1. logits: [vocab]."""
    if params.greedy:
        raise ValueError("filtered_probs: temperature 0 is greedy; there is no distribution to filter")
    scaled = logits.double() / params.temperature
    # Sort by (-logit, id): a stable sort of ids ascending keeps ties in id order.
    order = torch.sort(scaled, descending=True, stable=True).indices
    vals = scaled[order]
    if params.top_k > 0:
        vals, order = vals[: params.top_k], order[: params.top_k]
    probs = torch.softmax(vals, dim=0)
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        before = torch.cumsum(probs, dim=0) - probs
        keep = int((before < params.top_p).sum())
        probs, order = probs[:keep], order[:keep]
        probs = probs / probs.sum()
    return probs, order


def sample_one(logits: torch.Tensor, params: SamplingConfig, position: int) -> int:
    """The token at `position` given its logits [vocab] (float); deterministic in (seed, position)."""
    if logits.dim() != 1:
        raise ValueError(f"sample_one: logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
    if params.greedy:
        return int(torch.argmax(logits))  # torch.argmax returns the first maximal index
    probs, ids = filtered_probs(logits, params)
    u = uniform(params.seed, position)
    cdf = torch.cumsum(probs, dim=0)
    idx = int((cdf <= u).sum())  # first index whose cumulative mass exceeds u
    return int(ids[min(idx, ids.numel() - 1)])  # u < 1 but rounding may leave cdf[-1] slightly < 1


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingConfig], positions: Sequence[int]
) -> list[int]:
    """One token per row of logits [B, vocab]: greedy rows in one argmax, sampled rows one by one."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(positions):
        raise ValueError(
            f"sample_batch: logits {tuple(logits.shape)}, {len(params)} params, {len(positions)} positions"
        )
    out = torch.argmax(logits, dim=1).tolist() if logits.shape[0] else []
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_one(logits[i], p, positions[i])
    return out


def token_logprobs(
    logits: torch.Tensor, params: Sequence[SamplingConfig], tokens: Sequence[int]
) -> list[tuple[TokenLogprob, ...]]:
    """Per row of logits [B, vocab]: `()` when params[i].logprobs is off, else one `TokenLogprob`
    of the chosen tokens[i] with params[i].top_logprobs alternatives (at most vocab), most likely
    first. Rows that did not ask cost nothing.

    Each value is x / T - logsumexp(x / T) in float64 from the float32 logits x. Only the
    normaliser's sum of exponentials runs over the whole vocabulary in float32 (terms relative to
    the row's max, accumulated in float64), which keeps the cost to a few float32 passes instead of
    a float64 copy of the batch; values are within ~1e-6 of an all-float64 log_softmax."""
    if logits.dim() != 2 or not logits.shape[0] == len(params) == len(tokens):
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)}, {len(params)} params, {len(tokens)} tokens"
        )
    out: list[tuple[TokenLogprob, ...]] = [()] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs]
    if not rows:
        return out
    temps = torch.tensor([1.0 if params[i].greedy else params[i].temperature for i in rows],
                         dtype=torch.float64)
    x = logits[rows].float()
    peak = x.max(dim=1, keepdim=True).values
    terms = (x - peak).div_(temps[:, None].float()).exp_()
    # logsumexp(x / T) = max / T + log(sum(exp((x - max) / T))), the sum accumulated in float64
    lse = peak[:, 0].double() / temps + torch.log(terms.sum(dim=1, dtype=torch.float64))
    chosen_x = x[torch.arange(len(rows)), torch.tensor([tokens[i] for i in rows])].double()
    chosen = (chosen_x / temps - lse).tolist()
    tops = _top(x, [min(params[i].top_logprobs, x.shape[1]) for i in rows])
    t_, lse_ = temps.tolist(), lse.tolist()
    for j, i in enumerate(rows):
        top = tuple((tid, v / t_[j] - lse_[j]) for tid, v in tops[j])  # the same float64 ops as chosen
        out[i] = (TokenLogprob(tokens[i], chosen[j], top),)
    return out


def _top(x: torch.Tensor, ns: Sequence[int]) -> list[tuple[tuple[int, float], ...]]:
    """The ns[r] largest (id, logit) of each row of x [R, vocab], ties to the lower id (dividing by
    a temperature keeps this order): topk finds each row's n-th value, then the ids at or above it
    are ordered exactly (few beyond n)."""
    k = max(ns)
    if k == 0:
        return [()] * len(ns)
    kth = torch.topk(x, k, dim=1).values
    out: list[tuple[tuple[int, float], ...]] = []
    for r, n in enumerate(ns):
        if n == 0:
            out.append(())
            continue
        ids = torch.nonzero(x[r] >= kth[r, n - 1]).flatten()  # ascending ids
        vals = x[r, ids].double()
        order = torch.sort(vals, descending=True, stable=True).indices[:n]
        out.append(tuple(zip(ids[order].tolist(), vals[order].tolist(), strict=True)))
    return out
