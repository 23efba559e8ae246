"""A prefill rank's end of the NIXL handoff: its agent, its HandoffTable, and a server thread.

The rank's pools are registered once (one `TransferAgent`, UCX). `open` turns a held sequence into
a handoff (pages named by `sequence_pages`, a fresh epoch, a lease). The HandoffServer runs on its
own thread, so a claim is answered within about `busy_poll_s` even while a long prefill chunk
runs (the engine loop's housekeeping runs once per step, which can be seconds apart).

Freeing: the table decides when a handoff's pages are free (release, lease or pin expiry), on the
server thread; the pages belong to the engine, whose state only its loop may change. So frees are
queued here and `take_freed` hands them to the loop's housekeeping, which frees them under the
engine lock. A free is therefore late by up to one loop iteration, never early: a late free only
delays reuse, while an early one could let a READ see reused pages.

Threading: the agent and table are shared by the server thread and the actor; `_lock` guards both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry

from workers.kv.manager import KvCacheManager
from workers.transfer.agent import AgentConfig, AgentInfo, TransferAgent
from workers.transfer.handoff import HandoffDescriptor, HandoffPages, HandoffTable
from workers.transfer.layout import LayoutSignature
from workers.transfer.messages import Inbox
from workers.transfer.metrics import TransferMetrics
from workers.transfer.pages import sequence_pages
from workers.transfer.server import HandoffServer

log = logging.getLogger(__name__)


class PrefillTransfer:
    """One prefill rank's handoffs over NIXL (see the module docstring)."""

    def __init__(
        self,
        name: str,
        manager: KvCacheManager,
        lease_s: float,
        pin_s: float,
        *,
        busy_poll_s: float = 2e-4,
        idle_poll_s: float = 0.02,
        hugepages: bool = True,
    ) -> None:
        self.manager = manager
        self.agent = TransferAgent(
            AgentConfig(name, hugepages=hugepages), manager.pools, LayoutSignature.of(manager.geometry)
        )
        self.metrics = TransferMetrics(CollectorRegistry())
        self._lock = threading.Lock()
        self._freed: deque[str] = deque()
        self.table = HandoffTable(name, lease_s, pin_s, self._on_free, time.monotonic, self.metrics)
        self.server = HandoffServer(Inbox(self.agent), self.table)
        self._info = self.agent.info()
        # Poll fast only while a handoff is live: a claim can only be granted then; a late claim
        # for a freed handoff waits at most idle_poll_s for its EXPIRED answer.
        self._busy_poll_s, self._idle_poll_s = busy_poll_s, idle_poll_s
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"handoff-{name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.agent.name

    def info(self) -> AgentInfo:
        """What a decode needs to pair with this rank (metadata, layout, regions)."""
        return self._info

    def pair(self, peer: AgentInfo) -> None:
        """Meet a decode rank: LayoutMismatch (nothing loaded) when the layouts differ."""
        with self._lock:
            self.agent.pair(peer)

    def open(self, request_id: str, seq: int, length: int) -> HandoffDescriptor:
        """Hold `seq`'s pages for `length` prompt tokens under a lease. Call under the engine's
        lock (the manager is read); the pages stay the sequence's until `take_freed` names it."""
        sp = sequence_pages(self.manager, seq, length)
        with self._lock:
            return self.table.open(request_id, sp.pages, length, sp.window_start)

    def is_live(self, request_id: str) -> bool:
        with self._lock:
            return self.table.is_live(request_id)

    def take_freed(self) -> list[str]:
        """Request ids whose handoff pages the table freed since the last call (free them now)."""
        out = []
        while self._freed:
            out.append(self._freed.popleft())
        return out

    def _on_free(self, request_id: str, pages: HandoffPages) -> None:
        self._freed.append(request_id)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    report = self.server.poll()
                    busy = len(self.table) > 0
            except Exception as exc:  # a malformed message must not stop the rank's claims
                log.exception("handoff server of %s: poll failed: %s", self.name, exc)
                self.error = exc
                busy = True
            else:
                for sender, claim in report.unanswerable:
                    log.warning("handoff server of %s: claim %s from unpaired agent %r dropped",
                                self.name, claim, sender)
                for rid in report.expired:
                    log.info("handoff of %s on %s expired: its pages are freed", rid, self.name)
            self._stop.wait(self._busy_poll_s if busy else self._idle_poll_s)

    def close(self) -> None:
        """Stop the server thread and deregister the pools."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            self.agent.close()
