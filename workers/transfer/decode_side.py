"""A decode rank's end of the NIXL handoff: its agent, its Puller, and the fill of one request.

A fill has three parts, matching the engine's three phases (workers/engine/pulled.py):
- `reserve(desc, seq, length)`, under the engine lock once the engine admitted the sequence through
  its prefix cache: take the prompt blocks this rank already holds by hash, allocate the rest, and
  name the pages (`sequence_pages`); none of them is registered in the prefix cache yet, so none
  is visible to a lookup or evictable.
- `read(desc, pages)`, outside the engine lock: claim, READ, epoch check, release. Reads (and
  pairings) are serialised by this rank's own transfer lock: the agent is not thread-safe.
- `adopt(seq, length)`, under the engine lock: the filled pages become the sequence's KV.
A pull that fails for a protocol reason (lease expired, epoch mismatch, claim refused, READ failed
or past its deadline) is logged and counted, and the engine recomputes the prompt.
`fill_from(desc)` is the three in one call (for `Engine.add_pulled`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from workers.engine.pulled import FillKv, PulledKv
from workers.faults import FaultConfig
from workers.kv.paged_cache import PagedModelCache
from workers.transfer.agent import AgentConfig, AgentInfo, TransferAgent
from workers.transfer.handoff import HandoffDescriptor
from workers.transfer.layout import LayoutSignature
from workers.transfer.messages import Inbox
from workers.transfer.metrics import TransferMetrics
from workers.transfer.pages import SequencePages, sequence_pages
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
    """One decode rank's pulls over NIXL: `reserve` and `adopt` run under the engine's lock, `read`
    and `pair` under this rank's transfer lock (see the module docstring)."""

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
        self._agent_lock = threading.Lock()  # the agent, inbox and transport: one caller at a time

    def info(self) -> AgentInfo:
        return self._info

    def is_paired(self, name: str) -> bool:
        return self.agent.is_paired(name)

    def pair(self, peer: AgentInfo) -> None:
        """Meet a prefill rank: LayoutMismatch (nothing loaded) when the layouts differ."""
        with self._agent_lock:
            self.agent.pair(peer)

    def reserve(self, desc: HandoffDescriptor, seq: int, length: int) -> SequencePages:
        """The pages `desc` fills in admitted sequence `seq` (`length` prompt tokens): full prompt
        blocks this rank holds (pulled before or computed here) are taken, not pulled again; the
        rest are allocated. Under the engine lock; raises ValueError on a mismatch with `desc`."""
        if length != desc.num_tokens:
            raise ValueError(f"handoff of {desc.request_id!r}: prompt of {length} tokens, "
                             f"descriptor num_tokens {desc.num_tokens}")
        self.manager.reuse_blocks(seq, length // self.manager.block_size)
        self.manager.ensure(seq, length)
        sp = sequence_pages(self.manager, seq, length)
        if sp.window_start != desc.window_start:
            raise ValueError(f"handoff of {desc.request_id!r}: window starts at {sp.window_start} "
                             f"here, {desc.window_start} in the descriptor")
        return sp

    def read(self, desc: HandoffDescriptor, sp: SequencePages) -> PulledKv:
        """Pull `desc` into the reserved pages `sp`, skipping the ones this rank holds; a protocol
        failure answers not filled (named). Needs no engine lock: no step touches these pages."""
        try:
            with self._agent_lock:
                got = self.puller.pull(desc, sp.pages, sp.cached_blocks, self.timeout_s, sp.cached_windows)
        except RECOMPUTE_ERRORS as exc:
            why = f"{type(exc).__name__}: {exc}"
            log.warning("handoff of %s from %s failed (%s): recomputing its prompt",
                        desc.request_id, desc.agent, why)
            self.records.append(PullRecord(desc.request_id, None, why))
            return PulledKv(False, error=why)
        self.records.append(PullRecord(desc.request_id, got, None))
        return PulledKv(True, got.nbytes, got.total_seconds)

    def adopt(self, seq: int, length: int) -> None:
        """The filled pages are `seq`'s KV for `length` tokens (its full blocks enter the prefix cache)."""
        self.cache.adopt(seq, length)

    def fill_from(self, desc: HandoffDescriptor) -> FillKv:
        """`reserve`, `read` and (when filled) `adopt` in one call: the fill of `Engine.add_pulled`."""

        def fill(seq: int, length: int) -> PulledKv:
            got = self.read(desc, self.reserve(desc, seq, length))
            if got.filled:
                self.adopt(seq, length)
            return got

        return fill

    def recompute(self, request_id: str, why: str) -> None:
        """Count a handoff that never reached a pull (pairing failed) as a recompute."""
        log.warning("handoff of %s not pulled (%s): recomputing its prompt", request_id, why)
        self.metrics.failures.inc()
        self.records.append(PullRecord(request_id, None, why))

    def close(self) -> None:
        with self._agent_lock:  # after a READ in flight ends
            self.transport.close()
            self.agent.close()
