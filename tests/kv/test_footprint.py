"""bench/kv_footprint.py: its numbers are what the real allocator holds, and Flash meets its target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import Preset

pytestmark = pytest.mark.kv
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict]:
    out = tmp_path_factory.mktemp("bench") / "kv.json"
    cmd = [sys.executable, "-P", str(ROOT / "bench" / "kv_footprint.py"), "--json", str(out),
           "--context", "4096", "--context", str(1 << 20)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "target v4-flash at 1M" in proc.stdout and "met" in proc.stdout
    return {(r["config"], r["context"]): r for r in json.loads(out.read_text())}


def test_rows_have_the_documented_fields(rows: dict[tuple[str, int], dict]) -> None:
    assert set(rows) == {(c, n) for c in ("v4-flash", "v4-pro") for n in (4096, 1 << 20)}
    for (_, n), r in rows.items():
        assert isinstance(r["context"], int) and r["v32_bytes_per_token"] == 61 * (656 + 132)
        assert r["ratio"] == pytest.approx(r["bytes_per_request"] / (48068 * n), rel=1e-12)
        assert r["bytes_per_token"] == pytest.approx(r["bytes_per_request"] / n, rel=1e-12)


def test_flash_at_1m_is_at_most_7_5_percent_of_v32(rows: dict[tuple[str, int], dict]) -> None:
    assert rows[("v4-flash", 1 << 20)]["ratio"] <= 0.075


def test_flash_4k_matches_hand_count(rows: dict[tuple[str, int], dict]) -> None:
    """16 blocks of 21 CSA layers x 64 x (584 + 68) + 20 HCA layers x 2 x 584; one window page
    (44 layers x 128 x 584, plus 21 CSA boundary states of 4 rows); the running state page (21 CSA
    layers x 7 fp32 kv + score rows; 20 HCA layers x 3 fp32 running accumulators of 512)."""
    block = 21 * 64 * (584 + 68) + 20 * 2 * 584
    window = 44 * 128 * 584 + 21 * 4 * (2 * 1024 * 4 + 2 * 256 * 4)
    state = 21 * 7 * (2 * 1024 * 4 + 2 * 256 * 4) + 20 * 3 * 512 * 4
    assert rows[("v4-flash", 4096)]["bytes_per_request"] == 16 * block + window + state


def test_a_real_4k_allocation_consumes_the_reported_bytes(rows: dict[tuple[str, int], dict]) -> None:
    """CPU-memory pools, 256-token steps: the pages in use add up to the benchmark's figure."""
    geom = KvGeometry.of(Preset.V4_FLASH.shape())
    m = KvCacheManager(geom, KvCapacity(block_pages=20, window_pages=6, state_pages=2), "w", device="cpu")
    assert m.pools[PoolKind.BLOCK].buffer.device.type == "cpu"
    m.admit(7, [], 4096, 4096)
    for end in range(256, 4097, 256):
        m.ensure(7, end)
        m.advance(7, end, boundary_state_written=True)
    used = sum((m.allocators[p].num_pages - m.allocators[p].num_free) * geom.page(p).nbytes for p in PoolKind)
    assert used == rows[("v4-flash", 4096)]["bytes_per_request"]
