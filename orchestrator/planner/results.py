"""What a simulation reports: latency percentiles, SLO attainment, hit rate, utilisation, tok/s/GPU.

Definitions: TTFT = first token - arrival (the first token is sampled by the prefill); TPOT =
(last token - first token) / (output tokens - 1), so it includes the KV handoff and any wait for
a decode slot (requests with one output token have no TPOT). A refused request meets no SLO.
Prefix hit rate = prompt tokens found cached on the prefilling worker / prompt tokens routed.
GPU utilisation = busy GPU-seconds / (GPUs x makespan); tok/s per GPU = tokens of completed
requests / (GPUs x makespan), makespan = last completion - first arrival.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.planner.sim import Simulator


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q = {q}: must be in [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class SimResult:
    requests: int
    completed: int
    rejected: int
    ttft: tuple[float, ...]  # per completed request, arrival order
    tpot: tuple[float, ...]  # per completed request; 0.0 for single-token outputs
    latency: tuple[float, ...]  # arrival to last token, per completed request
    hit_rate: float
    gpu_utilisation: float
    total_tok_s_per_gpu: float
    output_tok_s_per_gpu: float
    makespan_s: float
    mean_in_system: float  # time average of requests in the system (routed, not finished)

    def ttft_pct(self, q: float) -> float:
        return percentile(self.ttft, q)

    def tpot_pct(self, q: float) -> float:
        multi = [t for t in self.tpot if t > 0]
        return percentile(multi, q) if multi else 0.0

    def attainment(self, ttft_slo_s: float, tpot_slo_s: float) -> float:
        """Share of all requests (refused ones included) meeting both SLOs."""
        ok = sum(1 for a, b in zip(self.ttft, self.tpot, strict=True) if a <= ttft_slo_s and b <= tpot_slo_s)
        return ok / self.requests if self.requests else 0.0

    def summary(self) -> dict[str, float]:
        """The headline numbers (seconds, fractions, tok/s)."""
        return {
            "ttft_p50": self.ttft_pct(50), "ttft_p90": self.ttft_pct(90), "ttft_p99": self.ttft_pct(99),
            "tpot_p50": self.tpot_pct(50), "tpot_p90": self.tpot_pct(90), "tpot_p99": self.tpot_pct(99),
            "hit_rate": self.hit_rate, "gpu_utilisation": self.gpu_utilisation,
            "total_tok_s_per_gpu": self.total_tok_s_per_gpu,
            "output_tok_s_per_gpu": self.output_tok_s_per_gpu,
            "completed": self.completed, "rejected": self.rejected,
        }


def collect(sim: Simulator) -> SimResult:
    """Read a finished simulation's jobs and instances."""
    done = [j for j in sim.jobs if j.t_finish >= 0]
    if sim.in_system:
        raise RuntimeError(f"simulation ended with {sim.in_system} requests still in the system")
    routed = [j for j in sim.jobs if j.decode is not None]
    start = sim.requests[0].arrival_s if sim.requests else 0.0
    end = max((j.t_finish for j in done), default=start)
    span = max(end - start, 1e-12)
    gpus = sim.fleet.gpus
    busy = sum(p.engine.busy_time for p in sim.prefills) * sim.fleet.prefill.par.gpus
    busy += sum(d.active_time + d.local.busy_time for d in sim.decodes) * sim.fleet.decode.par.gpus
    prompt = sum(j.req.prompt_tokens for j in routed)
    tokens_in = sum(j.req.prompt_tokens for j in done)
    tokens_out = sum(j.req.output_tokens for j in done)
    return SimResult(
        requests=len(sim.requests), completed=len(done), rejected=sim.rejected,
        ttft=tuple(j.t_first - j.req.arrival_s for j in done),
        tpot=tuple((j.t_finish - j.t_first) / (j.req.output_tokens - 1) if j.req.output_tokens > 1 else 0.0
                   for j in done),
        latency=tuple(j.t_finish - j.req.arrival_s for j in done),
        hit_rate=sum(j.cached_tokens for j in routed) / prompt if prompt else 0.0,
        gpu_utilisation=busy / (gpus * span),
        total_tok_s_per_gpu=(tokens_in + tokens_out) / (gpus * span),
        output_tok_s_per_gpu=tokens_out / (gpus * span),
        makespan_s=span,
        mean_in_system=sim.area / span,
    )
