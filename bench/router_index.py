"""Tandem's KvIndex against Dynamo's Rust RadixTree, on the same events and queries, in one run.

Workload (deterministic for a seed): W workers; `groups` shared prefixes of `prefix_blocks`
blocks; each worker stores sequences = one group's prefix + a unique suffix (100-420 blocks in
all) until it holds about blocks / W distinct blocks. Each sequence is one `stored` event with
the blocks the worker did not hold yet (parent = the block before them), as a worker emits them.
Then an eviction phase: `removed` events for the tail quarter of a fifth of each worker's
sequences. Queries (50-420 blocks): 80% a prefix of a stored sequence extended with new blocks,
20% a group prefix plus new blocks. Reported: event apply rate (blocks per second of CPU time, and of wall clock) per phase, and
match latency p50/p99 over the queries: on the full index as first touched after the build
(cold CPU caches: each query's entries come from memory), the same with warm caches (best of 3
back-to-back calls: the compute cost alone), and after the evictions (cold). Dynamo's
events are serialised to JSON before timing (its API takes JSON bytes; the encoding is not
counted against it). Every query's answer is compared between the two indexes.

    .venv/bin/python bench/router_index.py [--json PATH]     (Dynamo: pip install '.[bench]')
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.router.kv_index import KvIndex


@dataclass(frozen=True)
class Workload:
    stored: list[tuple[int, list[int], int | None]]  # (worker, new blocks, parent hash)
    removed: list[tuple[int, list[int]]]
    queries: list[list[int]]
    total_blocks: int


def make_workload(
    workers: int, blocks: int, groups: int, prefix_blocks: int, queries: int, seed: int
) -> Workload:
    rng = random.Random(seed)
    new = lambda n: [rng.getrandbits(64) for _ in range(n)]  # noqa: E731 - one random u64 per block
    prefixes = [new(prefix_blocks) for _ in range(groups)]
    per_worker = blocks // workers
    per_worker_events: list[list[tuple[int, list[int], int | None]]] = []
    removed, seqs = [], []
    total = 0
    for w in range(workers):
        held: set[int] = set()
        mine, stored = [], []
        while len(held) < per_worker:
            seq = prefixes[rng.randrange(groups)] + new(rng.randint(0, 420 - prefix_blocks))
            first = next((i for i, h in enumerate(seq) if h not in held), len(seq))
            stored.append((w, seq[first:], seq[first - 1] if first else None))
            held.update(seq)
            mine.append(seq)
        total += len(held)
        seqs += mine
        per_worker_events.append(stored)
        for seq in rng.sample(mine, len(mine) // 5):
            tail = seq[prefix_blocks:]
            removed.append((w, tail[len(tail) - len(tail) // 4 :]))
    # Workers' events interleave at the router; each worker's stay in order (parents first).
    stored = []
    cursors = [0] * workers
    live = list(range(workers))
    while live:
        k = rng.randrange(len(live))
        w = live[k]
        stored.append(per_worker_events[w][cursors[w]])
        cursors[w] += 1
        if cursors[w] == len(per_worker_events[w]):
            live[k] = live[-1]
            live.pop()
    qs = []
    for _ in range(queries):
        length = rng.randint(50, 420)
        base = rng.choice(seqs) if rng.random() < 0.8 else rng.choice(prefixes)
        keep = base[: rng.randint(min(length, len(base)) // 2, min(length, len(base)))]
        qs.append(keep + new(length - len(keep)))
    return Workload(stored, removed, qs, total)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)


class Side:
    """One index under test: build from the stored events, evict, answer queries."""

    name = ""

    def fresh(self) -> None: ...
    def store(self) -> None: ...
    def remove(self) -> None: ...
    def match(self, q: list[int]) -> object: ...
    def answer(self, raw: object) -> dict: ...


class TandemSide(Side):
    name = "Tandem KvIndex"

    def __init__(self, wl: Workload) -> None:
        self.wl = wl

    def fresh(self) -> None:
        self.index = KvIndex()
        self.match = self.index.match

    def store(self) -> None:
        stored = self.index.stored
        for w, hashes, parent in self.wl.stored:
            stored(w, hashes, parent)

    def remove(self) -> None:
        removed = self.index.removed
        for w, hashes in self.wl.removed:
            removed(w, hashes)

    def answer(self, raw: object) -> dict:
        return raw


class DynamoSide(Side):
    name = "Dynamo RadixTree"

    def __init__(self, wl: Workload) -> None:
        from dynamo._core import RadixTree  # the optional `bench` extra; ImportError when absent

        self.tree_type = RadixTree

        def ev(i: int, data: dict) -> bytes:
            return json.dumps({"event_id": i, "data": data}).encode()

        # Serialised before timing: Dynamo's API takes JSON bytes; the encoding is not its cost.
        self.store_ev = [
            (
                w,
                ev(
                    i,
                    {
                        "stored": {
                            "parent_hash": p,
                            "blocks": [{"block_hash": h, "tokens_hash": h} for h in hs],
                        }
                    },
                ),
            )
            for i, (w, hs, p) in enumerate(wl.stored)
        ]
        self.rm_ev = [(w, ev(i, {"removed": {"block_hashes": hs}})) for i, (w, hs) in enumerate(wl.removed)]

    def fresh(self) -> None:
        tree = self.tree_type()
        self.apply = tree.apply_event
        find = tree.find_matches
        self.match = lambda q: find(q).scores  # the call and the dict of scores, nothing else

    def store(self) -> None:
        apply = self.apply
        for w, payload in self.store_ev:
            apply(w, payload)

    def remove(self) -> None:
        apply = self.apply
        for w, payload in self.rm_ev:
            apply(w, payload)

    def answer(self, raw: object) -> dict:
        return {w: n for (w, _rank), n in raw.items() if n}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) fn takes, with the collector off so neither side
    pays for the other's garbage. On a shared machine the CPU time is the steadier measure: it
    leaves out the time other processes hold the core (and counts any helper threads' work)."""
    gc.collect()
    gc.disable()
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    gc.enable()
    return wall, cpu


