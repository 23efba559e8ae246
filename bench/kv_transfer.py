"""KV transfer: NIXL pulls between two OS processes against the best same-process copy_.

For each request size (8K, 32K, 128K tokens) with the V4-Flash page layout (all 44 layers, MTP
included, unless --layers scales it down), a prefill process holds the request's pages, allocated
from a fragmented pool, and this process (the decode) pulls them: claim, one READ of coalesced
descriptors (cut over --lanes parallel NIXL agents, 2 by default), release. `nixl_gbps` is the
request's bytes over the time from posting the READ until this process sees it complete;
`memcpy_gbps` the same bytes over the best same-process `dst.copy_(src)` between pre-touched
contiguous buffers, measured in the same run. Each repeat is one pull, one copy_ with torch's
threads and one with a single thread, alternating so all see the same machine; `memcpy_gbps` is
the best of all those copies, `nixl_gbps` the best pull (the ratio of medians is printed too).
Pages: pools and copy buffers are collapsed onto 2 MiB pages, as TransferAgent does by default
(--no-hugepages: 4 KiB pages for both).
Fragmentation: both pools hand out pages from a free list that was given back in runs of 1..8 pages
in random order, so a request's pages are scattered on each side independently.
The fixed overhead is measured on a 1-block (256-token) request: per pull, the time spent outside
the READ's post -> completion (descriptors and the NIXL request, the claim round trip, sending the
release), median of the repeats.

    python bench/kv_transfer.py [--json PATH] [--tokens 8192 32768 131072] [--repeats 15] [--layers N]
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

# Run as a script, bench/ is sys.path[0], where bench/kernels.py would shadow the `kernels` package
# (hence the imports below this line: ruff E402 is off for this file).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch
from prometheus_client import CollectorRegistry

from workers.kv.allocator import PageAllocator
from workers.kv.geometry import KvGeometry, KvShape, PoolKind
from workers.kv.pool import PagePool
from workers.kv.presets import Preset
from workers.transfer.agent import AgentConfig, AgentInfo, TransferAgent
from workers.transfer.handoff import HandoffPages, HandoffTable
from workers.transfer.hugepages import HugepageReport, advise_hugepages
from workers.transfer.layout import LayoutSignature
from workers.transfer.messages import Inbox
from workers.transfer.metrics import TransferMetrics
from workers.transfer.pull import POLL_INTERVAL_S, Puller
from workers.transfer.server import HandoffServer
from workers.transfer.transport import NixlTransport

CONFIG = "v4-flash"
POOL_SLACK = 1.5  # pool pages per page the largest request needs: room to fragment
CHILD_LIFETIME_S = 900.0


@dataclass(frozen=True)
class Sizing:
    shape: KvShape
    max_tokens: int
    hugepages: bool
    lanes: int

    @property
    def geometry(self) -> KvGeometry:
        return KvGeometry.of(self.shape)

    def pages(self, pool: PoolKind) -> int:
        blocks = -(-self.max_tokens // self.shape.block_size)
        need = {PoolKind.BLOCK: blocks, PoolKind.WINDOW: 2, PoolKind.STATE: 1}[pool]
        return int(need * POOL_SLACK) + 2


def fragmented(pool: PoolKind, num_pages: int, seed: int) -> PageAllocator:
    """An allocator whose free list was given back in shuffled runs of 1..8 pages."""
    alloc = PageAllocator(pool, num_pages)
    taken = [alloc.take() for _ in range(num_pages)]
    rng = random.Random(seed)
    runs, i = [], 0
    while i < num_pages:
        n = rng.randint(1, 8)
        runs.append(taken[i : i + n])
        i += n
    rng.shuffle(runs)
    for run in runs:
        for page in run:
            alloc.unref(page)
            alloc.give_back(page)
    return alloc


def request_pages(allocs: dict[PoolKind, PageAllocator], tokens: int, shape: KvShape) -> HandoffPages:
    """Pages of a `tokens`-token request: its blocks, the window pages of its last `window` tokens,
    one state page."""
    blocks = -(-tokens // shape.block_size)
    first_window = max(tokens - shape.window, 0) // shape.window
    windows = -(-tokens // shape.window) - first_window
    take = {
        k: [allocs[k].take() for _ in range(n)]
        for k, n in ((PoolKind.BLOCK, blocks), (PoolKind.WINDOW, windows), (PoolKind.STATE, 1))
    }
    return HandoffPages(
        tuple(take[PoolKind.BLOCK]), tuple(take[PoolKind.WINDOW]), tuple(take[PoolKind.STATE])
    )


def give_back(allocs: dict[PoolKind, PageAllocator], pages: HandoffPages) -> None:
    for kind in PoolKind:
        for p in pages.of(kind):
            allocs[kind].unref(p)
            allocs[kind].give_back(p)


def make_pools(sizing: Sizing, pattern: int) -> dict[PoolKind, PagePool]:
    """Pools with every byte written (pre-touched); `pattern` seeds a cheap per-page fill."""
    pools = {k: PagePool(sizing.geometry.page(k), sizing.pages(k)) for k in PoolKind}
    for kind, pool in pools.items():
        rows = torch.arange(pool.num_pages, dtype=torch.int64).view(-1, 1)
        pool.buffer.copy_(
            ((rows * 7 + pattern + kind.value.__len__()) % 251).to(torch.uint8).expand_as(pool.buffer)
        )
    return pools


# --- the prefill process -------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenCmd:
    tokens: int


@dataclass(frozen=True)
class StopCmd:
    pass


def prefill_main(conn: mp.connection.Connection, sizing: Sizing) -> None:
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    pools = make_pools(sizing, pattern=11)
    allocs = {k: fragmented(k, sizing.pages(k), seed=1 + i) for i, k in enumerate(PoolKind)}
    config = AgentConfig("bench-prefill", hugepages=sizing.hugepages)
    agent = TransferAgent(config, pools, LayoutSignature.of(sizing.geometry))
    conn.send((agent.info(), agent.hugepages))
    agent.pair(conn.recv())
    table = HandoffTable("bench-prefill", 30.0, 30.0, lambda rid, p: give_back(allocs, p), time.monotonic)
    server = HandoffServer(Inbox(agent), table)
    n, end = 0, time.monotonic() + CHILD_LIFETIME_S
    while time.monotonic() < end:
        server.poll()
        if not conn.poll(0):
            time.sleep(POLL_INTERVAL_S)  # see workers/transfer/pull.py: sleeping beats spinning here
            continue
        cmd = conn.recv()
        if isinstance(cmd, StopCmd):
            break
        n += 1
        conn.send(table.open(f"req-{n}", request_pages(allocs, cmd.tokens, sizing.shape), cmd.tokens, 0))
    agent.close()


# --- measurements --------------------------------------------------------------------------------
class CopyBaseline:
    """Same-process copy_ of `nbytes` between two pre-touched contiguous buffers, on huge pages
    when the pools are (the same treatment as the pulled memory)."""

    def __init__(self, nbytes: int, hugepages: bool) -> None:
        self.src = torch.empty(nbytes, dtype=torch.uint8).fill_(3)
        self.dst = torch.empty(nbytes, dtype=torch.uint8).fill_(4)
        self.reports = tuple(advise_hugepages(b) for b in (self.src, self.dst)) if hugepages else ()

    def seconds(self, threads: int) -> float:
        """One copy_ with `threads` intra-op threads (torch's default uses every core)."""
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            t = time.perf_counter()
            self.dst.copy_(self.src)
            return time.perf_counter() - t
        finally:
            torch.set_num_threads(before)


class Bench:
    def __init__(self, sizing: Sizing) -> None:
        ctx = mp.get_context("spawn")
        self.sizing = sizing
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=prefill_main, args=(child, sizing), daemon=True)
        self.proc.start()
        self.pools = make_pools(sizing, pattern=99)
        self.allocs = {k: fragmented(k, sizing.pages(k), seed=100 + i) for i, k in enumerate(PoolKind)}
        config = AgentConfig("bench-decode", hugepages=sizing.hugepages, lanes=sizing.lanes)
        self.agent = TransferAgent(config, self.pools, LayoutSignature.of(sizing.geometry))
        info, self.prefill_hugepages = self._recv(300)
        assert isinstance(info, AgentInfo)
        self.agent.pair(info)
        self.conn.send(self.agent.info())
        self.metrics = TransferMetrics(CollectorRegistry())
        self.transport = NixlTransport(self.agent)
        self.puller = Puller(Inbox(self.agent), self.transport, self.metrics, time.perf_counter)

    def _recv(self, timeout: float = 60.0) -> object:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"bench prefill process sent nothing in {timeout}s")
        return self.conn.recv()

    def pull(self, tokens: int):  # noqa: ANN201 (PullResult)
        self.conn.send(OpenCmd(tokens))
        desc = self._recv()
        local = request_pages(self.allocs, tokens, self.sizing.shape)
        result = self.puller.pull(desc, local, cached_blocks=0, timeout_s=60.0)
        self._check(desc.pages, local)
        give_back(self.allocs, local)
        return result

    def _check(self, src: HandoffPages, dst: HandoffPages) -> None:
        """The last page of each pool holds the prefill's pattern: the bytes really moved."""
        for kind in PoolKind:
            s, d = src.of(kind)[-1], dst.of(kind)[-1]
            want = (s * 7 + 11 + len(kind.value)) % 251
            row = self.pools[kind].buffer[d]
            if not bool((row == want).all()):
                raise AssertionError(f"{kind.value} page {s} -> {d}: bytes differ after the pull")

    def close(self) -> None:
        self.conn.send(StopCmd())
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
        self.transport.close()
        self.agent.close()


