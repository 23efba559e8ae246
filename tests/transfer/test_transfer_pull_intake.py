"""A pulled request's READ runs outside the decode engine's lock (workers/pull_intake.py).

Real engines of the tiny model in one process, two NIXL agents over UCX on loopback: a PREFILL
engine with its `PrefillTransfer` (server thread) hands prompts to a DECODE engine stepped by its
`EngineLoop`; the decode's READ is delayed, failed or hung by the test-only fault plan
(workers/faults.py) at the transport seam. References: an AGGREGATED engine runs the same requests
itself (greedy: tokens compared exactly). Checked:
- while a READ is held in flight, a request already running on the decode keeps producing tokens
  (and, as a control, does not when the pull holds the engine lock, the old behaviour);
- a failed or hung (past its deadline) READ releases every reserved page at the pull's end and the
  prompt is recomputed with the reference's tokens;
- a cancel while the READ is in flight ends the stream at once, releases the pages once the READ
  ends, and no KV event names the uncommitted blocks (a committed pull's blocks are reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import torch
from engine_util import paged_engine, prefill_for_handoff, prompt_of, run

from tandem.blocks import block_hashes
from tandem.request import GenerationRequest, SamplingConfig
from tandem.stream import Finish
from workers.engine.engine import Role
from workers.faults import FaultConfig, FaultPick
from workers.kv.events import KvEvent, KvStored
from workers.kv.geometry import PoolKind
from workers.kv.manager import KvCacheManager
from workers.model.init import init_random
from workers.model.model import DeepseekV4
from workers.model.presets import tiny
from workers.pull_intake import PullIntake
from workers.transfer.decode_side import DecodeTransfer
from workers.transfer.handoff import HandoffDescriptor
from workers.transfer.prefill_side import PrefillTransfer
from workers.worker_loop import EngineLoop

pytestmark = pytest.mark.transfer

torch.set_num_threads(1)

READ_DELAY_S = 0.6
PULLED_LEN = 1000  # 4 block pages, 3 of them full blocks (registered when committed)
_names = itertools.count()


@pytest.fixture(scope="module")
def model() -> DeepseekV4:
    return init_random(DeepseekV4(tiny(), quant_sim=True, with_mtp=False), seed=0).eval()


class Reference:
    """Tokens of requests run by AGGREGATED engines of the same model, scheduled like the path under
    test: like the prefill (a pulled prompt), or like the decode's prefix-caching scheduler (a
    recomputed one: its chunks end at block ends). Each request runs once per module."""

    def __init__(self, model: DeepseekV4) -> None:
        self._engines = {pc: paged_engine(model, Role.AGGREGATED, f"agg{int(pc)}", pc) for pc in (False, True)}
        self._done: dict[tuple[GenerationRequest, bool], list[int]] = {}

    def tokens(self, req: GenerationRequest, prefix_caching: bool = False) -> list[int]:
        key = (req, prefix_caching)
        if key not in self._done:
            engine = self._engines[prefix_caching]
            engine.add(req)
            self._done[key] = run(engine)[req.request_id][0]
        return self._done[key]


@pytest.fixture(scope="module")
def reference(model: DeepseekV4) -> Reference:
    return Reference(model)


class Rig:
    """A prefill engine and a prefix-caching decode engine, their transfers paired both ways;
    the decode's READs are faulted by `faults`."""

    def __init__(self, model: DeepseekV4, faults: FaultConfig, timeout_s: float = 20.0) -> None:
        n = next(_names)
        self.pre = paged_engine(model, Role.PREFILL, f"ip{n}")
        self.dec = paged_engine(model, Role.DECODE, f"id{n}", prefix_caching=True)
        self.ptx = PrefillTransfer(f"ip{n}", self.pre.kv.manager, 30.0, 30.0, hugepages=False)
        self.dtx = DecodeTransfer(f"id{n}", self.dec.kv.cache, timeout_s, hugepages=False, faults=faults)
        self.dtx.pair(self.ptx.info())
        self.ptx.pair(self.dtx.info())

    @property
    def reads(self) -> int:
        """READs the decode prepared so far (the faulty transport counts them)."""
        hooks = self.dtx.fault_hooks
        assert hooks is not None
        return hooks.reads

    def prefill(self, req: GenerationRequest) -> tuple[int, HandoffDescriptor]:
        return prefill_for_handoff(self.pre, self.ptx, req)

    async def read_posted(self) -> None:
        """Until the decode has prepared (and then posts) a READ: a pull is in flight."""
        while self.reads == 0:
            await asyncio.sleep(0.001)

    @contextlib.asynccontextmanager
    async def serving(self, request_ids: set[str], hold_lock: bool = False
                      ) -> AsyncIterator[tuple[EngineLoop, PullIntake, Stream, asyncio.Future]]:
        """The decode's engine loop running, a PullIntake on it, and a Stream following
        `request_ids` (its `follow` task); all stopped on the way out."""
        loop = EngineLoop(self.dec, None, "decode")
        loop.start()
        intake = PullIntake(self.dec, self.dtx, hold_lock=hold_lock)
        stream = Stream()
        follower = asyncio.ensure_future(stream.follow(loop, request_ids))
        try:
            yield loop, intake, stream, follower
        finally:
            follower.cancel()
            await loop.stop()
            intake.close()

    def close(self) -> None:
        self.ptx.close()
        self.dtx.close()


