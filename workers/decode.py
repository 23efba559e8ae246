"""The decode worker: a Ray actor per rank that streams tokens in one batched message per step.

Requests arrive two ways: with a `PrefillResult` (disaggregated: the KV is pulled from the
prefill by its handoff descriptor, then the request continues after its first token) or without
(the decode prefills the prompt itself: the AGGREGATED mode, and conditional disaggregation).
The puller (workers/pullers.py) moves the KV: `NixlPuller` by default, over NIXL into this rank's
paged pools; `RayObjectPuller` only when the config says HandoffPath.RAY_OBJECT_STORE (tests).
A handoff that cannot be pulled (lease expired, prefill gone) is recomputed here, not failed.
Streams: `stream()` yields every StepBatch of the rank (the router's single subscription);
`generate(requests)` submits and yields the StepBatches of just those requests until they end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import ray

from tandem.request import GenerationRequest
from tandem.stream import PrefillResult, StepBatch
from tandem.tracing import Stage
from tandem.v1 import worker_pb2
from workers.actor_common import HandoffPath, WorkerConfig, build_rank
from workers.engine.engine import Role
from workers.pullers import HandoffPuller, NixlPuller, RayObjectPuller
from workers.rank_actor import RankActor
from workers.transfer.agent import AgentInfo
from workers.transfer.decode_side import DecodeTransfer

__all__ = ["DecodeActor", "DecodeWorker", "HandoffPuller", "NixlPuller", "RayObjectPuller"]


class DecodeWorker(RankActor):
    """One decode (or aggregated) rank. Async actor: every method is a coroutine."""

    def __init__(self, config: WorkerConfig, puller: HandoffPuller | None = None) -> None:
        if config.role is Role.PREFILL:
            raise ValueError(f"DecodeWorker {config.name}: role must be DECODE or AGGREGATED")
        self.config = config
        self._built = build_rank(config)
        if puller is None:
            puller = NixlPuller() if config.handoff is HandoffPath.NIXL else RayObjectPuller()
        if puller.path is not config.handoff:
            raise ValueError(f"DecodeWorker {config.name}: puller {type(puller).__name__} moves KV by "
                             f"{puller.path.name}, config.handoff is {config.handoff.name}")
        puller.bind(config, self._built)
        self._puller = puller

    async def submit(self, request: GenerationRequest, prefilled: PrefillResult | None = None) -> None:
        """Queue a request; its deltas go out in this rank's StepBatches."""
        self._accepting(request.request_id)
        loop = self._started()
        engine, tracer, rid = self._built.engine, self.tracer, request.request_id
        if prefilled is not None and prefilled.handoff is None:
            raise ValueError(f"submit({rid!r}): the prefill already finished this request")
        tracer.begin(request.trace_id, rid, prompt_tokens=len(request.prompt_ids),
                     max_tokens=request.sampling.max_tokens, kv="handoff" if prefilled else "local")
        try:
            if prefilled is None:
                await loop.call(engine.add, request)
                return
            desc = worker_pb2.HandoffDescriptor.FromString(prefilled.handoff)
            got = await self._puller.take(loop, request, desc)
        except BaseException as exc:  # not queued: nothing else will end its trace
            tracer.end(rid, Stage.ABORTED, error=type(exc).__name__)
            raise
        if got.filled:
            tracer.stage(rid, Stage.HANDOFF_PULLED, bytes=got.nbytes, seconds=got.seconds)
        else:
            tracer.stage(rid, Stage.HANDOFF_RECOMPUTED, error=got.error or "unknown")

    def _add_transfer_totals(self, msg: worker_pb2.WorkerStats) -> None:
        if not isinstance(self._puller, NixlPuller):
            return  # the object-store test path moves no bytes it could count
        m = self._puller.transfer.metrics
        msg.kv_transfer_bytes = int(m.value("kv_transfer_bytes_total"))
        msg.kv_transfer_seconds = m.value("kv_transfer_seconds_sum")
        msg.kv_transfers = int(m.value("kv_transfer_seconds_count"))
        msg.kv_transfer_failures = int(m.value("kv_transfer_failures_total"))

    def _nixl(self) -> DecodeTransfer:
        if not isinstance(self._puller, NixlPuller):
            raise RuntimeError(f"{self.config.name}: handoff is {self.config.handoff.name}, not NIXL")
        return self._puller.transfer

    async def agent_info(self) -> AgentInfo:
        """This rank's NIXL agent info (metadata, layout, pool regions)."""
        return self._nixl().info()

    async def tokens_run(self) -> tuple[int, int]:
        """(prompt or recompute tokens, sampled tokens) this rank's model has run since start."""
        st = await self._started().call(self._built.engine.stats)
        return st.prefill_tokens, st.decode_tokens

    async def transfer_metric(self, name: str) -> float:
        """A sample of this rank's NIXL transfer metrics (e.g. 'kv_transfer_bytes_total')."""
        return self._nixl().metrics.value(name)

    async def pulls(self) -> list[tuple[str, int, int, int, str | None]]:
        """The last NIXL handoffs taken here (at most decode_side.RECORDS_KEPT): (request id, bytes,
        blocks pulled, blocks skipped, error)."""
        return [(r.request_id, r.result.nbytes if r.result else 0, r.result.blocks_pulled if r.result else 0,
                 r.result.blocks_skipped if r.result else 0, r.error) for r in tuple(self._nixl().records)]

    async def resume(self, request: GenerationRequest, generated: Sequence[int]) -> None:
        """Continue a request migrated from a failed worker after the tokens it already streamed."""
        self._accepting(request.request_id)
        loop, tracer = self._started(), self.tracer
        tracer.begin(request.trace_id, request.request_id, prompt_tokens=len(request.prompt_ids),
                     max_tokens=request.sampling.max_tokens, kv="resumed", generated=len(generated))
        try:
            await loop.call(self._built.engine.add_resumed, request, tuple(generated))
        except BaseException as exc:
            tracer.end(request.request_id, Stage.ABORTED, error=type(exc).__name__)
            raise

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
