"""The decode side of the handoff protocol: claim, READ the missing pages, check, release.

`Puller.pull` runs one handoff to completion (or to a typed failure, after which the decode
recomputes the prompt):
  1. CLAIM (request id, epoch) and wait for the answer; EXPIRED -> HandoffExpired, another epoch
     -> EpochMismatch, anything else but GRANTED -> ClaimRefused.
  2. READ, as coalesced descriptors, the block pages the decode's prefix cache does not hold
     (the first `cached_blocks` are skipped) plus the window and state pages.
  3. Check the READ finished before the pin deadline; the deadline is counted from when the claim
     was SENT, so it ends no later than the prefill's own (which starts when the claim arrives).
     A READ that ends later may have raced with a pin expiry: HandoffExpired, bytes not trusted.
  4. RELEASE (also after a failed READ, so the prefill frees at once rather than at pin expiry).
Every wait is bounded by `timeout_s`. After any failure the local pages hold garbage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.kv.geometry import PoolKind
from workers.transfer.descriptors import PoolPull, ReadPlan, plan_read
from workers.transfer.handoff import ClaimAnswer, ClaimOutcome, HandoffDescriptor, HandoffPages
from workers.transfer.messages import Claim, Inbox, Release
from workers.transfer.metrics import TransferMetrics
from workers.transfer.transport import TransferFailed, Transport, wait

# Waiting for the claim's answer sleeps this long between polls rather than spinning: on a few
# shared cores a spinning waiter gets descheduled for whole scheduler ticks (a claim round trip of
# ~8 ms measured under load), while a 20 us sleep kept it near 0.1 ms.
POLL_INTERVAL_S = 20e-6


class HandoffExpired(RuntimeError):
    """The prefill freed (or may have freed) the blocks: recompute."""


class EpochMismatch(RuntimeError):
    """The prefill's answer names another epoch than the descriptor: a stale descriptor."""


class ClaimRefused(RuntimeError):
    """The claim was refused (already claimed, or unknown to the prefill)."""


@dataclass(frozen=True)
class PullResult:
    nbytes: int
    descriptors: int
    blocks_pulled: int
    blocks_skipped: int
    claim_seconds: float  # claim sent -> answer seen
    prepare_seconds: float  # descriptors -> NIXL request, before posting
    read_seconds: float  # READ posted -> completion seen (descriptor work is outside it)
    total_seconds: float  # descriptors built, claim sent ... release sent


def pull_plan(
    desc: HandoffDescriptor,
    local: HandoffPages,
    cached_blocks: int,
    page_bytes: dict[PoolKind, int],
    cached_windows: tuple[int, ...] = (),
) -> ReadPlan:
    """The pages a pull moves: block pages from `cached_blocks` on, the window pages whose positions
    are not in `cached_windows`, the state page."""
    if local.shape() != desc.pages.shape():
        raise ValueError(
            f"pull {desc.request_id!r}: local pages {local.shape()} (block, window, state) do not match "
            f"the handoff's {desc.pages.shape()}"
        )
    if not 0 <= cached_blocks <= len(desc.pages.block):
        raise ValueError(
            f"pull {desc.request_id!r}: cached_blocks {cached_blocks} outside [0, {len(desc.pages.block)}]"
        )
    skip = frozenset(cached_windows)
    if not skip <= set(range(len(local.window))):
        raise ValueError(f"pull {desc.request_id!r}: cached_windows {cached_windows} outside the window list")
    parts = [
        PoolPull(PoolKind.BLOCK, desc.pages.block[cached_blocks:], local.block[cached_blocks:]),
        PoolPull(
            PoolKind.WINDOW,
            tuple(p for i, p in enumerate(desc.pages.window) if i not in skip),
            tuple(p for i, p in enumerate(local.window) if i not in skip),
        ),
        PoolPull(PoolKind.STATE, desc.pages.state, local.state),
    ]
    return plan_read(parts, page_bytes)


