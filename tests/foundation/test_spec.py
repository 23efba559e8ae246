"""DeploymentSpec: every shipped spec validates; each kind of mistake gives its own line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import DisaggregationMode, SpecError, load_spec, parse_spec

pytestmark = pytest.mark.foundation

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "deploy").glob("*.yaml"))


def test_there_are_the_three_specs() -> None:
    assert {p.name for p in SPECS} >= {"local.yaml", "gb200-nvl72-v4-pro.yaml", "b300-v4-flash.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_deploy_spec_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.decode.instances >= 1


def test_local_spec_is_the_embedded_default() -> None:
    spec = load_spec(ROOT / "deploy" / "local.yaml")
    assert spec.topology.kind == "cpu"
    assert spec.model.checkpoint == "deploy/models/tiny-demo"
    assert (ROOT / spec.model.checkpoint / "config.json").is_file()
    assert (spec.prefill.instances, spec.decode.instances) == (1, 1)
    assert spec.router.disaggregation.mode is DisaggregationMode.ALWAYS
    assert spec.router.host == "127.0.0.1"


def _local() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())


def _with(path: str, value: object) -> dict:
    data = copy.deepcopy(_local())
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[leaf] = value
    return data


BROKEN = [
    # (what, data, the one line expected)
    ("wrong type", _with("prefill.instances", "two"), "prefill.instances: Input should be a valid integer"),
    ("negative count", _with("decode.max_batch", -3), "decode.max_batch: Input should be greater than or equal to 1 (got -3)"),
    ("unknown key", _with("router.polcy", "kv"), "router.polcy: unknown field (value 'kv')"),
    ("bad enum", _with("router.policy", "random"), "router.policy: Input should be 'kv', 'round-robin', 'sglang' or 'dynamo' (got 'random')"),
    ("bad topology kind", _with("topology", {"kind": "tpu"}), "topology: Input tag 'tpu' found using 'kind' does not match any of the expected tags"),
    ("port out of range", _with("router.port", 70000), "router.port: Input should be less than or equal to 65535 (got 70000)"),
    ("both model sources", _with("model.preset", "tiny"), "model: set exactly one of 'preset' and 'checkpoint'"),
    ("no decode", _with("decode.instances", 0), "decode.instances must be at least 1 (got 0)"),
    ("fraction above 1", _with("router.disaggregation.max_local_uncached_fraction", 1.5),
     "router.disaggregation.max_local_uncached_fraction: Input should be less than or equal to 1 (got 1.5)"),
]


@pytest.mark.parametrize(("what", "data", "line"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_spec_gives_its_message(what: str, data: dict, line: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data, "test.yaml")
    assert len(info.value.problems) == 1, info.value.problems
    assert line in info.value.problems[0]
    assert "test.yaml" in str(info.value)


def test_several_mistakes_give_one_line_each() -> None:
    data = _with("prefill.instances", -1)
    data["decode"]["ep_ranks"] = 0
    data["extra_top"] = 1
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert sorted(p.split(":")[0] for p in info.value.problems) == ["decode.ep_ranks", "extra_top", "prefill.instances"]


def test_missing_field_is_named() -> None:
    data = _local()
    del data["decode"]
    with pytest.raises(SpecError, match="decode: required field is missing"):
        parse_spec(data)


def test_ep_group_must_fit_one_nvlink_domain() -> None:
    data = yaml.safe_load((ROOT / "deploy" / "b300-v4-flash.yaml").read_text())
    data["decode"]["ep_ranks"] = 16
    with pytest.raises(SpecError, match="does not fit one NVLink domain of 8 GPUs"):
        parse_spec(data)


def test_gpu_count_must_fit_the_topology() -> None:
    data = yaml.safe_load((ROOT / "deploy" / "gb200-nvl72-v4-pro.yaml").read_text())
    data["prefill"]["instances"] = 4
    with pytest.raises(SpecError, match="need 80 GPUs, topology gb200-nvl72 has 72"):
        parse_spec(data)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"line \d+, column \d+: not valid YAML"):
        load_spec(bad)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the file"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping of fields, got list"):
        load_spec(tmp_path / "list.yaml")


def test_spec_is_frozen() -> None:
    spec = parse_spec(_local())
    with pytest.raises(Exception, match="frozen"):
        spec.name = "other"  # type: ignore[misc]


def test_router_settings_carry_the_spec_weights_and_real_block_bytes() -> None:
    from orchestrator.worker_plan import model_config, router_settings
    from workers.kv.geometry import KvGeometry
    from workers.kv.presets import kv_shape

    data = _local()
    data["router"]["weights"] = {"kv_usage": 0.25, "running": 2.0, "dp_balance": 0.0, "reuse_credit": 0.5}
    spec = parse_spec(data)
    cfg = model_config(spec)
    s = router_settings(spec, cfg)
    assert (s.kv_params.w_kv, s.kv_params.w_running, s.kv_params.w_dp, s.kv_params.reuse_credit) == (0.25, 2.0, 0.0, 0.5)
    assert s.fleet.kv_bytes_per_block == KvGeometry.of(kv_shape(cfg, with_mtp=False)).block.nbytes
    assert s.limits.max_context == 4096 and s.host == "127.0.0.1"
