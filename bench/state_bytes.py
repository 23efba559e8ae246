"""Per-request compressor state and KV handoff bytes: running HCA accumulators vs raw rows.

For each model and prompt length the script builds the real KvCacheManager (pools on the meta
device), admits one request, fills it to the prompt length and asks the transfer code which pages
a handoff of it moves (`workers.transfer.pages.sequence_pages`: its block pages, the window pages
of its last 128 tokens, its state page); bytes are those pages' byte ranges in the pools. The
STATE page is the geometry's. Baseline, in the same run, from the same segment table: the state
page as it was with HCA kept as raw fp32 (kv, score) rows of the unfinished block (ratio - 1 rows
of 2 x width fp32 per HCA layer in place of 3 x width accumulators), everything else equal.

    python -P bench/state_bytes.py [--config v4-flash|v4-pro ...] [--prompt 4096 ...] [--mtp] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from workers.kv.geometry import FP32, KvGeometry, LayerKind, Part, PoolKind
from workers.kv.manager import KvCacheManager, KvCapacity
from workers.kv.presets import Preset, kv_shape
from workers.transfer.pages import sequence_pages

DEFAULT_PROMPTS = (1024, 4096, 32768)


@dataclass(frozen=True)
class Row:
    config: str
    prompt: int
    state_rows_bytes: int  # baseline: HCA state as raw rows
    state_bytes: int  # now: HCA state as running accumulators
    handoff_rows_bytes: int
    handoff_bytes: int
    state_share_rows: float  # baseline state page / baseline handoff
    state_share: float


def raw_rows_state_bytes(geom: KvGeometry) -> int:
    """The state page with every HCA segment as ratio - 1 raw (kv, score) fp32 rows."""
    total = geom.state.nbytes
    for s in geom.state.segments:
        kind = geom.shape.kinds[s.layer]
        if kind is LayerKind.HCA and s.part is Part.STATE:
            width = s.item_bytes // (3 * FP32)
            total += (kind.value - 1) * 2 * width * FP32 - s.nbytes
    return total


def measure(preset: Preset, prompt: int, mtp: bool) -> Row:
    geom = KvGeometry.of(kv_shape(preset.config(), mtp_hidden=mtp))
    blocks = -(-prompt // geom.shape.block_size)
    m = KvCacheManager(geom, KvCapacity(block_pages=blocks + 1, window_pages=4, state_pages=1), "b", device="meta")
    m.admit(0, [], prompt, prompt)
    m.ensure(0, prompt)
    pages = sequence_pages(m, 0, prompt).pages
    moved = 0
    for pool, ids in ((PoolKind.BLOCK, pages.block), (PoolKind.WINDOW, pages.window), (PoolKind.STATE, pages.state)):
        moved += sum(n for _, n in m.pools[pool].byte_ranges(list(ids)))
    rows_state = raw_rows_state_bytes(geom)
    rows_moved = moved - geom.state.nbytes + rows_state
    return Row(preset.value, prompt, rows_state, geom.state.nbytes, rows_moved, moved,
               rows_state / rows_moved, geom.state.nbytes / moved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=[Preset.V4_FLASH.value, Preset.V4_PRO.value])
    ap.add_argument("--prompt", action="append", type=int)
    ap.add_argument("--mtp", action="store_true", help="state page with speculation's MTP hidden row")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = ap.parse_args(argv)
    configs = [Preset(c) for c in (args.config or [Preset.V4_FLASH.value, Preset.V4_PRO.value])]
    rows = [measure(p, n, args.mtp) for p in configs for n in (args.prompt or DEFAULT_PROMPTS)]
    head = (f"{'config':<9} {'prompt':>6} {'state rows':>12} {'state acc':>11} {'handoff rows':>13} "
            f"{'handoff acc':>12} {'saved':>7} {'state share':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        saved = 1 - r.handoff_bytes / r.handoff_rows_bytes
        print(f"{r.config:<9} {r.prompt:>6} {r.state_rows_bytes:>12,} {r.state_bytes:>11,} "
              f"{r.handoff_rows_bytes:>13,} {r.handoff_bytes:>12,} {saved:>6.1%} "
              f"{r.state_share_rows:>5.1%} -> {r.state_share:>4.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