def _sampling(max_tokens: int) -> SamplingConfig:
    return SamplingConfig(max_tokens=max_tokens, ignore_eos=True)  # greedy


def _pools_idle(m: KvCacheManager) -> bool:
    """Every page of every pool is free or cached-and-evictable: nothing is held."""
    evictable = {PoolKind.BLOCK: m.prefix.evictable_blocks, PoolKind.WINDOW: m.prefix.evictable_windows,
                 PoolKind.STATE: 0}
    return all(m.allocators[p].num_free + evictable[p] == m.allocators[p].num_pages for p in PoolKind)


def _stored(events: tuple[KvEvent, ...]) -> set[int]:
    return {h for e in events if isinstance(e.body, KvStored) for h in e.body.block_hashes}


@dataclass
class Stream:
    """Every delta of the decode loop, per request, with the arrival time of each token delta."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    stamps: dict[str, list[float]] = field(default_factory=dict)
    finish: dict[str, Finish] = field(default_factory=dict)

    async def follow(self, loop: EngineLoop, until: set[str]) -> None:
        sub = loop.subscribe()
        try:
            while not until <= set(self.finish):
                for d in (await sub.get()).deltas:
                    self.tokens.setdefault(d.request_id, []).extend(d.token_ids)
                    if d.token_ids:
                        self.stamps.setdefault(d.request_id, []).append(time.monotonic())
                    if d.finish is not None:
                        self.finish[d.request_id] = d.finish
        finally:
            sub.close()

    async def wait_tokens(self, rid: str, n: int) -> None:
        while len(self.tokens.get(rid, ())) < n:
            await asyncio.sleep(0.005)


async def _pull_beside_a_running_request(rig: Rig, running: GenerationRequest, pulled: GenerationRequest,
                                         first: int, desc: HandoffDescriptor, hold_lock: bool
                                         ) -> tuple[Stream, int, object]:
    """Run `running` on the decode, then take `pulled` through a PullIntake; returns the stream, the
    running request's tokens that arrived while the READ was in flight, and the take's answer."""
    async with rig.serving({running.request_id, pulled.request_id}, hold_lock) as (loop, intake, stream, follower):
        await loop.call(rig.dec.add, running)
        await stream.wait_tokens(running.request_id, 3)
        take = asyncio.ensure_future(intake.take(loop, pulled, first, desc))
        await rig.read_posted()
        began = time.monotonic()
        got = await take
        ended = time.monotonic()
        await asyncio.wait_for(follower, 60)
    during = sum(began <= t <= ended for t in stream.stamps[running.request_id])
    return stream, during, got


@pytest.mark.parametrize("hold_lock", [False, True], ids=["split", "held-lock-control"])
def test_a_running_request_keeps_decoding_while_a_pull_is_in_flight(
        model: DeepseekV4, reference: Reference, hold_lock: bool) -> None:
    rig = Rig(model, FaultConfig(delay_reads=FaultPick(count=1), read_delay_s=READ_DELAY_S))
    try:
        running = GenerationRequest("running", prompt_of(20, seed=1), _sampling(120))
        pulled = GenerationRequest("pulled", prompt_of(PULLED_LEN, seed=2), _sampling(12))
        first, desc = rig.prefill(pulled)
        rig.dec.kv.flush_events()
        stream, during, got = asyncio.run(
            _pull_beside_a_running_request(rig, running, pulled, first, desc, hold_lock))
        assert got.filled and got.seconds >= READ_DELAY_S
        if hold_lock:  # the old behaviour: every step waits for the whole pull
            assert during <= 1, during
        else:  # at ~13 ms a step, a 0.6 s READ leaves room for dozens; several is the claim (3: still
            assert during >= 3, during  # true at 200 ms a step, on a machine loaded by other jobs)
        assert stream.tokens["running"] == reference.tokens(running)
        assert [first, *stream.tokens["pulled"]] == reference.tokens(pulled)
        assert stream.finish == {"running": Finish.LENGTH, "pulled": Finish.LENGTH}
        assert rig.dec.stats().prefill_tokens == 20  # the running prompt only: nothing recomputed
        full = block_hashes(list(pulled.prompt_ids), salt=None)[: PULLED_LEN // 256]
        assert set(full) <= _stored(rig.dec.kv.flush_events())  # committed: its blocks reported
        assert rig.dec.kv.blocks_used == 0 and _pools_idle(rig.dec.kv.manager)
    finally:
        rig.close()


@pytest.mark.parametrize(("faults", "timeout_s"), [
    (FaultConfig(fail_reads=FaultPick(count=1)), 20.0),
    # done only 5 s after landing, past the 0.4 s deadline: a hung transfer
    (FaultConfig(delay_reads=FaultPick(count=1), read_delay_s=5.0), 0.4),
], ids=["failed", "hung-past-deadline"])
def test_a_failed_or_hung_read_releases_its_pages_and_recomputes(
        model: DeepseekV4, reference: Reference, faults: FaultConfig, timeout_s: float) -> None:
    rig = Rig(model, faults, timeout_s)
    try:
        req = GenerationRequest("r", prompt_of(600, seed=3), _sampling(6))
        first, desc = rig.prefill(req)
        dec = rig.dec
        before = dec.kv.blocks_used
        pending = dec.begin_pull(req, first)  # phase 1 (what PullIntake runs under the engine lock)
        pages = rig.dtx.reserve(desc, pending.seq, pending.length)
        assert dec.kv.blocks_used == before + 3  # ceil(600 / 256) pages reserved for the READ
        got = rig.dtx.read(desc, pages)  # phase 2
        assert not got.filled and ("TransferFailed" in (got.error or ""))
        assert dec.end_pull(pending, got, rig.dtx.adopt) is got  # phase 3: released, queued to recompute
        assert dec.kv.blocks_used == before and dec.scheduler.waiting[0].request_id == "r"
        toks, summary = run(dec)["r"]
        assert [first, *toks] == reference.tokens(req, prefix_caching=True)
        assert summary.kv_transfer_bytes == 0 and dec.stats().prefill_tokens == 601
        assert rig.dtx.metrics.value("kv_transfer_failures_total") == 1
        assert dec.kv.blocks_used == 0 and _pools_idle(dec.kv.manager)
    finally:
        rig.close()


async def _cancel_during_the_read(rig: Rig, req: GenerationRequest, first: int, desc: HandoffDescriptor
                                  ) -> tuple[Stream, int, int, object]:
    async with rig.serving({req.request_id}) as (loop, intake, stream, follower):
        take = asyncio.ensure_future(intake.take(loop, req, first, desc))
        await rig.read_posted()
        in_flight = rig.dec.kv.blocks_used
        # a pull in flight counts as running in the rank's stats: the router sees its slot taken
        assert (await loop.call(rig.dec.stats)).running == 1
        assert await loop.call(rig.dec.cancel, req.request_id)
        await asyncio.wait_for(follower, 10)  # the stream ended before the READ did
        assert not take.done() and intake.in_flight == 1
        got = await take
    return stream, in_flight, rig.dec.kv.blocks_used, got


def test_a_cancel_during_the_read_releases_once_and_reports_no_block(model: DeepseekV4) -> None:
    rig = Rig(model, FaultConfig(delay_reads=FaultPick(count=1), read_delay_s=READ_DELAY_S))
    try:
        req = GenerationRequest("gone", prompt_of(PULLED_LEN, seed=4), _sampling(8))
        first, desc = rig.prefill(req)
        rig.dec.kv.flush_events()
        stream, in_flight, after, got = asyncio.run(_cancel_during_the_read(rig, req, first, desc))
        assert in_flight == 4 and after == 0  # the 4 reserved pages, then none
        assert stream.finish == {"gone": Finish.CANCELLED} and stream.tokens["gone"] == []
        assert not got.filled and got.error == "cancelled during the pull"
        assert rig.dec.request_ids() == () and not rig.dec.has_work
        hashes = block_hashes(list(req.prompt_ids), salt=None)
        assert not set(hashes) & _stored(rig.dec.kv.flush_events())  # nothing registered
        assert not rig.dec.cancel("gone")  # ended once
        assert _pools_idle(rig.dec.kv.manager) and rig.dec.kv.manager.prefix.evictable_blocks == 0
        # The READ did complete (the pull thread was not abandoned): the transfer counted its bytes.
        assert rig.dtx.records[-1].result is not None
    finally:
        rig.close()


async def _abandon_the_caller_during_the_read(rig: Rig, req: GenerationRequest, first: int,
                                              desc: HandoffDescriptor) -> tuple[int, int, Stream]:
    async with rig.serving({req.request_id}) as (loop, intake, stream, follower):
        take = asyncio.ensure_future(intake.take(loop, req, first, desc))
        await rig.read_posted()
        take.cancel()  # the actor call goes away mid-READ
        with pytest.raises(asyncio.CancelledError):
            await take
        still = rig.dec.kv.blocks_used  # the READ may still write them: not freed
        flying = intake.in_flight
        await intake.settle()
        await asyncio.wait_for(follower, 30)
    return still, flying, stream


def test_a_caller_gone_mid_read_neither_frees_the_pages_early_nor_strands_them(
        model: DeepseekV4, reference: Reference) -> None:
    rig = Rig(model, FaultConfig(delay_reads=FaultPick(count=1), read_delay_s=READ_DELAY_S))
    try:
        req = GenerationRequest("orphan", prompt_of(PULLED_LEN, seed=5), _sampling(4))
        first, desc = rig.prefill(req)
        still, flying, stream = asyncio.run(_abandon_the_caller_during_the_read(rig, req, first, desc))
        assert still == 4 and flying == 1
        # The pull went on to its commit: the request ran with the reference's tokens, then freed all.
        assert [first, *stream.tokens["orphan"]] == reference.tokens(req)
        assert rig.dec.stats().prefill_tokens == 0
        assert rig.dec.kv.blocks_used == 0 and _pools_idle(rig.dec.kv.manager)
    finally:
        rig.close()