def query_pass(side: Side, queries: list[list[int]], repeat: int = 1) -> tuple[list[float], list[object]]:
    """Each query's latency (us): one call, or with repeat > 1 the best of that many back-to-back
    calls (the query's index entries then sit in the CPU caches: the compute cost alone)."""
    lat, raw = [], []
    gc.collect()
    gc.disable()
    clock, match = time.perf_counter_ns, side.match
    for q in queries:
        best = float("inf")
        for _ in range(repeat):
            t0 = clock()
            r = match(q)
            best = min(best, clock() - t0)
        lat.append(best / 1000.0)
        raw.append(r)
    gc.enable()
    return lat, raw


def measure(sides: list[Side], wl: Workload, rounds: int) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Rounds alternate the sides (each round: fresh index, store, queries, evict, queries), so
    load from other processes hits both alike. Rates: the median round by CPU time, the best round
    by wall clock. Latency: per query, the best of the rounds (filters preemptions; every round
    starts from a fresh, cold index)."""
    n_store = sum(len(h) for _, h, _ in wl.stored)
    n_rm = sum(len(h) for _, h in wl.removed)
    keys = ("store", "store_cpu", "remove", "remove_cpu", "full", "evicted", "warm")
    acc = {s.name: {k: [] for k in keys} for s in sides}
    answers: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for side in sides:
            a = acc[side.name]
            side.fresh()
            wall, cpu = timed(side.store)
            a["store"].append(n_store / wall)
            a["store_cpu"].append(n_store / cpu)
            lat, raw_full = query_pass(side, wl.queries)
            a["full"].append(lat)
            a["warm"].append(query_pass(side, wl.queries, repeat=3)[0])
            wall, cpu = timed(side.remove)
            a["remove"].append(n_rm / wall)
            a["remove_cpu"].append(n_rm / cpu)
            lat, raw_ev = query_pass(side, wl.queries)
            a["evicted"].append(lat)
            answers[side.name] = [side.answer(r) for r in raw_full + raw_ev]
    stats = {}
    for name, a in acc.items():
        full = [min(v) for v in zip(*a["full"], strict=True)]
        ev = [min(v) for v in zip(*a["evicted"], strict=True)]
        warm = [min(v) for v in zip(*a["warm"], strict=True)]
        stats[name] = {
            "store_blocks_per_cpu_s": statistics.median(a["store_cpu"]),
            "store_blocks_per_s": max(a["store"]),
            "remove_blocks_per_cpu_s": statistics.median(a["remove_cpu"]),
            "remove_blocks_per_s": max(a["remove"]),
            "match_p50_us": pct(full, 50),
            "match_p99_us": pct(full, 99),
            "match_warm_p50_us": pct(warm, 50),
            "match_warm_p99_us": pct(warm, 99),
            "match_after_evictions_p50_us": pct(ev, 50),
            "match_after_evictions_p99_us": pct(ev, 99),
            "store_blocks_per_s_rounds": a["store"],
            "store_blocks_per_cpu_s_rounds": a["store_cpu"],
            "remove_blocks_per_s_rounds": a["remove"],
            "remove_blocks_per_cpu_s_rounds": a["remove_cpu"],
        }
    return stats, answers


ROWS = [  # (key, label, higher is better)
    ("store_blocks_per_cpu_s", "apply stored (blocks/CPU-s)", True),
    ("store_blocks_per_s", "apply stored (blocks/s, wall)", True),
    ("remove_blocks_per_cpu_s", "apply removed (blocks/CPU-s)", True),
    ("remove_blocks_per_s", "apply removed (blocks/s, wall)", True),
    ("match_p50_us", "match p50 (us)", False),
    ("match_p99_us", "match p99 (us)", False),
    ("match_warm_p50_us", "match p50, warm caches (us)", False),
    ("match_warm_p99_us", "match p99, warm caches (us)", False),
    ("match_after_evictions_p50_us", "match p50 after evictions (us)", False),
    ("match_after_evictions_p99_us", "match p99 after evictions (us)", False),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument(
        "--blocks", type=int, default=1_000_000, help="distinct blocks stored, summed over workers"
    )
    ap.add_argument("--groups", type=int, default=32, help="shared prefixes")
    ap.add_argument("--prefix-blocks", type=int, default=100)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per side")
    ap.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    ap.add_argument("--quality-requests", type=int, default=400,
                    help="trace requests for the routing-quality table (0 skips it)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    wl = make_workload(args.workers, args.blocks, args.groups, args.prefix_blocks, args.queries, args.seed)
    print(
        f"workload: {args.workers} workers, {wl.total_blocks:,} stored blocks, {len(wl.stored):,} stored "
        f"events, {len(wl.removed):,} removed events, {len(wl.queries):,} queries "
        f"({time.perf_counter() - t0:.1f} s to build); {args.rounds} rounds"
    )
    sides: list[Side] = [TandemSide(wl)]
    try:
        sides.append(DynamoSide(wl))
        dynamo_note = "ai-dynamo-runtime RadixTree"
    except ImportError as exc:
        dynamo_note = f"NOT MEASURED: ai-dynamo-runtime cannot be imported ({exc}); pip install '.[bench]'"
        print(f"Dynamo: {dynamo_note}")
    stats, answers = measure(sides, wl, args.rounds)
    tandem, dynamo = stats[TandemSide.name], stats.get(DynamoSide.name)
    mismatches = None
    if dynamo is not None:
        mismatches = sum(
            a != b for a, b in zip(answers[TandemSide.name], answers[DynamoSide.name], strict=True)
        )

    print(f"\n{'metric':<34}{'Tandem KvIndex':>16}{'Dynamo RadixTree':>18}{'Tandem/Dynamo':>15}{'Tandem':>8}")
    wins = {}
    for key, label, higher in ROWS:
        d = dynamo[key] if dynamo else None
        ratio, verdict = "", ""
        if d is not None:
            wins[key] = tandem[key] >= d if higher else tandem[key] <= d
            ratio, verdict = f"{tandem[key] / d:.2f}x", "better" if wins[key] else "worse"
        fmt = (lambda v: f"{v / 1e6:.2f} M") if "_per_" in key else (lambda v: f"{v:.1f}")
        shown = fmt(d) if d is not None else "n/a"
        print(f"{label:<34}{fmt(tandem[key]):>16}{shown:>18}{ratio:>15}{verdict:>8}")
    if mismatches is not None:
        print(f"\nanswers compared: {2 * len(wl.queries)} queries, {mismatches} differ")
    quality = routing_quality(args.quality_requests) if args.quality_requests else None
    result = {
        "routing_quality": quality,
        "config": vars(args) | {"stored_blocks": wl.total_blocks},
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "tandem": tandem,
        "dynamo": dynamo,
        "dynamo_note": dynamo_note,
        "ratios_tandem_over_dynamo": {k: tandem[k] / dynamo[k] for k, _, _ in ROWS} if dynamo else None,
        "answers_differing": mismatches,
        "tandem_at_least_as_good": wins or None,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if mismatches else 0


TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake-synthetic.jsonl"
QUALITY_SPEC = Path(__file__).resolve().parents[1] / "deploy" / "b300-v4-flash.yaml"


def routing_quality(requests: int) -> list[dict] | None:
    """Hit rate and TTFT per policy from the planner's simulator (the real KvIndex and policies in
    the loop) on the first `requests` of the shared Mooncake trace, on the B300 V4-Flash spec."""
    if not TRACE.is_file():
        print(f"\nrouting quality: trace {TRACE} not found; table skipped")
        return None
    cmd = [sys.executable, "-P", "-m", "orchestrator.cli", "simulate", "--trace", str(TRACE), "--spec",
           str(QUALITY_SPEC), "--model", "v4-flash", "--limit", str(requests), "--json"]
    for policy in ("kv", "round-robin", "sglang", "dynamo"):
        cmd += ["--policy", policy]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"\nrouting quality: planner simulator, first {requests} requests of {TRACE.name}, {QUALITY_SPEC.name}")
    print(f"{'policy':<14}{'hit rate':>10}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'TPOT p99 s':>12}{'goodput rps':>13}")
    for r in rows:
        print(f"{r['policy']:<14}{r['hit_rate']:>10.3f}{r['ttft_p50']:>12.3f}{r['ttft_p99']:>12.3f}"
              f"{r['tpot_p99']:>12.4f}{r['goodput_rps']:>13.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
