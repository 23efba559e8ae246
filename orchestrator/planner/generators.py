"""Generated loads: Poisson, bursty, shared-prefix groups, multi-turn sessions.

Every generator is deterministic for its seed (its own `random.Random`). Prompts are synthetic
token ids built from content ids (`trace.content_tokens`): equal content ids mean equal tokens,
so shared prefixes really share block hashes through `tandem.blocks.block_hashes`.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass

from orchestrator.planner.trace import TraceRequest, content_tokens
from tandem.blocks import block_hashes


@dataclass(frozen=True)
class Lengths:
    """Prompt and output lengths; each drawn uniformly within +-jitter of its value."""

    prompt_tokens: int
    output_tokens: int
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"Lengths(prompt_tokens={self.prompt_tokens}, "
                             f"output_tokens={self.output_tokens}): both must be >= 1")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"Lengths.jitter = {self.jitter}: must be in [0, 1)")

    def draw(self, rng: random.Random) -> tuple[int, int]:
        def one(v: int) -> int:
            return max(1, round(v * rng.uniform(1 - self.jitter, 1 + self.jitter))) if self.jitter else v
        return one(self.prompt_tokens), one(self.output_tokens)


class _Content:
    """Fresh content ids, one per generator run."""

    def __init__(self) -> None:
        self.next_id = 0

    def fresh(self, n: int) -> array:
        self.next_id += 1
        return content_tokens(self.next_id, n)


def _request(i: int, t: float, tokens: array, out: int, session: str | None = None) -> TraceRequest:
    return TraceRequest(request_id=f"g{i}", arrival_s=t, prompt_tokens=len(tokens), output_tokens=out,
                        block_hashes=tuple(block_hashes(tokens)), session_id=session)


def _check_rate(rate_rps: float, n: int) -> None:
    if not rate_rps > 0:
        raise ValueError(f"rate_rps = {rate_rps}: must be > 0")
    if n < 1:
        raise ValueError(f"request count = {n}: must be >= 1")


def poisson(n: int, rate_rps: float, lengths: Lengths, seed: int = 0) -> list[TraceRequest]:
    """n unrelated requests with exponential inter-arrival times of mean 1 / rate_rps."""
    _check_rate(rate_rps, n)
    rng, content, t, out = random.Random(seed), _Content(), 0.0, []
    for i in range(n):
        t += rng.expovariate(rate_rps)
        p, o = lengths.draw(rng)
        out.append(_request(i, t, content.fresh(p), o))
    return out


def bursty(n: int, rate_rps: float, lengths: Lengths, cv: float = 3.0, seed: int = 0) -> list[TraceRequest]:
    """n unrelated requests whose inter-arrival times are gamma distributed with mean 1 / rate_rps
    and coefficient of variation cv (> 1: bursts and lulls; 1 is Poisson)."""
    _check_rate(rate_rps, n)
    if not cv > 0:
        raise ValueError(f"bursty cv = {cv}: must be > 0")
    shape = 1.0 / (cv * cv)
    rng, content, t, out = random.Random(seed), _Content(), 0.0, []
    for i in range(n):
        t += rng.gammavariate(shape, 1.0 / (rate_rps * shape))
        p, o = lengths.draw(rng)
        out.append(_request(i, t, content.fresh(p), o))
    return out


def shared_prefix(groups: int, per_group: int, system_tokens: int, question_tokens: int, output_tokens: int,
                  rate_rps: float, seed: int = 0) -> list[TraceRequest]:
    """SGLang's generated-shared-prefix shape: `groups` system prompts, each followed by
    `per_group` distinct questions; Poisson arrivals with the groups' prompts shuffled together."""
    _check_rate(rate_rps, groups * per_group)
    rng, content = random.Random(seed), _Content()
    systems = [content.fresh(system_tokens) for _ in range(groups)]
    prompts = [systems[g] + content.fresh(question_tokens) for g in range(groups) for _ in range(per_group)]
    rng.shuffle(prompts)
    t, out = 0.0, []
    for i, tokens in enumerate(prompts):
        t += rng.expovariate(rate_rps)
        out.append(_request(i, t, tokens, output_tokens))
    return out


def multi_turn(sessions: int, turns: int, first_prompt_tokens: int, turn_tokens: int, output_tokens: int,
               rate_rps: float, think_time_s: float, seed: int = 0) -> list[TraceRequest]:
    """Conversations: sessions start as a Poisson process of rate_rps; each next turn arrives an
    exponential think time (mean think_time_s) after the previous one and its prompt is the whole
    history (previous prompt + previous answer) plus turn_tokens new tokens."""
    _check_rate(rate_rps, sessions * turns)
    if not think_time_s > 0:
        raise ValueError(f"multi_turn think_time_s = {think_time_s}: must be > 0")
    rng, content, start, out = random.Random(seed), _Content(), 0.0, []
    for s in range(sessions):
        start += rng.expovariate(rate_rps)
        t, history = start, content.fresh(first_prompt_tokens)
        for _ in range(turns):
            out.append(_request(len(out), t, history, output_tokens, session=f"s{s}"))
            history = history + content.fresh(output_tokens) + content.fresh(turn_tokens)
            t += rng.expovariate(1.0 / think_time_s)
    out.sort(key=lambda r: (r.arrival_s, r.request_id))
    return out
