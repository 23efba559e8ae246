"""The model runner of one EP rank, and the lockstep rule.

`EpRunner` swaps every MoE layer of this rank's model shard for an `EpMoE` (module replacement,
no change to the model code), the MTP layers' included (run only by speculative decoding, which
keeps them in lockstep itself: workers/engine/speculate.py). With chunks it runs the ordinary
model step; with none (an idle rank) it still runs every MoE layer on an empty batch so the other
ranks' exchanges complete.
`lockstep_step` is one iteration of an EP rank's loop: all ranks vote, and if any has work every
rank steps, idle ones included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.engine.engine import Engine, StepOutput
from workers.engine.runner import LocalRunner
from workers.ep.dispatch import Dispatcher
from workers.ep.group import EpGroup
from workers.ep.moe import EpMoE
from workers.model.cache import ModelCache
from workers.model.model import DeepseekV4
from workers.model.moe import MoE


class EpRunner:
    """ModelRunner for rank `group.rank` of an EP instance; `model` holds only this rank's experts."""

    def __init__(self, model: DeepseekV4, group: EpGroup, dispatcher: Dispatcher) -> None:
        self.group, self.dispatcher = group, dispatcher
        self._moes: list[EpMoE] = []
        for block in model.layers:
            if not isinstance(block.ffn, MoE):
                raise TypeError(f"EpRunner: expected a MoE ffn, found {type(block.ffn).__name__}")
            block.ffn = EpMoE(block.ffn, group, dispatcher)
            self._moes.append(block.ffn)
        for mtp in model.mtp:
            mtp.ffn = EpMoE(mtp.ffn, group, dispatcher)
        self._local = LocalRunner(model)
        self.model = model

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    @property
    def bytes_dispatched(self) -> int:
        return self.dispatcher.bytes_sent

    def run(self, chunks: Sequence[tuple[int, Sequence[int]]], cache: ModelCache) -> torch.Tensor:
        if chunks:
            return self._local.run(chunks, cache)
        d = self.model.cfg.hidden_size
        device = self.model.embed.weight.device
        x = torch.zeros(0, d, dtype=self.model.dtype, device=device)
        ids = torch.zeros(0, dtype=torch.long, device=device)
        with torch.inference_mode():
            for moe in self._moes:
                moe(x, ids)
        return torch.zeros(0, self.vocab_size, dtype=torch.float32, device=device)


def lockstep_step(engine: Engine, group: EpGroup) -> StepOutput | None:
    """One step of every rank together: None (on every rank) when no rank has work."""
    if not group.any(engine.has_work):
        return None
    return engine.step()
