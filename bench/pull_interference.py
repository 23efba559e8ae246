"""Decode TPOT while long prompts are handed off to the same rank: the KV pull under the engine
lock (before) against the pull outside it (after, workers/pull_intake.py), in the same run.

One process, real NIXL over UCX on loopback: a PREFILL engine of the demo model (deploy/models/
tiny-demo) with its `PrefillTransfer` (claims answered by its server thread) and, per run, a fresh
DECODE engine stepped by its `EngineLoop`, pulling through a `PullIntake`. Every handoff's prompt
is prefilled once, before any timing (the prefill's compute is another machine's in a deployment),
and opened again for each run (a fresh handoff epoch over the same held pages).
A run: one running request (short prompt, --new greedy tokens) decodes alone; after its 10th
token, --handoffs requests with --prompt-token prompts are handed to the same rank, one every
--gap-ms (each then decodes one more token and ends). TPOT: the gaps between the running request's
tokens that end while any handoff is being taken (its first take to its last answer); stall: the
largest of them. Rows:
- quiet: no handoffs (the running request's gaps after its 10th token): the floor;
- held-lock: `PullIntake(hold_lock=True)`, the pull inside one engine call (the old behaviour);
- split: the pull outside the lock (the default).
--read-delay-ms adds a test-only delay to every READ at the transport seam (workers/faults.py), to
show a pull as long as a larger model's over a slower link (0: the real loopback READ only).
Modes alternate within each repeat so all see the same machine; gaps are pooled over --repeats.
same_tokens: every request's tokens equal across all runs (greedy).

    python -P bench/pull_interference.py [--handoffs 8] [--prompt 1024] [--new 150] [--gap-ms 25]
        [--read-delay-ms 0 40] [--repeats 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# bench/ holds scripts named like packages: import Tandem's packages from the installed tree.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("UCX_NET_DEVICES", "lo")  # loopback only

import torch  # noqa: E402

from tandem.request import GenerationRequest, SamplingConfig  # noqa: E402
from tandem.tokenizer import ByteTokenizer  # noqa: E402
from workers.engine.engine import Engine, Role  # noqa: E402
from workers.engine.runner import LocalRunner  # noqa: E402
from workers.engine.scheduler import SchedulerConfig  # noqa: E402
from workers.faults import FaultConfig, FaultPick  # noqa: E402
from workers.kv.geometry import KvGeometry  # noqa: E402
from workers.kv.manager import KvCacheManager, KvCapacity  # noqa: E402
from workers.kv.presets import kv_shape  # noqa: E402
from workers.kv.space import PagedKvSpace  # noqa: E402
from workers.model import load  # noqa: E402
from workers.model.model import DeepseekV4  # noqa: E402
from workers.pull_intake import PullIntake  # noqa: E402
from workers.transfer.decode_side import DecodeTransfer  # noqa: E402
from workers.transfer.prefill_side import PrefillTransfer  # noqa: E402
from workers.worker_loop import EngineLoop  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "deploy" / "models" / "tiny-demo"
WARM_TOKENS = 10  # the running request's tokens before the first handoff
TIMEOUT_S = 30.0


class Mode(enum.Enum):
    QUIET = "quiet"  # no handoffs
    HELD_LOCK = "held-lock"  # PullIntake(hold_lock=True): the pull inside one engine call
    SPLIT = "split"  # the pull outside the engine lock


@dataclass(frozen=True)
class Row:
    mode: str  # a Mode's value
    read_delay_ms: float
    gaps: int  # inter-token gaps measured
    tpot_p50_ms: float
    tpot_p99_ms: float
    stall_ms: float  # the largest gap
    pull_p50_ms: float  # claim sent ... release sent, per handoff (0 when quiet)
    tokens_in_window: int  # running request's tokens while handoffs were being taken, per run


@dataclass(frozen=True)
class RunResult:
    gaps: list[float]
    pulls: list[float]
    tokens: dict[str, list[int]]
    in_window: int


class Setup:
    """The model, the prefill side (its prompts prefilled and held), and a decode factory."""

    def __init__(self, handoffs: int, prompt: int, new: int) -> None:
        self.model: DeepseekV4 = load(DEMO, dtype=torch.float32, quant_sim=True, progress=False)
        self.blocks = -(-prompt // 256)
        self.cap = KvCapacity(block_pages=handoffs * self.blocks + 4, window_pages=4 * handoffs + 8,
                              state_pages=handoffs + 2)
        self.prefill = self.engine(Role.PREFILL, "bench-prefill", prefix_caching=False)
        self.ptx = PrefillTransfer("bench-prefill", self.prefill.kv.manager, 600.0, TIMEOUT_S, hugepages=False)
        g = torch.Generator().manual_seed(11)
        sp = SamplingConfig(max_tokens=2, ignore_eos=True)
        self.pulled = [GenerationRequest(f"h{i}", tuple(torch.randint(0, 256, (prompt,), generator=g).tolist()), sp)
                       for i in range(handoffs)]
        self.running = GenerationRequest("running", tuple(range(32, 48)), SamplingConfig(max_tokens=new,
                                                                                          ignore_eos=True))
        self.first: dict[str, int] = {}
        for req in self.pulled:  # prefilled once; each run opens a fresh handoff of the held pages
            self.prefill.add(req)
            while req.request_id not in self.first:
                for d in self.prefill.step().deltas:
                    if d.token_ids:
                        self.first[d.request_id] = d.token_ids[0]
        self._names = itertools.count()

    def engine(self, role: Role, name: str, prefix_caching: bool) -> Engine:
        geom = KvGeometry.of(kv_shape(self.model.cfg, with_mtp=False))
        kv = PagedKvSpace(KvCacheManager(geom, self.cap, name), self.model.cfg.num_layers, self.model.dtype)
        return Engine(role, self.model.cfg, SchedulerConfig(prefix_caching=prefix_caching), kv,
                      LocalRunner(self.model), ByteTokenizer())

    def decode(self, read_delay_s: float) -> tuple[Engine, DecodeTransfer]:
        name = f"bench-decode-{next(self._names)}"
        eng = self.engine(Role.DECODE, name, prefix_caching=True)
        faults = (FaultConfig(delay_reads=FaultPick(probability=1.0), read_delay_s=read_delay_s)
                  if read_delay_s > 0 else None)
        dtx = DecodeTransfer(name, eng.kv.cache, TIMEOUT_S, hugepages=False, faults=faults)
        dtx.pair(self.ptx.info())
        self.ptx.pair(dtx.info())
        return eng, dtx

    def close(self) -> None:
        self.ptx.close()


async def _run(setup: Setup, mode: Mode, read_delay_s: float, gap_s: float) -> RunResult:
    eng, dtx = setup.decode(read_delay_s)
    loop = EngineLoop(eng, None, "bench-decode")
    intake = PullIntake(eng, dtx, hold_lock=mode is Mode.HELD_LOCK)
    stamps: list[float] = []
    tokens: dict[str, list[int]] = {}
    ended: set[str] = set()
    want = {setup.running.request_id} | ({r.request_id for r in setup.pulled} if mode is not Mode.QUIET else set())

    async def follow() -> None:
        sub = loop.subscribe()
        while not want <= ended:
            for d in (await sub.get()).deltas:
                tokens.setdefault(d.request_id, []).extend(d.token_ids)
                if d.request_id == setup.running.request_id and d.token_ids:
                    stamps.append(time.monotonic())
                if d.finish is not None:
                    ended.add(d.request_id)
        sub.close()

    async def hand_off(i: int, req: GenerationRequest) -> float:
        await asyncio.sleep(i * gap_s)
        seq = setup.prefill.handoff_seq(req.request_id)
        desc = setup.ptx.open(req.request_id, seq, len(req.prompt_ids))
        got = await intake.take(loop, req, setup.first[req.request_id], desc)
        if not got.filled:
            raise RuntimeError(f"bench: handoff {req.request_id} was not pulled: {got.error}")
        return got.seconds

    loop.start()
    follower = asyncio.ensure_future(follow())
    try:
        await loop.call(eng.add, setup.running)
        while len(stamps) < WARM_TOKENS:
            await asyncio.sleep(0.001)
        begin = time.monotonic()
        pulls = [] if mode is Mode.QUIET else list(
            await asyncio.gather(*(hand_off(i, r) for i, r in enumerate(setup.pulled))))
        end = time.monotonic() if pulls else float("inf")
        await asyncio.wait_for(follower, 120)
    finally:
        follower.cancel()
        await loop.stop()
        intake.close()
        dtx.close()
    gaps = [b - a for a, b in zip(stamps[WARM_TOKENS - 1:], stamps[WARM_TOKENS:], strict=False) if begin <= b <= end]
    if pulls and stamps[-1] <= end:
        raise RuntimeError("bench: the running request ended before the handoffs did; raise --new")
    return RunResult(gaps, pulls, tokens, sum(begin <= t <= end for t in stamps))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _row(mode: Mode, delay_ms: float, runs: list[RunResult]) -> Row:
    gaps = [g for r in runs for g in r.gaps]
    pulls = [p for r in runs for p in r.pulls]
    return Row(mode.value, delay_ms, len(gaps), 1e3 * statistics.median(gaps), 1e3 * _pct(gaps, 0.99),
               1e3 * max(gaps), 1e3 * statistics.median(pulls) if pulls else 0.0,
               round(statistics.mean(r.in_window for r in runs)) if pulls else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handoffs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens of each handoff")
    parser.add_argument("--new", type=int, default=150, help="tokens of the running request")
    parser.add_argument("--gap-ms", type=float, default=25.0, help="between handoffs")
    parser.add_argument("--read-delay-ms", type=float, nargs="+", default=[0.0, 40.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="write the rows and the settings as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(args.handoffs, args.prompt, args.new)
    try:
        runs: dict[tuple[Mode, float], list[RunResult]] = {}
        for _ in range(args.repeats):
            runs.setdefault((Mode.QUIET, 0.0), []).append(asyncio.run(_run(setup, Mode.QUIET, 0.0, 0.0)))
            for delay_ms in args.read_delay_ms:
                for mode in (Mode.HELD_LOCK, Mode.SPLIT):
                    r = asyncio.run(_run(setup, mode, delay_ms / 1e3, args.gap_ms / 1e3))
                    runs.setdefault((mode, delay_ms), []).append(r)
    finally:
        setup.close()
    rows = [_row(mode, delay, rs) for (mode, delay), rs in runs.items()]
    first_seen: dict[str, list[int]] = {}
    same = all(first_seen.setdefault(k, toks) == toks for rs in runs.values() for r in rs
               for k, toks in r.tokens.items())
    head = f"{'mode':<10} {'read+ms':>7} {'gaps':>5} {'tpot p50':>9} {'tpot p99':>9} {'stall':>8} " \
           f"{'pull p50':>9} {'tok/window':>10}"
    print(f"{args.handoffs} handoffs of {args.prompt} tokens every {args.gap_ms:g} ms beside one running "
          f"request; tiny-demo, NIXL/UCX loopback; {args.repeats} repeats; times in ms")
    print(head)
    for r in rows:
        print(f"{r.mode:<10} {r.read_delay_ms:>7g} {r.gaps:>5} {r.tpot_p50_ms:>9.1f} {r.tpot_p99_ms:>9.1f} "
              f"{r.stall_ms:>8.1f} {r.pull_p50_ms:>9.1f} {r.tokens_in_window:>10}")
    print(f"same_tokens: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "same_tokens": same,
                                               "rows": [asdict(r) for r in rows]}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
