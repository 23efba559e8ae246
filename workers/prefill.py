"""The prefill worker: a Ray actor per rank that turns prompts into a first token plus a handoff.

`prefill(request)` queues the prompt (chunked prefill under the token budget, batched with other
prompts), waits for its first token and answers a `tandem.stream.PrefillResult`. Unless the request
ended there (max_tokens 1, EOS, a stop), its prompt state stays held under a lease of
`handoff_lease_s`: a decode takes it (`take_handoff`, through the Ray object store; the NIXL path
of workers/transfer/ reads the same state page by page) or releases it; an expired lease frees it.
"""

from __future__ import annotations

import time

import ray

from tandem.request import GenerationRequest
from tandem.stream import PrefillResult
from workers.actor_common import WorkerConfig, build_rank, handoff_descriptor
from workers.engine.engine import Role
from workers.engine.handoff import SequenceKv
from workers.rank_actor import RankActor


class PrefillWorker(RankActor):
    """One prefill rank (see the module docstring). Async actor: every method is a coroutine."""

    def __init__(self, config: WorkerConfig) -> None:
        if config.role is not Role.PREFILL:
            raise ValueError(f"PrefillWorker {config.name}: role must be PREFILL, got {config.role.name}")
        self.config = config
        self._built = build_rank(config)
        self._leases: dict[str, float] = {}  # request id -> monotonic deadline
        self._epoch = 0

    async def prefill(self, request: GenerationRequest) -> PrefillResult:
        """Prefill `request`; its first token, and the handoff unless it already ended."""
        self._accepting(request.request_id)
        loop = self._started()
        engine = self._built.engine
        first = loop.first_token(request.request_id)
        await loop.call(engine.add, request)
        delta = await first
        if delta.finish is not None:
            s = delta.summary
            return PrefillResult(request.request_id, delta, None, s.queue_s, s.prefill_s, s.cached_tokens)
        self._epoch += 1
        self._leases[request.request_id] = time.monotonic() + self.config.handoff_lease_s
        desc = handoff_descriptor(self.config, request, delta.token_ids[0], self._epoch)
        queue_s, prefill_s = await loop.call(engine.handoff_timing, request.request_id)
        return PrefillResult(request.request_id, delta, desc.SerializeToString(), queue_s, prefill_s, 0)

    async def take_handoff(self, request_id: str) -> SequenceKv:
        """The held prompt state of `request_id`, freed here; KeyError when expired or unknown."""
        self._leases.pop(request_id, None)
        return await self._started().call(self._built.engine.take_handoff, request_id)

    async def release_handoff(self, request_id: str) -> None:
        """Free a held prompt state without sending it."""
        self._leases.pop(request_id, None)
        await self._started().call(self._built.engine.release_handoff, request_id)

    async def handoffs_held(self) -> int:
        """Prompt states held for decodes right now."""
        return (await self._started().call(self._built.engine.stats)).handoffs_held

    async def cancel(self, request_id: str) -> bool:
        self._leases.pop(request_id, None)
        return await super().cancel(request_id)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for rid in [r for r, t in self._leases.items() if t <= now]:
            del self._leases[rid]
            self._built.engine.release_handoff(rid)


PrefillActor = ray.remote(PrefillWorker)
