"""KV footprint of one request in Tandem's paged pools, next to DeepSeek-V3.2's MLA layout.

For each context length the script builds the real KvCacheManager (pools on the meta device, so
sizes without memory), admits one request, steps it to the context length and reads what the
allocator holds: its block pages (compressed entries and indexer keys of every 256-token block),
the window pages covering its last 128 tokens (with the boundary compressor state) and its running
compressor-state page. Bytes therefore come from the allocator's own page sizes, and the pools'
used bytes are checked against the request's. Baseline, measured in the same run: V3.2 with
61 MLA layers of 656 B fp8 entries + 132 B fp8 indexer keys per token, no window. A second Tandem
column shows the same pools with fp8 indexer keys (vLLM's choice) for comparison.

Target: V4-Flash at 1M context <= 7.5% of V3.2 (vLLM's layout with fp8 keys: about 8.1%; the
launch material: 10%).

    python bench/kv_footprint.py [--config v4-flash|v4-pro ...] [--context 4096 ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from workers.kv.entry import KeyFormat
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.manager import WINDOW_PAGES_PER_SEQ, KvCacheManager, KvCapacity
from workers.kv.presets import Preset

V32_LAYERS = 61
V32_ENTRY_BYTES = 656
V32_INDEX_KEY_BYTES = 132
V32_BYTES_PER_TOKEN = V32_LAYERS * (V32_ENTRY_BYTES + V32_INDEX_KEY_BYTES)  # 48,068
TARGET = (Preset.V4_FLASH, 1 << 20, 0.075)
DEFAULT_CONTEXTS = (4096, 131072, 1 << 20)


@dataclass(frozen=True)
class Row:
    config: str
    context: int
    bytes_per_token: float
    bytes_per_request: int
    v32_bytes_per_token: int
    ratio: float
    fp8_keys_bytes_per_token: float
    block_pages: int
    window_pages: int


def request_footprint(preset: Preset, context: int, key_format: KeyFormat) -> tuple[int, int, int]:
    """(bytes, block pages, window pages) one request of `context` tokens holds in the real allocator."""
    geom = KvGeometry.of(preset.shape(key_format))
    blocks = -(-context // geom.shape.block_size)
    cap = KvCapacity(block_pages=blocks, window_pages=WINDOW_PAGES_PER_SEQ, state_pages=1)
    m = KvCacheManager(geom, cap, worker="bench", device="meta")
    m.admit(0, [], context, context)
    m.ensure(0, context)
    m.advance(0, context, boundary_state_written=True)
    used = sum((m.allocators[p].num_pages - m.allocators[p].num_free) * geom.page(p).nbytes for p in PoolKind)
    held = m.seq_bytes(0)
    if used != held:
        raise AssertionError(f"{preset.value} at {context}: pools use {used} B but the request holds {held} B")
    return held, len(m.block_pages(0)), len(m.window_pages(0))


def measure(preset: Preset, context: int) -> Row:
    held, n_blocks, n_windows = request_footprint(preset, context, KeyFormat.FP4)
    held8, _, _ = request_footprint(preset, context, KeyFormat.FP8)
    v32_request = V32_BYTES_PER_TOKEN * context
    return Row(
        config=preset.value,
        context=context,
        bytes_per_token=held / context,
        bytes_per_request=held,
        v32_bytes_per_token=V32_BYTES_PER_TOKEN,
        ratio=held / v32_request,
        fp8_keys_bytes_per_token=held8 / context,
        block_pages=n_blocks,
        window_pages=n_windows,
    )


def _ctx(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


def print_table(rows: list[Row]) -> None:
    head = (f"{'config':<9} {'context':>7} {'B/token':>9} {'B/request':>15} {'V3.2 B/token':>12} "
            f"{'V3.2 B/request':>15} {'ratio':>7} {'fp8-key B/tok':>13} {'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.config:<9} {_ctx(r.context):>7} {r.bytes_per_token:>9.1f} {r.bytes_per_request:>15,} "
              f"{r.v32_bytes_per_token:>12,} {r.v32_bytes_per_token * r.context:>15,} {r.ratio:>7.2%} "
              f"{r.fp8_keys_bytes_per_token:>13.1f} {r.fp8_keys_bytes_per_token / r.v32_bytes_per_token:>7.2%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=[Preset.V4_FLASH.value, Preset.V4_PRO.value],
                    help="model geometry (repeatable; default both)")
    ap.add_argument("--context", action="append", type=int, help="context length in tokens (repeatable)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = ap.parse_args(argv)
    presets = [Preset(c) for c in (args.config or [Preset.V4_FLASH.value, Preset.V4_PRO.value])]
    contexts = args.context or list(DEFAULT_CONTEXTS)
    bad = [c for c in contexts if c <= 0]
    if bad:
        ap.error(f"--context must be positive, got {bad}")
    rows = [measure(p, c) for p in presets for c in contexts]
    print_table(rows)
    status = 0
    target_rows = [r for r in rows if r.config == TARGET[0].value and r.context == TARGET[1]]
    for r in target_rows:
        ok = r.ratio <= TARGET[2]
        print(f"\ntarget {TARGET[0].value} at {_ctx(TARGET[1])}: {r.ratio:.2%} of V3.2 "
              f"(<= {TARGET[2]:.1%}): {'met' if ok else 'MISSED'}")
        status |= 0 if ok else 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
