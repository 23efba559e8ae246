"""What one instance serves within the SLOs: the planner's cost model on GPUs, measured rates on CPU.

- GPU topologies (`PlannerCapacity`): the planner's `CostModel` for the spec's GPU kind, model and
  instance shape prices a prefill of the window's mean prompt (its cached part skipped) and finds
  the largest decode batch whose step at the window's mean context fits the TPOT SLO.
- CPU topologies (`MeasuredCapacity`): GPU tables say nothing about a CPU, so the workers' own
  measured rates (WorkerStats.prefill_tok_s, decode_tok_s) calibrate the tiny model. A prefill
  instance's capacity is the highest prompt rate it showed while it had prompts waiting or
  running; a decode rank running b streams at r tokens/s steps every b / r seconds, and taking the
  step as proportional to the batch (which over-estimates larger batches' steps when part of a
  step is fixed cost, so it errs toward more instances), it holds floor(r x TPOT SLO) streams within
  the SLO, at most its max_batch. Until an instance has been measured the figure is the router's
  starting assumption (prefill) or max_batch (decode), marked ASSUMED.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from orchestrator.autoscale.policy import Capacity, CapacitySource
from orchestrator.autoscale.signals import Signals
from orchestrator.planner.cost import CostModel
from orchestrator.planner.fleet import fleet_from_spec
from orchestrator.planner.models import MODELS, AttnKind, ModelName
from orchestrator.router.inputs import Role
from orchestrator.router.load import LoadSnapshot
from orchestrator.spec import CpuTopology, DeploymentSpec
from workers.model.config import ModelConfig


class CapacityModel(Protocol):
    def observe(self, snap: LoadSnapshot) -> None:
        """Learn from a snapshot (a no-op for models that do not measure)."""
        ...

    def capacity(self, sig: Signals) -> Capacity:
        """Per-instance capacity for the load described by `sig`."""
        ...


class _Readings:
    """Timestamped readings of one figure; the highest within the window, else the last one seen."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque()
        self._last: float | None = None

    def add(self, at_s: float, value: float) -> None:
        self._items.append((at_s, value))
        self._last = value

    def best(self, now_s: float) -> float | None:
        """None when nothing was ever read."""
        while self._items and self._items[0][0] < now_s - self.window_s:
            self._items.popleft()
        return max(v for _, v in self._items) if self._items else self._last


class MeasuredCapacity:
    """CPU topologies: capacity from the workers' measured rates (see the module docstring)."""

    def __init__(self, *, window_s: float, tpot_slo_s: float, decode_max_batch: int, decode_ranks: int,
                 assumed_prefill_tok_s: float) -> None:
        self.tpot_slo_s = tpot_slo_s
        self.decode_max_batch = decode_max_batch
        self.decode_ranks = decode_ranks
        self.assumed_prefill_tok_s = assumed_prefill_tok_s
        self._prefill = _Readings(window_s)
        self._decode = _Readings(window_s)  # streams one rank holds within the SLO
        self._now = 0.0

    def observe(self, snap: LoadSnapshot) -> None:
        self._now = snap.at_s
        per_instance: dict[str, float] = {}
        busy: set[str] = set()
        for r in snap.ranks:
            if r.draining:
                continue
            if r.role is Role.PREFILL:
                per_instance[r.instance] = per_instance.get(r.instance, 0.0) + r.prefill_tok_s
                if r.queued_prefill_tokens > 0 or r.running_requests > 0:
                    busy.add(r.instance)
            elif r.running_requests > 0 and r.decode_tok_s > 0:
                slots = min(self.decode_max_batch, max(1, math.floor(r.decode_tok_s * self.tpot_slo_s)))
                self._decode.add(snap.at_s, slots)
        for inst in sorted(busy):
            if per_instance[inst] > 0:
                self._prefill.add(snap.at_s, per_instance[inst])

    def capacity(self, sig: Signals) -> Capacity:
        prefill = self._prefill.best(self._now)
        slots = self._decode.best(self._now)
        return Capacity(
            prefill_tok_s=prefill if prefill is not None else self.assumed_prefill_tok_s,
            decode_slots=int(slots if slots is not None else self.decode_max_batch) * self.decode_ranks,
            prefill_source=CapacitySource.MEASURED if prefill is not None else CapacitySource.ASSUMED,
            decode_source=CapacitySource.MEASURED if slots is not None else CapacitySource.ASSUMED,
        )


