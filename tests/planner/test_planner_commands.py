"""`simulate`, `estimate`, `plan` through a typer app built with `register`: stdout is pure JSON
with --json, progress goes to stderr, bad inputs exit 2 naming the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from orchestrator.planner.commands import register
from orchestrator.planner.estimate import EstimateQuery, estimate
from orchestrator.planner.hardware import GpuKind
from orchestrator.planner.models import ModelName, Precision
from orchestrator.planner.native.lib import load

pytestmark = pytest.mark.planner

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake-synthetic.jsonl"
SPEC = """\
name: plan-test
model: {preset: v4-flash}
prefill: {instances: 2, ep_ranks: 4, gpus_per_rank: 1, max_batch: 8, max_batched_tokens: 8192}
decode: {instances: 2, ep_ranks: 4, gpus_per_rank: 1, max_batch: 128}
topology: {kind: gb200-nvl72, racks: 1}
"""


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer(add_completion=False)
    register(a)
    return a


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("planner")
    spec = d / "spec.yaml"
    spec.write_text(SPEC)
    trace = d / "trace.jsonl"
    with TRACE.open() as src:
        trace.write_text("".join(next(src) for _ in range(80)))
    return spec, trace


def test_estimate_json_matches_the_estimator(app: typer.Typer) -> None:
    res = CliRunner().invoke(app, ["estimate", "--model", "v4-pro", "--gpu", "gb200", "--gpus", "8", "--tp", "8",
                                   "--precision", "fp4", "--isl", "8192", "--osl", "1024", "--concurrency", "4",
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    want = estimate(EstimateQuery(ModelName.V4_PRO, GpuKind.GB200, 8, 8, 1, Precision.FP4, 8192, 1024, 4))
    assert out["tpot_s"] == want.tpot_s and out["ttft_s"] == want.ttft_s
    for key in ("output_tok_s_per_user", "total_tok_s_per_gpu", "output_tok_s_per_gpu"):
        assert out[key] == getattr(want, key)
    assert out["calibrated"] is True
    assert set(out["efficiencies"]) >= {"blackwell_compute_efficiency", "blackwell_bandwidth_efficiency",
                                        "layer_latency_floor_s"}


def test_estimate_bad_layout_exits_2_naming_it(app: typer.Typer) -> None:
    res = CliRunner().invoke(app, ["estimate", "--model", "v4-flash", "--gpu", "b200", "--gpus", "6", "--tp", "4"])
    assert res.exit_code == 2
    assert "gpus = 6" in res.stderr


def test_simulate_json_rows(app: typer.Typer, files: tuple[Path, Path]) -> None:
    spec, trace = files
    res = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--spec", str(spec), "--policy", "kv",
                                   "--policy", "round-robin", "--json"])
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)  # stdout is nothing but the JSON document
    assert [r["policy"] for r in rows] == ["kv", "round-robin"]
    for r in rows:
        assert {"hit_rate", "ttft_p50", "ttft_p99", "tpot_p99", "goodput_rps"} <= set(r)
        assert r["ttft_p50"] <= r["ttft_p99"] and r["goodput_rps"] > 0
        assert r["completed"] + r["rejected"] == 80
    assert rows[0]["hit_rate"] >= rows[1]["hit_rate"]
    assert "req/s" in res.stderr  # progress went to stderr


def test_simulate_engines_print_the_same_json(app: typer.Typer, files: tuple[Path, Path]) -> None:
    """--engine python (the reference) and native (the default) agree to the byte, goodput search
    included."""
    spec, trace = files
    args = ["simulate", "--trace", str(trace), "--spec", str(spec), "--policy", "kv", "--policy", "sglang", "--json"]
    native = CliRunner().invoke(app, args)
    python = CliRunner().invoke(app, [*args, "--engine", "python"])
    assert native.exit_code == python.exit_code == 0, native.stderr + python.stderr
    assert native.stdout == python.stdout and json.loads(native.stdout)


def test_simulate_without_a_compiler_names_the_python_engine(
    app: typer.Typer, files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load.cache_clear()
    monkeypatch.setenv("TANDEM_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler")
    spec, trace = files
    try:
        res = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--spec", str(spec), "--json"])
    finally:
        load.cache_clear()
    assert res.exit_code == 2 and res.stdout == ""
    assert "no-such-compiler" in res.stderr and "--engine python" in res.stderr


def test_simulate_bad_spec_exits_2(app: typer.Typer, files: tuple[Path, Path], tmp_path: Path) -> None:
    _, trace = files
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("v4-flash", "tiny"))
    res = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--spec", str(bad), "--json"])
    assert res.exit_code == 2
    assert "model.preset" in res.stderr and res.stdout == ""


def test_plan_recommends_the_best_goodput_per_gpu(app: typer.Typer, files: tuple[Path, Path]) -> None:
    spec, trace = files
    res = CliRunner().invoke(app, ["plan", "--spec", str(spec), "--trace", str(trace), "--gpus", "16",
                                   "--ttft-slo", "3", "--tpot-slo", "0.05", "--splits", "1", "--limit", "40",
                                   "--json"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    cands = out["candidates"]
    assert len(cands) >= 2
    assert out["best"] == cands[0]
    assert out["best"]["goodput_rps_per_gpu"] == max(c["goodput_rps_per_gpu"] for c in cands)
    for c in cands:
        assert c["gpus"] <= 16
        assert c["prefill_instances"] * c["prefill_gpus_each"] + c["decode_instances"] * c["decode_gpus_each"] \
            == c["gpus"]


def test_checkpoint_specs_need_the_model_named(app: typer.Typer, files: tuple[Path, Path], tmp_path: Path) -> None:
    _, trace = files
    spec = tmp_path / "ckpt.yaml"
    spec.write_text(SPEC.replace("{preset: v4-flash}", "{checkpoint: /models/DeepSeek-V4-Flash}"))
    args = ["simulate", "--trace", str(trace), "--spec", str(spec), "--policy", "kv", "--limit", "20", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "model.checkpoint" in res.stderr and "--model" in res.stderr
    res = CliRunner().invoke(app, [*args, "--model", "v4-flash"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)[0]["completed"] == 20
