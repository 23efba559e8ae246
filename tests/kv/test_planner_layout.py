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


@pytest.mark.parametrize(("preset", "name"), [(Preset.V4_FLASH, ModelName.V4_FLASH), (Preset.V4_PRO, ModelName.V4_PRO)])
def test_largest_state_is_the_state_page(preset: Preset, name: ModelName) -> None:
    """The planner's reserve counts the compressor states the STATE page holds, byte for byte (CSA
    rows, HCA running accumulators), and a request's state at a block boundary is CSA rows only."""
    geo = KvGeometry.of(preset.shape())
    assert kv_layout.state_page_bytes(model(name)) == geo.state.nbytes
    windows = sum(a.layers * a.window * a.entry_bytes for a in model(name).attention)
    assert kv_layout.request_reserve_bytes(model(name), 0) == windows + geo.state.nbytes
    # At 256 tokens: CSA holds 4 rows of its last block per compressor, HCA nothing (0 mod 128).
    csa = sum(s.item_bytes * 4 for s in geo.state.segments if geo.shape.kinds[s.layer] is LayerKind.CSA)
    assert kv_layout.window_and_state_bytes(model(name), 256) == windows + csa
    # At 300: CSA 4 + 300 mod 4 = 4 rows again, every HCA layer its accumulators.
    hca = sum(s.nbytes for s in geo.state.segments if geo.shape.kinds[s.layer] is LayerKind.HCA)
    assert kv_layout.window_and_state_bytes(model(name), 300) == windows + csa + hca