class Puller:
    """Pulls handoffs into one decode rank's pools (see module docstring)."""

    def __init__(
        self,
        inbox: Inbox,
        transport: Transport,
        metrics: TransferMetrics,
        clock: Callable[[], float] = time.monotonic,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.inbox, self.transport, self.metrics, self._clock = inbox, transport, metrics, clock
        self.poll_interval_s = poll_interval_s
        self.page_bytes = {r.pool: r.page_bytes for r in inbox.agent.regions}

    def _await_answer(self, desc: HandoffDescriptor, deadline: float) -> ClaimAnswer:
        while True:
            self.inbox.poll()
            answer = self.inbox.take_answer(desc.agent, desc.request_id)
            if answer is not None:
                return answer
            if self._clock() > deadline:
                raise TransferFailed(
                    f"pull {desc.request_id!r}: no answer to the claim from {desc.agent!r} in time"
                )
            time.sleep(self.poll_interval_s)

    def _fail(self, desc: HandoffDescriptor, exc: Exception) -> Exception:
        self.metrics.failures.inc()
        return exc

    def pull(
        self,
        desc: HandoffDescriptor,
        local: HandoffPages,
        cached_blocks: int,
        timeout_s: float,
        cached_windows: tuple[int, ...] = (),
    ) -> PullResult:
        """Pull `desc` into `local` (same shape), skipping the first `cached_blocks` block pages and
        the window positions in `cached_windows` (workers/transfer/pages.py says which)."""
        self.inbox.agent.peer(desc.agent)  # KeyError naming it unless paired (layout checked)
        start = self._clock()  # descriptor building counts towards the handoff's overhead
        plan = pull_plan(desc, local, cached_blocks, self.page_bytes, cached_windows)
        deadline = start + timeout_s
        self.inbox.send(desc.agent, Claim(desc.request_id, desc.epoch))
        try:
            answer = self._await_answer(desc, deadline)
        except TransferFailed as exc:
            self.inbox.abandon(desc.agent, desc.request_id)
            raise self._fail(desc, exc) from None
        claimed = self._clock()
        if answer.epoch != desc.epoch or answer.outcome is ClaimOutcome.EPOCH_MISMATCH:
            raise self._fail(
                desc,
                EpochMismatch(
                    f"pull {desc.request_id!r}: descriptor epoch {desc.epoch}, prefill answered epoch "
                    f"{answer.epoch} ({answer.outcome.value})"
                ),
            )
        if answer.outcome is ClaimOutcome.EXPIRED:
            raise self._fail(
                desc, HandoffExpired(f"pull {desc.request_id!r} epoch {desc.epoch}: lease expired")
            )
        if answer.outcome is not ClaimOutcome.GRANTED:
            raise self._fail(
                desc, ClaimRefused(f"pull {desc.request_id!r} epoch {desc.epoch}: {answer.outcome.value}")
            )
        pin_deadline = start + answer.pin_s
        try:
            prepare_start = self._clock()
            read = self.transport.prepare(desc.agent, plan)
            try:
                read_start = self._clock()
                read.post()
                # Sleeping between polls lets the engine's step thread (a pull runs beside it, outside
                # the engine lock) take the GIL: a spinning poll held it for whole switch intervals.
                wait(read, min(pin_deadline, deadline), self._clock, self.poll_interval_s)
            finally:
                read.close()
        except TransferFailed as exc:
            self.inbox.send(desc.agent, Release(desc.request_id, desc.epoch))
            raise self._fail(desc, exc) from None
        done = self._clock()
        self.inbox.send(desc.agent, Release(desc.request_id, desc.epoch))
        if done > pin_deadline:
            raise self._fail(
                desc,
                HandoffExpired(
                    f"pull {desc.request_id!r}: READ ended {done - pin_deadline:.3f}s after the pin deadline"
                ),
            )
        self.metrics.bytes.inc(plan.nbytes)
        self.metrics.descriptors.inc(plan.num_descriptors)
        self.metrics.seconds.observe(done - read_start)
        return PullResult(
            nbytes=plan.nbytes,
            descriptors=plan.num_descriptors,
            blocks_pulled=len(desc.pages.block) - cached_blocks,
            blocks_skipped=cached_blocks,
            claim_seconds=claimed - start,
            prepare_seconds=read_start - prepare_start,
            read_seconds=done - read_start,
            total_seconds=self._clock() - start,
        )
