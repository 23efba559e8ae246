"""The planner's CLI commands: `simulate`, `estimate`, `plan`, added to the `tandem` app by `register`.

With --json, stdout carries exactly one JSON document and nothing else; progress always goes to
stderr. Bad inputs (spec, trace, impossible deployments) exit with status 2 and one message that
names the bad value.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from orchestrator.planner.engines import SimEngine
from orchestrator.planner.estimate import EstimateQuery, estimate
from orchestrator.planner.fleet import FleetConfig, fleet_from_spec
from orchestrator.planner.goodput import Slo, goodput
from orchestrator.planner.hardware import CALIBRATED, GpuKind, shared_constants
from orchestrator.planner.hardware import gpu as gpu_spec
from orchestrator.planner.models import ModelName, Precision
from orchestrator.planner.native.lib import NativeBuildError
from orchestrator.planner.plan import plan
from orchestrator.planner.trace import TraceRequest, load_mooncake
from orchestrator.router.policy import PolicyName
from orchestrator.spec import SpecError, load_spec

T = TypeVar("T")
TraceOpt = Annotated[Path, typer.Option("--trace", help="Mooncake JSON-lines trace")]
SpecOpt = Annotated[Path, typer.Option("--spec", help="deployment spec YAML")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
ModelOpt = Annotated[ModelName | None, typer.Option("--model", help="the model a checkpoint spec serves")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=2, help="replay only the first N requests")]
TtftOpt = Annotated[float, typer.Option("--ttft-slo", min=0.0, help="TTFT target, seconds")]
TpotOpt = Annotated[float, typer.Option("--tpot-slo", min=0.0, help="TPOT target, seconds")]
EngineOpt = Annotated[SimEngine, typer.Option(
    "--engine", help="native: the compiled simulator core (built with the system C compiler on first use); "
    "python: the reference simulator (same results, 15-50x slower)")]


def _progress(msg: str) -> None:
    typer.echo(msg, err=True)


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code=2)


def _native_errors(call: Callable[[], T]) -> T:
    """call(), with a native core that cannot build reported as a usage error naming --engine python."""
    try:
        return call()
    except NativeBuildError as exc:
        raise _fail(f"{exc}\n(--engine python runs the reference simulator without a C compiler)") from None


def _inputs(spec: Path, trace: Path, limit: int | None,
            model: ModelName | None) -> tuple[FleetConfig, list[TraceRequest]]:
    try:
        fleet = fleet_from_spec(load_spec(spec), model_name=model)
        requests = load_mooncake(trace, limit)
    except (SpecError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    return fleet, requests


def _table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def simulate(
    trace: TraceOpt,
    spec: SpecOpt,
    policy: Annotated[list[PolicyName] | None, typer.Option("--policy", help="repeat to compare")] = None,
    ttft_slo: TtftOpt = 2.0,
    tpot_slo: TpotOpt = 0.05,
    limit: LimitOpt = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    engine: EngineOpt = SimEngine.NATIVE,
) -> None:
    """Replay a trace on the spec's fleet under each routing policy; goodput by bisection."""
    fleet, requests = _inputs(spec, trace, limit, model)
    slo = Slo(ttft_slo, tpot_slo)
    rows = []
    for name in policy or list(PolicyName):
        _progress(f"simulating {len(requests)} requests on {fleet.gpus} {fleet.gpu.value} GPUs, "
                  f"policy {name.value}")
        f = fleet.with_policy(name)
        base = _native_errors(functools.partial(goodput, f, requests, slo, progress=_progress, engine=engine))
        res = base.own  # the replay at the trace's own rate
        rows.append({"policy": name.value, "hit_rate": res.hit_rate, "ttft_p50": res.ttft_pct(50),
                     "ttft_p90": res.ttft_pct(90), "ttft_p99": res.ttft_pct(99), "tpot_p50": res.tpot_pct(50),
                     "tpot_p90": res.tpot_pct(90), "tpot_p99": res.tpot_pct(99), "goodput_rps": base.rate_rps,
                     "gpu_utilisation": res.gpu_utilisation, "total_tok_s_per_gpu": res.total_tok_s_per_gpu,
                     "output_tok_s_per_gpu": res.output_tok_s_per_gpu, "completed": res.completed,
                     "rejected": res.rejected})
    if as_json:
        typer.echo(json.dumps(rows))
    else:
        typer.echo(_table(rows))


def estimate_cmd(
    model: Annotated[ModelName, typer.Option("--model")],
    gpu: Annotated[GpuKind, typer.Option("--gpu")],
    gpus: Annotated[int, typer.Option("--gpus", min=1)],
    tp: Annotated[int, typer.Option("--tp", min=1)] = 1,
    ep: Annotated[int, typer.Option("--ep", min=1)] = 1,
    precision: Annotated[Precision, typer.Option("--precision")] = Precision.FP4,
    isl: Annotated[int, typer.Option("--isl", min=1)] = 8192,
    osl: Annotated[int, typer.Option("--osl", min=1)] = 1024,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Closed-loop steady state of one deployment from the cost model."""
    try:
        est = estimate(EstimateQuery(model=model, gpu=gpu, gpus=gpus, tp=tp, ep=ep, precision=precision,
                                     isl=isl, osl=osl, concurrency=concurrency))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    # Hopper's efficiencies copy Blackwell's: say so in the output rather than pass them off as fitted
    calibrated = gpu_spec(gpu).generation in CALIBRATED
    out = dataclasses.asdict(est) | {"calibrated": calibrated, "efficiencies": shared_constants()}
    if not calibrated:
        _progress(f"note: no published DeepSeek-V4 figure calibrates {gpu.value}; "
                  "its efficiencies are Blackwell's")
    if as_json:
        typer.echo(json.dumps(out))
    else:
        for k, v in out.items():
            typer.echo(f"{k:>22}: {v}")


def plan_cmd(
    spec: SpecOpt,
    trace: TraceOpt,
    gpus: Annotated[int, typer.Option("--gpus", min=2)],
    ttft_slo: TtftOpt,
    tpot_slo: TpotOpt,
    limit: LimitOpt = None,
    splits: Annotated[int, typer.Option("--splits", min=1, help="prefill shares tried per size pair")] = 5,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    engine: EngineOpt = SimEngine.NATIVE,
) -> None:
    """Try P:D splits and instance sizes within --gpus; recommend the best goodput per GPU."""
    fleet, requests = _inputs(spec, trace, limit, model)
    try:
        result = _native_errors(lambda: plan(fleet, requests, gpus, Slo(ttft_slo, tpot_slo), splits=splits,
                                             progress=_progress, engine=engine))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    rows = [dataclasses.asdict(r) for r in result.rows]
    if as_json:
        typer.echo(json.dumps({"best": dataclasses.asdict(result.best), "candidates": rows}))
    else:
        typer.echo(_table(rows))
        b = result.best
        typer.echo(f"best: {b.prefill_instances} x {b.prefill_gpus_each}-GPU prefill + "
                   f"{b.decode_instances} x {b.decode_gpus_each}-GPU decode: "
                   f"{b.goodput_rps_per_gpu:.4g} req/s per GPU")


def register(app: typer.Typer) -> None:
    """Add `simulate`, `estimate` and `plan` to app."""
    app.command("simulate")(simulate)
    app.command("estimate")(estimate_cmd)
    app.command("plan")(plan_cmd)


if __name__ == "__main__":  # pragma: no cover - `python -m orchestrator.planner.commands ...`
    _app = typer.Typer(add_completion=False)
    register(_app)
    sys.exit(_app())
