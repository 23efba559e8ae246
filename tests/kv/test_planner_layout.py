"""The planner's torch-free page arithmetic agrees with the workers' KvGeometry byte for byte."""

from __future__ import annotations

import pytest

from orchestrator.planner import kv_layout
from orchestrator.planner.models import ModelName, model
from workers.kv.geometry import KvGeometry, LayerKind
from workers.kv.presets import Preset

pytestmark = pytest.mark.kv


@pytest.mark.parametrize(("preset", "name"), [(Preset.V4_FLASH, ModelName.V4_FLASH), (Preset.V4_PRO, ModelName.V4_PRO)])
def test_block_page_bytes_match_the_geometry(preset: Preset, name: ModelName) -> None:
    geo = KvGeometry.of(preset.shape())
    assert kv_layout.block_bytes(model(name)) == geo.block.nbytes


@pytest.mark.parametrize(("preset", "name"), [(Preset.V4_FLASH, ModelName.V4_FLASH), (Preset.V4_PRO, ModelName.V4_PRO)])
def test_layer_counts_and_windows_match_the_config(preset: Preset, name: ModelName) -> None:
    kinds = KvGeometry.of(preset.shape()).shape.kinds
    n_main = len(kinds) - preset.config().num_mtp_layers
    planned = {a.kind.value: a.layers for a in model(name).attention}
    counted = {kind: sum(k is layer_kind for k in kinds[:n_main])
               for kind, layer_kind in (("swa", LayerKind.SWA), ("csa", LayerKind.CSA), ("hca", LayerKind.HCA))}
    assert planned == {k: n for k, n in counted.items() if n}
    assert {a.window for a in model(name).attention} == {preset.config().window}
