"""`tandem estimate`: the steady state of a closed-loop benchmark on one deployment.

`concurrency` users each send a request (isl prompt tokens, osl output tokens) as soon as their
previous one finished, spread evenly over gpus / max(tp, ep) colocated instances. Per instance
(c users) the engine prioritises prefill (as SGLang and vLLM do by default): a new prompt is
prefilled alone in chunks, and every other user's decode stalls meanwhile. With a = prefill time
of one prompt, s = decode step time at batch c, and R the request rate of the instance:
    decode time of one request  D = (osl - 1) s / (1 - R a (c - 1) / c)     (others' prefills)
    TTFT = a + M/D/1 wait for earlier prefills = a + rho a / (2 (1 - rho)),   rho = R a
    Little's law               c = R (TTFT + D)
solved for R by bisection. When the instance's KV pool cannot hold c requests, the batch is
capped at what fits and the rest wait (their wait is added to TTFT).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.planner.cost import CostModel, Parallelism
from orchestrator.planner.hardware import GpuKind, gpu
from orchestrator.planner.kv_layout import request_reserve_bytes
from orchestrator.planner.models import ModelName, Precision, model

DEFAULT_CHUNK_TOKENS = 8192  # SGLang's default chunked-prefill size


@dataclass(frozen=True)
class EstimateQuery:
    model: ModelName
    gpu: GpuKind
    gpus: int
    tp: int
    ep: int
    precision: Precision
    isl: int
    osl: int
    concurrency: int
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        for name in ("gpus", "tp", "ep", "isl", "osl", "concurrency", "chunk_tokens"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"estimate {name} = {value}: must be >= 1")
        size = max(self.tp, self.ep)
        if size % self.tp or size % self.ep or self.gpus % size:
            raise ValueError(f"estimate gpus = {self.gpus}, tp = {self.tp}, ep = {self.ep}: an instance has "
                             f"max(tp, ep) = {size} GPUs; tp and ep must divide it and it must divide gpus")


@dataclass(frozen=True)
class Estimate:
    tpot_s: float
    ttft_s: float
    output_tok_s_per_user: float
    total_tok_s_per_gpu: float
    output_tok_s_per_gpu: float
    requests_per_s: float
    instances: int
    decode_batch: float
    kv_limited: bool


def _solve_rate(c: float, a: float, d0: float) -> float:
    """R with R (TTFT(R) + D(R)) = c; the left side grows with R on its domain."""
    def lhs(r: float) -> float:
        rho = r * a
        stall = 1.0 - rho * (c - 1.0) / c
        if rho >= 1.0 or stall <= 0.0:
            return float("inf")
        return r * (a + rho * a / (2.0 * (1.0 - rho)) + d0 / stall)

    lo, hi = 0.0, 1.0 / a
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if lhs(mid) < c:
            lo = mid
        else:
            hi = mid
    return lo


def cost_model_for(q: EstimateQuery) -> CostModel:
    """The cost model of one instance of the queried deployment."""
    size = max(q.tp, q.ep)
    return CostModel(gpu(q.gpu), model(q.model), Parallelism(size, q.tp, q.ep), q.precision)


def estimate(q: EstimateQuery) -> Estimate:
    """Closed-loop steady state (see module docstring)."""
    cm = cost_model_for(q)
    instances = q.gpus // cm.par.gpus
    users = q.concurrency / instances
    fits = cm.kv_pool_bytes() / request_reserve_bytes(cm.arch, q.isl + q.osl)
    if fits < 1:
        raise ValueError(f"one request of {q.isl + q.osl} tokens does not fit the KV pool of a "
                         f"{cm.par.gpus}-GPU {q.gpu.value} instance")
    batch = min(users, fits)
    a = cm.prefill_seconds(q.isl, 0, q.chunk_tokens)
    mean_context = q.isl + q.osl / 2
    step = cm.decode_step_seconds(max(1, round(batch)), max(1, round(batch)) * mean_context)
    rate = _solve_rate(batch, a, (q.osl - 1) * step)
    rho = rate * a
    ttft = a + rho * a / (2 * (1 - rho))
    decode = batch / rate - ttft
    if users > batch:  # the users who do not fit wait for a slot
        ttft += (users - batch) / rate
    tpot = decode / (q.osl - 1) if q.osl > 1 else 0.0
    return Estimate(
        tpot_s=tpot, ttft_s=ttft, output_tok_s_per_user=(1 / tpot) if tpot > 0 else 0.0,
        total_tok_s_per_gpu=rate * instances * (q.isl + q.osl) / q.gpus,
        output_tok_s_per_gpu=rate * instances * q.osl / q.gpus, requests_per_s=rate * instances,
        instances=instances, decode_batch=batch, kv_limited=users > batch)