def huge_fraction(reports: tuple[HugepageReport, ...]) -> float:
    """Share of the bytes that sit on huge pages (0 when nothing was advised)."""
    total = sum(r.nbytes for r in reports)
    return sum(r.collapsed for r in reports) / total if total else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write fixed_overhead_ms and rows as JSON")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all)")
    parser.add_argument("--lanes", type=int, default=2, help="parallel NIXL READ lanes of the decode")
    parser.add_argument(
        "--no-hugepages", action="store_true", help="leave pools and copy buffers on 4 KiB pages"
    )
    args = parser.parse_args(argv)
    shape = Preset.V4_FLASH.shape()
    if args.layers:
        shape = dataclasses.replace(shape, compress_ratios=shape.compress_ratios[: args.layers])
    layers = len(shape.compress_ratios)
    sizing = Sizing(shape, max(args.tokens), hugepages=not args.no_hugepages, lanes=args.lanes)
    threads = torch.get_num_threads()  # the memcpy baseline's threads: torch's default
    bench = Bench(sizing)
    rows = []
    try:
        for _ in range(2):  # warm up the connection and both pools' pages
            bench.pull(min(args.tokens))
        one = [bench.pull(shape.block_size) for _ in range(max(args.repeats, 5) * 4)]
        overhead_ms = 1e3 * statistics.median(r.total_seconds - r.read_seconds for r in one)
        claim_ms = 1e3 * statistics.median(r.claim_seconds for r in one)
        prepare_ms = 1e3 * statistics.median(r.prepare_seconds for r in one)
        one_total_ms = 1e3 * statistics.median(r.total_seconds for r in one)
        for tokens in args.tokens:
            # NIXL pulls and copies alternate, so both see the same (shared, noisy) machine.
            baseline = CopyBaseline(bench.pull(tokens).nbytes, sizing.hugepages)
            results, copies, single = [], [], []
            for _ in range(args.repeats):
                results.append(bench.pull(tokens))
                copies.append(baseline.seconds(threads))
                single.append(baseline.seconds(1))
            baseline_reports = baseline.reports
            del baseline
            nbytes = results[0].nbytes
            # The baseline is the best copy either way: with torch's threads, or with one (which
            # wins whenever the other core is busy with someone else's work).
            best_read, best_copy = min(r.read_seconds for r in results), min(copies + single)
            rows.append(
                {
                    "config": CONFIG,
                    "tokens": tokens,
                    "bytes": nbytes,
                    "nixl_gbps": nbytes / best_read / 1e9,
                    "memcpy_gbps": nbytes / best_copy / 1e9,
                    "efficiency": best_copy / best_read,
                    "_descriptors": results[0].descriptors,
                    "_copy_huge": huge_fraction(baseline_reports),
                    "_memcpy1_gbps": nbytes / min(single) / 1e9,
                    "_memcpyn_gbps": nbytes / min(copies) / 1e9,
                    "_median_efficiency": statistics.median(copies + single)
                    / statistics.median(r.read_seconds for r in results),
                }
            )
    finally:
        bench_hugepages = (bench.agent.hugepages, bench.prefill_hugepages)
        bench.close()

    pages = "2 MiB" if sizing.hugepages else "4 KiB"
    print(
        f"KV transfer, {CONFIG} page layout ({layers} layers{', scaled down' if args.layers else ''}), "
        f"fragmented pools, NIXL UCX over loopback on {args.lanes} lane(s), memcpy with torch's {threads} "
        "threads, "
        f"best of {args.repeats}"
    )
    print(
        f"pools on {pages} pages: decode {huge_fraction(bench_hugepages[0]):.0%}, "
        f"prefill {huge_fraction(bench_hugepages[1]):.0%} of their bytes collapsed"
    )
    print(
        f"{'config':<9} {'tokens':>7} {'MiB':>8} {'descs':>6} {'nixl GB/s':>10} "
        f"{'memcpy GB/s':>12} {'efficiency':>10} {'(medians)':>9} {'copy huge':>9} "
        f"{'copy 1 thr':>10} {f'copy {threads} thr':>10}"
    )
    for r in rows:
        print(
            f"{r['config']:<9} {r['tokens']:>7} {r['bytes'] / 2**20:>8.1f} {r['_descriptors']:>6} "
            f"{r['nixl_gbps']:>10.2f} {r['memcpy_gbps']:>12.2f} {r['efficiency']:>10.2f} "
            f"{r['_median_efficiency']:>9.2f} {r['_copy_huge']:>9.0%} {r['_memcpy1_gbps']:>10.2f} "
            f"{r['_memcpyn_gbps']:>10.2f}"
        )
    print(
        f"1-block handoff ({one[0].nbytes / 2**20:.1f} MiB): fixed overhead {overhead_ms:.3f} ms "
        f"(claim round trip {claim_ms:.3f} ms, NIXL request {prepare_ms:.3f} ms), whole pull "
        f"{one_total_ms:.3f} ms, medians of {len(one)}"
    )
    if args.json:
        payload = {
            "fixed_overhead_ms": overhead_ms,
            "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
