"""Helpers to build and drain engines in tests."""

from __future__ import annotations

import torch

from tandem.request import GenerationRequest, SamplingConfig
from tandem.stream import Finish
from tandem.tokenizer import Tokenizer
from workers.engine.engine import Engine, Role, StepOutput
from workers.engine.kv import BlockSpace, BlockSpaceConfig
from workers.engine.runner import LocalRunner
from workers.engine.scheduler import SchedulerConfig
from workers.model.model import DeepseekV4


def make_engine(model: DeepseekV4, tokenizer: Tokenizer, *, role: Role = Role.AGGREGATED, num_blocks: int = 64,
                block_size: int = 256, sched: SchedulerConfig | None = None) -> Engine:
    kv = BlockSpace(BlockSpaceConfig(num_blocks, block_size), model.cfg.window)
    return Engine(role, model.cfg, sched or SchedulerConfig(), kv, LocalRunner(model), tokenizer)


def requests(prompts: list[list[int]], sampling: SamplingConfig | list[SamplingConfig]) -> list[GenerationRequest]:
    params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    return [GenerationRequest(f"r{i}", tuple(p), s) for i, (p, s) in enumerate(zip(prompts, params, strict=True))]


class Collected:
    """Every delta of a drained engine, per request."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.finish: dict[str, Finish] = {}
        self.outputs: list[StepOutput] = []

    def add(self, out: StepOutput) -> None:
        self.outputs.append(out)
        for d in out.deltas:
            self.tokens.setdefault(d.request_id, []).extend(d.token_ids)
            self.text[d.request_id] = self.text.get(d.request_id, "") + d.text
            if d.finish is not None:
                self.finish[d.request_id] = d.finish


def drain(engine: Engine, max_steps: int = 10_000) -> Collected:
    got = Collected()
    for _ in range(max_steps):
        if not engine.has_work:
            return got
        got.add(engine.step())
    raise AssertionError(f"engine still busy after {max_steps} steps: {engine.stats()}")


def greedy_reference(model: DeepseekV4, prompt: list[int], max_tokens: int) -> list[int]:
    """Sequential single-request greedy generation straight on the model (no engine)."""
    cache = model.new_cache()
    with torch.no_grad():
        nxt = int(model.prefill(0, torch.tensor(prompt), cache, last_only=True)[-1].argmax())
        out = [nxt]
        while len(out) < max_tokens:
            nxt = int(model.decode([0], torch.tensor([nxt]), cache)[0].argmax())
            out.append(nxt)
    return out


def random_prompts(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
