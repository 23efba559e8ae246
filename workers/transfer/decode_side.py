"""A decode rank's end of the NIXL handoff: its agent, its Puller, and the fill of one request.

`fill_from(desc)` is what the engine calls (under its lock) once it admitted the request's
sequence through its prefix cache: allocate the prompt's pages, name the ones the prefix cache
already holds (`sequence_pages`), pull the rest (claim, READ, epoch check, release), and adopt them
into the model cache. A pull that fails for a protocol reason (lease expired, epoch mismatch,
claim refused, READ failed) is logged and counted, and the engine recomputes the prompt.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from workers.engine.engine import FillKv, PulledKv
from workers.faults import FaultConfig
from workers.kv.paged_cache import PagedModelCache
from workers.transfer.agent import AgentConfig, AgentInfo, TransferAgent
from workers.transfer.handoff import HandoffDescriptor
from workers.transfer.layout import LayoutSignature
from workers.transfer.messages import Inbox
from workers.transfer.metrics import TransferMetrics
from workers.transfer.pages import sequence_pages
from workers.transfer.pull import ClaimRefused, EpochMismatch, HandoffExpired, Puller, PullResult
from workers.transfer.transport import FaultHooks, FaultyTransport, NixlTransport, TransferFailed, Transport

log = logging.getLogger(__name__)

RECOMPUTE_ERRORS = (HandoffExpired, EpochMismatch, ClaimRefused, TransferFailed)
RECORDS_KEPT = 1024


@dataclass(frozen=True)
class PullRecord:
    """One handoff this rank took: what the pull did, or why it fell back to recompute."""

    request_id: str
    result: PullResult | None
    error: str | None


class DecodeTransfer:
    """One decode rank's pulls over NIXL. Not thread-safe: the engine's lock serialises it."""

    def __init__(
        self, name: str, cache: PagedModelCache, timeout_s: float, *, hugepages: bool = True,
        faults: FaultConfig | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"DecodeTransfer({name!r}).timeout_s must be positive, got {timeout_s}")
        self.cache, self.manager, self.timeout_s = cache, cache.m, timeout_s
        layout = LayoutSignature.of(self.manager.geometry)
        self.agent = TransferAgent(AgentConfig(name, hugepages=hugepages), self.manager.pools, layout)
        self.metrics = TransferMetrics(CollectorRegistry())
        self.transport = NixlTransport(self.agent)
        # Test-only faults wrap the transport: a READ fails or hangs where a real one would.
        self.fault_hooks = FaultHooks(plan=faults) if faults is not None and faults.reads_enabled else None
        reads: Transport = self.transport
        if self.fault_hooks is not None:
            reads = FaultyTransport(self.transport, self.fault_hooks)
        self.puller = Puller(Inbox(self.agent), reads, self.metrics)
        # The last RECORDS_KEPT handoffs taken, oldest first: bounded, a rank takes millions.
        self.records: deque[PullRecord] = deque(maxlen=RECORDS_KEPT)
        self._info = self.agent.info()

    def info(self) -> AgentInfo:
        return self._info

    def is_paired(self, name: str) -> bool:
        return self.agent.is_paired(name)

    def pair(self, peer: AgentInfo) -> None:
        """Meet a prefill rank: LayoutMismatch (nothing loaded) when the layouts differ."""
        self.agent.pair(peer)

    def fill_from(self, desc: HandoffDescriptor) -> FillKv:
        """The engine's fill for `desc` (see the module docstring)."""

        def fill(seq: int, length: int) -> PulledKv:
            if length != desc.num_tokens:
                raise ValueError(f"handoff of {desc.request_id!r}: prompt of {length} tokens, "
                                 f"descriptor num_tokens {desc.num_tokens}")
            # Full prompt blocks this rank holds (pulled before or computed here) are not pulled again.
            self.manager.reuse_blocks(seq, length // self.manager.block_size)
            self.manager.ensure(seq, length)
            sp = sequence_pages(self.manager, seq, length)
            if sp.window_start != desc.window_start:
                raise ValueError(f"handoff of {desc.request_id!r}: window starts at {sp.window_start} "
                                 f"here, {desc.window_start} in the descriptor")
            try:
                got = self.puller.pull(desc, sp.pages, sp.cached_blocks, self.timeout_s, sp.cached_windows)
            except RECOMPUTE_ERRORS as exc:
                why = f"{type(exc).__name__}: {exc}"
                log.warning("handoff of %s from %s failed (%s): recomputing its prompt",
                            desc.request_id, desc.agent, why)
                self.records.append(PullRecord(desc.request_id, None, why))
                return PulledKv(False, error=why)
            self.cache.adopt(seq, length)
            self.records.append(PullRecord(desc.request_id, got, None))
            return PulledKv(True, got.nbytes, got.total_seconds)

        return fill

    def recompute(self, request_id: str, why: str) -> None:
        """Count a handoff that never reached a pull (pairing failed) as a recompute."""
        log.warning("handoff of %s not pulled (%s): recomputing its prompt", request_id, why)
        self.metrics.failures.inc()
        self.records.append(PullRecord(request_id, None, why))

    def close(self) -> None:
        self.transport.close()
        self.agent.close()
