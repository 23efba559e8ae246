"""The decode worker: a Ray actor per rank that streams tokens in one batched message per step.

Requests arrive two ways: with a `PrefillResult` (disaggregated: the KV is pulled from the
prefill by its handoff descriptor, then the request continues after its first token) or without
(the decode prefills the prompt itself: the AGGREGATED mode, and conditional disaggregation).
A handoff that cannot be pulled (lease expired, prefill gone) is recomputed here, not failed.
Streams: `stream()` yields every StepBatch of the rank (the router's single subscription);
`generate(requests)` submits and yields the StepBatches of just those requests until they end.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import ray

from tandem.request import GenerationRequest
from tandem.stream import PrefillResult, StepBatch
from tandem.v1 import worker_pb2
from workers.actor_common import WorkerConfig, actor_name, build_rank
from workers.engine.engine import Role
from workers.engine.handoff import SequenceKv
from workers.rank_actor import RankActor

log = logging.getLogger(__name__)


class HandoffPuller(Protocol):
    """Gets a prefilled prompt's state for a handoff descriptor; None when it cannot (recompute)."""

    async def pull(self, desc: worker_pb2.HandoffDescriptor) -> SequenceKv | None: ...


class RayObjectPuller:
    """Pulls through the Ray object store from the prefill actor named by the descriptor."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace

    async def pull(self, desc: worker_pb2.HandoffDescriptor) -> SequenceKv | None:
        name = actor_name(desc.prefill.instance, desc.prefill.dp_rank)
        try:
            prefill = ray.get_actor(name, namespace=self.namespace)
            return await prefill.take_handoff.remote(desc.request_id)
        except (ValueError, KeyError, ray.exceptions.RayError) as exc:
            # Expired, cancelled or gone: the design's fallback is to recompute, and we say so.
            log.warning("handoff of %s from %s failed (%s): recomputing its prompt",
                        desc.request_id, name, exc)
            return None


class DecodeWorker(RankActor):
    """One decode (or aggregated) rank. Async actor: every method is a coroutine."""

    def __init__(self, config: WorkerConfig, puller: HandoffPuller | None = None) -> None:
        if config.role is Role.PREFILL:
            raise ValueError(f"DecodeWorker {config.name}: role must be DECODE or AGGREGATED")
        self.config = config
        self._built = build_rank(config)
        self._puller = puller if puller is not None else RayObjectPuller()

    async def submit(self, request: GenerationRequest, prefilled: PrefillResult | None = None) -> None:
        """Queue a request; its deltas go out in this rank's StepBatches."""
        self._accepting(request.request_id)
        loop = self._started()
        engine = self._built.engine
        if prefilled is None:
            await loop.call(engine.add, request)
            return
        if prefilled.handoff is None:
            raise ValueError(f"submit({request.request_id!r}): the prefill already finished this request")
        desc = worker_pb2.HandoffDescriptor.FromString(prefilled.handoff)
        kv = await self._puller.pull(desc)
        await loop.call(engine.add_prefilled, request, desc.first_token, kv)

    async def resume(self, request: GenerationRequest, generated: Sequence[int]) -> None:
        """Continue a request migrated from a failed worker after the tokens it already streamed."""
        self._accepting(request.request_id)
        await self._started().call(self._built.engine.add_resumed, request, tuple(generated))

    async def generate(self, requests: Sequence[GenerationRequest],
                       prefilled: Sequence[PrefillResult | None] | None = None) -> AsyncIterator[StepBatch]:
        """Submit `requests` and yield, per step, a StepBatch of their deltas until all have ended."""
        loop = self._started()
        pre = list(prefilled) if prefilled is not None else [None] * len(requests)
        if len(pre) != len(requests):
            raise ValueError(f"generate: {len(pre)} prefill results for {len(requests)} requests")
        open_ids = {r.request_id for r in requests}
        sub = loop.subscribe()  # before anything is queued, so no delta is missed
        try:
            for r, p in zip(requests, pre, strict=True):
                await self.submit(r, p)
            while open_ids:
                batch = await sub.get()
                mine = tuple(d for d in batch.deltas if d.request_id in open_ids)
                open_ids -= {d.request_id for d in mine if d.finish is not None}
                if mine:
                    yield StepBatch(batch.worker, batch.step, mine)
        finally:
            sub.close()


DecodeActor = ray.remote(DecodeWorker)
