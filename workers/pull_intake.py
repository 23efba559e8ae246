"""A handed-off request taken into a decode engine with its KV pulled over NIXL, in three phases,
so that the rank keeps stepping its running requests while the READ is in flight:

    reserve   EngineLoop.call (engine lock): `Engine.begin_pull` admits the sequence through the
              prefix cache for prompt + max_tokens (AdmissionRefused: nothing held, the caller
              recomputes), `DecodeTransfer.reserve` takes the blocks held by hash, allocates the
              rest and names the pages. None is registered in the prefix cache, none evictable.
    read      on this intake's own pull thread, NOT under the engine lock: claim, READ, epoch
              check, release, with the transfer's own deadline (a failure answers "not filled").
    commit    EngineLoop.call: `Engine.end_pull`: filled -> adopt (the pulled blocks' KV events
              go out now) and join the batch; not filled -> free and recompute; cancelled
              meanwhile -> free.

Every reserved page is released exactly once: by `end_pull` (filled or not, cancelled or not) or,
when the read itself raised, by `abandon_pull`. The three phases run as one task of their own,
shielded from the caller: an actor call cancelled mid-pull must not free pages a READ may still
be writing, nor leave a reservation nobody ends. Pulls of one rank run one at a time (its agent
is not thread-safe), on one thread that is not the engine's, so a long READ never takes a thread
a step or an `EngineLoop.call` needs.
`hold_lock=True` runs the three phases in one engine call (`Engine.add_pulled`, steps wait for the
whole pull): the behaviour before this split, kept for bench/pull_interference.py's baseline only.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from tandem.request import GenerationRequest
from workers.engine.engine import Engine
from workers.engine.pulled import PendingPull, PulledKv
from workers.transfer.decode_side import DecodeTransfer
from workers.transfer.handoff import HandoffDescriptor
from workers.transfer.pages import SequencePages
from workers.worker_loop import EngineLoop


class PullIntake:
    """One decode rank's intake of pulled requests (see the module docstring)."""

    def __init__(self, engine: Engine, rank: DecodeTransfer, *, hold_lock: bool = False) -> None:
        self.engine, self.rank, self.hold_lock = engine, rank, hold_lock
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-pull")
        self._pulls: set[asyncio.Task[PulledKv]] = set()  # strong references while they run

    @property
    def in_flight(self) -> int:
        """Requests taken and not yet committed or released."""
        return len(self._pulls)

    async def take(self, loop: EngineLoop, request: GenerationRequest, first_token: int,
                   desc: HandoffDescriptor) -> PulledKv:
        """Queue `request` (prefilled elsewhere, `first_token` sampled there) with its prompt's KV
        pulled by `desc`: filled, or not (named: it is recomputed here). AdmissionRefused, holding
        nothing, when the engine has no room for prompt + max_tokens now."""
        task = asyncio.ensure_future(self._take(loop, request, first_token, desc))
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)
        return await asyncio.shield(task)

    async def _take(self, loop: EngineLoop, request: GenerationRequest, first_token: int,
                    desc: HandoffDescriptor) -> PulledKv:
        engine, rank = self.engine, self.rank
        if self.hold_lock:
            return await loop.call(engine.add_pulled, request, first_token, rank.fill_from(desc))
        pending, pages = await loop.call(self._reserve, request, first_token, desc)
        try:
            got = await asyncio.get_running_loop().run_in_executor(self._thread, rank.read, desc, pages)
        except BaseException:
            await loop.call(engine.abandon_pull, pending)
            raise
        return await loop.call(engine.end_pull, pending, got, rank.adopt)

    def _reserve(self, request: GenerationRequest, first_token: int, desc: HandoffDescriptor
                 ) -> tuple[PendingPull, SequencePages]:
        pending = self.engine.begin_pull(request, first_token)
        try:
            return pending, self.rank.reserve(desc, pending.seq, pending.length)
        except BaseException:
            self.engine.abandon_pull(pending)
            raise

    async def settle(self) -> None:
        """Wait until every pull taken so far is committed or released (their errors are the
        takers'), e.g. before closing the rank."""
        if self._pulls:
            await asyncio.wait(set(self._pulls))

    def close(self) -> None:
        """Stop the pull thread (after the pull it runs, if any)."""
        self._thread.shutdown(wait=True)