class PlannerCapacity:
    """GPU topologies: capacity from the planner's cost model (see the module docstring)."""

    def __init__(self, *, prefill_cost: CostModel, decode_cost: CostModel, prefill_chunk: int,
                 decode_batch_limit: int, tpot_slo_s: float) -> None:
        self.prefill_cost, self.decode_cost = prefill_cost, decode_cost
        self.prefill_chunk = prefill_chunk
        self.decode_batch_limit = decode_batch_limit
        self.tpot_slo_s = tpot_slo_s

    def observe(self, snap: LoadSnapshot) -> None:
        return None  # the cost model does not learn

    def capacity(self, sig: Signals) -> Capacity:
        prompt = max(1, round(sig.mean_prompt_tokens))
        cached = min(prompt - 1, int(prompt * sig.hit_rate))
        seconds = self.prefill_cost.prefill_seconds(prompt, cached, self.prefill_chunk)
        context = prompt + (sig.mean_output_tokens or 0.0) / 2
        return Capacity(prefill_tok_s=(prompt - cached) / seconds, decode_slots=self._slots(context),
                        prefill_source=CapacitySource.PLANNER, decode_source=CapacitySource.PLANNER)

    def _slots(self, context: float) -> int:
        """The largest batch in [1, limit] whose step fits the TPOT SLO (1 when none does)."""
        lo, hi = 1, self.decode_batch_limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.decode_cost.decode_step_seconds(mid, mid * context) <= self.tpot_slo_s:
                lo = mid
            else:
                hi = mid - 1
        return lo


def planner_model(cfg: ModelConfig) -> ModelName:
    """The planner's DeepSeek-V4 model with this config's shape (hidden size, vocabulary, layers);
    V3.2 (MLA with DSA layers) shares V4-Pro's sizes but is not what a V4 config describes."""
    shape = (cfg.hidden_size, cfg.vocab_size, len(cfg.layer_kinds))
    hits = [name for name, arch in MODELS.items() if (arch.hidden, arch.vocab, arch.layers) == shape
            and all(a.kind is not AttnKind.DSA for a in arch.attention)]
    if len(hits) != 1:
        raise ValueError(f"model: hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {len(cfg.layer_kinds)} "
                         f"layers matches {[h.value for h in hits]} of the planner's models; the autoscaler "
                         "needs exactly one for its cost model")
    return hits[0]


def capacity_model_for(spec: DeploymentSpec, cfg: ModelConfig, assumed_prefill_tok_s: float) -> CapacityModel:
    """Measured rates on a CPU topology, the planner's cost model on a GPU one."""
    a = spec.autoscale
    if isinstance(spec.topology, CpuTopology):
        return MeasuredCapacity(window_s=a.window_s, tpot_slo_s=a.tpot_slo_s,
                                decode_max_batch=spec.decode.max_batch, decode_ranks=spec.decode.ep_ranks,
                                assumed_prefill_tok_s=assumed_prefill_tok_s)
    fleet = fleet_from_spec(spec, model_name=planner_model(cfg))
    return PlannerCapacity(prefill_cost=fleet.cost_model(fleet.prefill),
                           decode_cost=fleet.cost_model(fleet.decode),
                           prefill_chunk=spec.prefill.max_batched_tokens,
                           decode_batch_limit=spec.decode.max_batch * spec.decode.ep_ranks,
                           tpot_slo_s=a.tpot_slo_s)
