"""The prefill worker: a Ray actor per rank that turns prompts into a first token plus a handoff.

`prefill(request)` queues the prompt (chunked prefill under the token budget, batched with other
prompts), waits for its first token and answers a `tandem.stream.PrefillResult`. A request that
ended there (max_tokens 1, EOS, a stop) has freed its pages already and gets no handoff.
Otherwise its pages stay held for a decode:
  - NIXL (the default, `HandoffPath.NIXL`): the rank's `PrefillTransfer` opens a handoff (agent,
    epoch, pages per pool, lease) whose descriptor goes back in the result; the decode claims,
    READs and releases over NIXL; the table's frees (release, lease or pin expiry) are applied by
    the loop's housekeeping. Decodes pair through `agent_info` / `pair`.
  - RAY_OBJECT_STORE (tests only): a decode takes the state as tensors (`take_handoff`) or
    releases it; an expired lease frees it.
"""

from __future__ import annotations

import time

import ray

from tandem.request import GenerationRequest
from tandem.stream import PrefillResult
from tandem.tracing import Stage
from workers.actor_common import HandoffPath, WorkerConfig, build_rank, handoff_descriptor
from workers.engine.engine import Role
from workers.engine.handoff import SequenceKv
from workers.kv.space import PagedKvSpace
from workers.rank_actor import RankActor
from workers.transfer.agent import AgentInfo
from workers.transfer.prefill_side import PrefillTransfer
from workers.transfer.wire import fill_proto


class PrefillWorker(RankActor):
    """One prefill rank (see the module docstring). Async actor: every method is a coroutine."""

    def __init__(self, config: WorkerConfig) -> None:
        if config.role is not Role.PREFILL:
            raise ValueError(f"PrefillWorker {config.name}: role must be PREFILL, got {config.role.name}")
        self.config = config
        self._built = build_rank(config)
        self._leases: dict[str, float] = {}  # request id -> monotonic deadline (object-store mode)
        self._epoch = 0
        self._transfer: PrefillTransfer | None = None
        if config.handoff is HandoffPath.NIXL:
            kv = self._built.engine.kv
            assert isinstance(kv, PagedKvSpace)  # WorkerConfig checked kv is PagedPoolsConfig
            self._transfer = PrefillTransfer(config.name, kv.manager, config.handoff_lease_s,
                                             config.handoff_timeout_s)

    def _nixl(self) -> PrefillTransfer:
        if self._transfer is None:
            raise RuntimeError(f"{self.config.name}: handoff is {self.config.handoff.name}, not NIXL")
        return self._transfer

    async def agent_info(self) -> AgentInfo:
        """This rank's NIXL agent info (metadata, layout, pool regions), for decodes to pair."""
        return self._nixl().info()

    async def pair(self, peer: AgentInfo) -> None:
        """Meet a decode rank (so its claims can be answered); LayoutMismatch refuses it."""
        self._nixl().pair(peer)

    async def prefill(self, request: GenerationRequest) -> PrefillResult:
        """Prefill `request`; its first token, and the handoff unless it already ended."""
        self._accepting(request.request_id)
        tracer, rid = self.tracer, request.request_id
        tracer.begin(request.trace_id, rid, prompt_tokens=len(request.prompt_ids))
        try:
            result = await self._prefill(request)
        except BaseException as exc:  # the request did not get through here: say so under its trace
            tracer.end(rid, Stage.ABORTED, error=type(exc).__name__)
            raise
        if result.handoff is not None:  # an ending here (EOS, max_tokens 1) is logged by the watcher
            tracer.end(rid, Stage.PREFILL_DONE, queue_s=result.queue_s, prefill_s=result.prefill_s,
                       cached_tokens=result.cached_tokens)
        return result

    async def _prefill(self, request: GenerationRequest) -> PrefillResult:
        loop = self._started()
        engine = self._built.engine
        first = loop.first_token(request.request_id)
        await loop.call(engine.add, request)
        delta = await first
        if delta.finish is not None:
            s = delta.summary
            return PrefillResult(request.request_id, delta, None, s.queue_s, s.prefill_s, s.cached_tokens)
        # Timing first: once the handoff is open, a short lease may free it before we could read it.
        queue_s, prefill_s, cached = await loop.call(engine.handoff_timing, request.request_id)
        self._epoch += 1
        desc = handoff_descriptor(self.config, request, delta.token_ids[0], self._epoch)
        if self._transfer is None:
            self._leases[request.request_id] = time.monotonic() + self.config.handoff_lease_s
        else:
            transfer, rid, n = self._transfer, request.request_id, len(request.prompt_ids)
            try:
                opened = await loop.call(lambda: transfer.open(rid, engine.handoff_seq(rid), n))
            except BaseException:  # no handoff opened (or the call was cancelled): nothing would free it
                await loop.call(self._release_unopened, rid)
                raise
            fill_proto(desc, opened, transfer.agent.layout.digest)
        return PrefillResult(request.request_id, delta, desc.SerializeToString(), queue_s, prefill_s, cached)

    async def take_handoff(self, request_id: str) -> SequenceKv:
        """Object-store mode: the held prompt state of `request_id`, freed here; KeyError when
        expired or unknown. Refused in NIXL mode (no KV goes through Ray there)."""
        if self._transfer is not None:
            raise RuntimeError(f"{self.config.name}: take_handoff({request_id!r}) refused: "
                               "KV moves over NIXL")
        self._leases.pop(request_id, None)
        return await self._started().call(self._built.engine.take_handoff, request_id)

    async def release_handoff(self, request_id: str) -> None:
        """Object-store mode: free a held prompt state without sending it."""
        if self._transfer is not None:
            raise RuntimeError(f"{self.config.name}: release_handoff({request_id!r}): NIXL handoffs end by "
                               "the decode's release or the lease")
        self._leases.pop(request_id, None)
        await self._started().call(self._built.engine.release_handoff, request_id)

    async def handoffs_held(self) -> int:
        """Prompt states held for decodes right now."""
        return (await self._started().call(self._built.engine.stats)).handoffs_held

    async def transfer_metric(self, name: str) -> float:
        """A sample of this rank's transfer metrics (e.g. 'kv_lease_expiries_total')."""
        return self._nixl().metrics.value(name)

    async def cancel(self, request_id: str) -> bool:
        """End a request. A NIXL handoff already handed out keeps its pages until the decode
        releases it or its lease ends (a READ may be in flight); it reports True."""
        self._leases.pop(request_id, None)
        if self._transfer is not None and self._transfer.is_live(request_id):
            return True
        return await super().cancel(request_id)

    def _release_unopened(self, request_id: str) -> None:
        assert self._transfer is not None
        if self._built.engine.holds_handoff(request_id) and not self._transfer.is_live(request_id):
            self._built.engine.release_handoff(request_id)

    def _housekeeping(self) -> None:
        engine = self._built.engine
        if self._transfer is not None:
            for rid in self._transfer.take_freed():
                if engine.holds_handoff(rid):
                    engine.release_handoff(rid)
            return
        now = time.monotonic()
        for rid in [r for r, t in self._leases.items() if t <= now]:
            del self._leases[rid]
            self._built.engine.release_handoff(rid)


PrefillActor = ray.remote(PrefillWorker)
