"""How a decode rank gets a prefilled prompt's KV: the NIXL pull (default) or, in tests, Ray's
object store. A puller is built where the actor is created (the controller passes the Ray
namespace in which prefill actors are found), then bound to the decode rank it serves.

`NixlPuller` pairs with a prefill rank the first time a handoff names it: it fetches the rank's
`AgentInfo` by actor call, pairs locally FIRST (a layout mismatch refuses it before anything is
loaded or moved), then asks the prefill to pair back (it must know us to answer our claims).
Every failure before or during the pull ends in a logged, counted recompute, never an error; so
does a decode without room for the request's prompt + max_tokens right now (the recompute waits
in the queue; the prefill's lease frees its pages). The pull itself runs outside the engine lock,
so the rank's running requests keep decoding meanwhile (workers/pull_intake.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import ray

from tandem.request import GenerationRequest
from tandem.v1 import worker_pb2
from workers.actor_common import BuiltRank, HandoffPath, WorkerConfig, actor_name
from workers.engine.handoff import SequenceKv
from workers.engine.pulled import PulledKv
from workers.kv.manager import AdmissionRefused
from workers.kv.space import PagedKvSpace
from workers.pull_intake import PullIntake
from workers.transfer.decode_side import DecodeTransfer
from workers.transfer.layout import LayoutMismatch
from workers.transfer.wire import from_proto, layout_hash
from workers.worker_loop import EngineLoop

log = logging.getLogger(__name__)


class HandoffPuller(Protocol):
    """Queues a request prefilled elsewhere on a decode engine, with its KV or for recompute."""

    path: HandoffPath

    def bind(self, config: WorkerConfig, built: BuiltRank) -> None:
        """Attach to the decode rank this puller serves (once, in the actor's constructor)."""
        ...

    async def take(self, loop: EngineLoop, request: GenerationRequest, desc: worker_pb2.HandoffDescriptor
                   ) -> PulledKv:
        """Queue `request` on the engine; says whether its KV was filled from the handoff (bytes,
        seconds) or why the prompt will be recomputed instead (`error`)."""
        ...


class RayObjectPuller:
    """Tests only (HandoffPath.RAY_OBJECT_STORE): the prefill's state as tensors via Ray."""

    path = HandoffPath.RAY_OBJECT_STORE

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace

    def bind(self, config: WorkerConfig, built: BuiltRank) -> None:
        self._engine = built.engine

    async def _pull(self, desc: worker_pb2.HandoffDescriptor) -> SequenceKv | None:
        name = actor_name(desc.prefill.instance, desc.prefill.dp_rank)
        try:
            prefill = ray.get_actor(name, namespace=self.namespace)
            return await prefill.take_handoff.remote(desc.request_id)
        except (ValueError, KeyError, ray.exceptions.RayError) as exc:
            # Expired, cancelled or gone: the design's fallback is to recompute, and we say so.
            log.warning("handoff of %s from %s failed (%s): recomputing its prompt",
                        desc.request_id, name, exc)
            return None

    async def take(self, loop: EngineLoop, request: GenerationRequest, desc: worker_pb2.HandoffDescriptor
                   ) -> PulledKv:
        kv = await self._pull(desc)
        await loop.call(self._engine.add_prefilled, request, desc.first_token, kv)
        return PulledKv(True) if kv is not None else PulledKv(False, error="handoff expired or prefill gone")


class NixlPuller:
    """The default: pull the prefill's pages over NIXL (see the module docstring)."""

    path = HandoffPath.NIXL

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self._intake: PullIntake | None = None  # holds the rank's DecodeTransfer and engine
        self._meetings: dict[str, asyncio.Future[None]] = {}  # prefill agent -> its pairing

    def bind(self, config: WorkerConfig, built: BuiltRank) -> None:
        kv = built.engine.kv
        if not isinstance(kv, PagedKvSpace):
            raise ValueError(f"NixlPuller for {config.name}: the engine's KV is {type(kv).__name__}, "
                             "not the paged pools NIXL pulls into")
        rank = DecodeTransfer(config.name, kv.cache, config.handoff_timeout_s, faults=config.faults)
        self._intake = PullIntake(built.engine, rank)

    @property
    def intake(self) -> PullIntake:
        if self._intake is None:
            raise RuntimeError("NixlPuller is not bound to a decode rank")
        return self._intake

    @property
    def transfer(self) -> DecodeTransfer:
        return self.intake.rank

    async def _meet(self, desc: worker_pb2.HandoffDescriptor) -> None:
        """Pair with the prefill rank that `desc` names, both ways, once. Concurrent handoffs from a
        new prefill wait for the same meeting: a claim sent before the prefill paired back would go
        unanswered until the pull's timeout. A failed meeting is tried again by the next handoff."""
        name = desc.agent_name
        task = self._meetings.get(name)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.ensure_future(self._pair_both(desc))
            self._meetings[name] = task
        await asyncio.shield(task)

    async def _pair_both(self, desc: worker_pb2.HandoffDescriptor) -> None:
        rank = self.transfer
        name = actor_name(desc.prefill.instance, desc.prefill.dp_rank)
        prefill = ray.get_actor(name, namespace=self.namespace)
        info = await prefill.agent_info.remote()
        if info.name != desc.agent_name:
            raise ValueError(f"handoff of {desc.request_id!r} names agent {desc.agent_name!r}, "
                             f"its prefill actor's agent is {info.name!r}")
        # LayoutMismatch here: nothing loaded, nothing moved. The rank's transfer lock serialises it
        # with pulls; it touches no engine state, so the engine lock is not held (steps go on).
        await asyncio.to_thread(rank.pair, info)
        await prefill.pair.remote(rank.info())

    async def take(self, loop: EngineLoop, request: GenerationRequest, desc: worker_pb2.HandoffDescriptor
                   ) -> PulledKv:
        intake = self.intake
        rank = intake.rank
        try:
            if desc.layout_hash != layout_hash(rank.agent.layout.digest):
                raise LayoutMismatch(f"handoff of {desc.request_id!r}: layout hash {desc.layout_hash:#x} "
                                     f"is not ours ({rank.agent.layout.digest})")
            pulled = from_proto(desc, rank.manager.window_tokens)
            await self._meet(desc)
        except (ValueError, KeyError, ray.exceptions.RayError) as exc:  # LayoutMismatch is a ValueError
            return await self._recompute(loop, request, desc, exc)
        try:
            return await intake.take(loop, request, desc.first_token, pulled)
        except AdmissionRefused as exc:  # no room for prompt + max_tokens now: queue it to recompute
            return await self._recompute(loop, request, desc, exc)

    async def _recompute(self, loop: EngineLoop, request: GenerationRequest,
                         desc: worker_pb2.HandoffDescriptor, exc: Exception) -> PulledKv:
        """Count and log the failed pull, and queue `request` to recompute its prompt."""
        why = f"{type(exc).__name__}: {exc}"
        await loop.call(self.transfer.recompute, desc.request_id, why)
        await loop.call(self.intake.engine.add_prefilled, request, desc.first_token, None)
        return PulledKv(False, error=why)
