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
    from orchestrator.planner.fleet import FleetConfig
    from orchestrator.planner.sim import Simulator
    from orchestrator.planner.trace import TraceRequest


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
    if sim.in_system:
        raise RuntimeError(f"simulation ended with {sim.in_system} requests still in the system")
    jobs = sim.jobs
    return summarize(
        sim.fleet, sim.requests,
        t_first=[j.t_first for j in jobs], t_finish=[j.t_finish for j in jobs],
        cached_tokens=[j.cached_tokens for j in jobs], routed=[j.decode is not None for j in jobs],
        prefill_busy_s=[p.engine.busy_time for p in sim.prefills],
        decode_busy_s=[d.active_time + d.local.busy_time for d in sim.decodes],
        area=sim.area, rejected=sim.rejected)


def summarize(
    fleet: FleetConfig, requests: Sequence[TraceRequest], *, t_first: Sequence[float],
    t_finish: Sequence[float], cached_tokens: Sequence[int], routed: Sequence[bool],
    prefill_busy_s: Sequence[float], decode_busy_s: Sequence[float], area: float, rejected: int,
) -> SimResult:
    """The metrics of a finished replay of `requests` (arrival order) from its per-request times
    (-1.0: never reached), cached tokens and routed flags, each instance's busy seconds (decode:
    decoding plus local prefills) and the integral of requests in the system."""
    done = [i for i, t in enumerate(t_finish) if t >= 0]
    start = requests[0].arrival_s if requests else 0.0
    end = max((t_finish[i] for i in done), default=start)
    span = max(end - start, 1e-12)
    gpus = fleet.gpus
    busy = sum(prefill_busy_s) * fleet.prefill.par.gpus
    busy += sum(decode_busy_s) * fleet.decode.par.gpus
    prompt = sum(r.prompt_tokens for r, ok in zip(requests, routed, strict=True) if ok)
    cached = sum(c for c, ok in zip(cached_tokens, routed, strict=True) if ok)
    arrival = [requests[i].arrival_s for i in done]
    first = [t_first[i] for i in done]
    last = [t_finish[i] for i in done]
    out_tokens = [requests[i].output_tokens for i in done]
    tokens_in = sum(requests[i].prompt_tokens for i in done)
    tokens_out = sum(out_tokens)
    return SimResult(
        requests=len(requests), completed=len(done), rejected=rejected,
        ttft=tuple(f - a for f, a in zip(first, arrival, strict=True)),
        tpot=tuple((e - f) / (n - 1) if n > 1 else 0.0
                   for f, e, n in zip(first, last, out_tokens, strict=True)),
        latency=tuple(e - a for e, a in zip(last, arrival, strict=True)),
        hit_rate=cached / prompt if prompt else 0.0,
        gpu_utilisation=busy / (gpus * span),
        total_tok_s_per_gpu=(tokens_in + tokens_out) / (gpus * span),
        output_tok_s_per_gpu=tokens_out / (gpus * span),
        makespan_s=span,
        mean_in_system=area / span,
    )
