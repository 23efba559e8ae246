"""The model runner: one forward over a step's chunks, returning each chunk's last-token logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from workers.model.cache import ModelCache
from workers.model.model import DeepseekV4


class ModelRunner(Protocol):
    """Runs a step. chunks: [(sequence id, token ids)] in schedule order; returns float32 logits
    [len(chunks), vocab] of each chunk's last token. Called with no chunks only under expert
    parallelism, where an idle rank must still take part in every MoE exchange."""

    @property
    def vocab_size(self) -> int: ...
    def run(self, chunks: Sequence[tuple[int, Sequence[int]]], cache: ModelCache) -> torch.Tensor: ...


class LocalRunner:
    """The whole model on this process."""

    def __init__(self, model: DeepseekV4) -> None:
        self.model = model

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def run(self, chunks: Sequence[tuple[int, Sequence[int]]], cache: ModelCache) -> torch.Tensor:
        if not chunks:
            return torch.zeros(0, self.vocab_size, dtype=torch.float32)
        device = self.model.embed.weight.device
        batch = [(seq, torch.tensor(list(toks), dtype=torch.long, device=device)) for seq, toks in chunks]
        with torch.inference_mode():  # no autograd bookkeeping at all: ~10% faster steps than no_grad
            return self.model.step(batch, cache, last_only=True).logits
