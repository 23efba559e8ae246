"""Instances of different sizes pair rank by rank: a 2-rank prefill instance hands off to a 1-rank
and a 3-rank decode instance. KV lives per dp rank, so nothing else is needed; this checks that
one agent serves several peers and pulls from several peers, with every byte in place.

The prefill ranks' servers run on their own threads (one agent per thread, as in a worker)."""

from __future__ import annotations

import threading

import pytest
import torch
from prometheus_client import CollectorRegistry
from transfer_peer import FakeClock, PoolSpec

from workers.kv.geometry import PoolKind
from workers.transfer.agent import AgentConfig, TransferAgent
from workers.transfer.handoff import HandoffPages, HandoffTable
from workers.transfer.layout import LayoutSignature
from workers.transfer.messages import Inbox
from workers.transfer.metrics import TransferMetrics
from workers.transfer.pull import Puller
from workers.transfer.server import HandoffServer
from workers.transfer.transport import NixlTransport

pytestmark = pytest.mark.transfer

SMALL = (PoolKind.BLOCK, 16), (PoolKind.WINDOW, 4), (PoolKind.STATE, 2)


class PrefillRank:
    def __init__(self, name: str, seed: int) -> None:
        spec = PoolSpec(pages=SMALL, seed=seed)
        self.pools = spec.pools(fill=True)
        self.agent = TransferAgent(AgentConfig(name), self.pools, LayoutSignature.of(spec.geometry()))
        self.freed: list[str] = []
        self.table = HandoffTable(name, 30.0, 30.0, lambda rid, _: self.freed.append(rid), FakeClock())
        self.server = HandoffServer(Inbox(self.agent), self.table)
        self.lock = threading.Lock()  # the table belongs to one thread at a time
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            while not self.stop.wait(50e-6):
                with self.lock:
                    self.server.poll()
        except BaseException as exc:  # surfaced by the test, not swallowed
            self.errors.append(exc)


class DecodeRank:
    def __init__(self, name: str) -> None:
        spec = PoolSpec(pages=SMALL)
        self.pools = spec.pools(fill=False)
        self.agent = TransferAgent(AgentConfig(name), self.pools, LayoutSignature.of(spec.geometry()))
        self.metrics = TransferMetrics(CollectorRegistry())
        self.puller = Puller(Inbox(self.agent), NixlTransport(self.agent), self.metrics)


def test_prefill_and_decode_instances_of_different_sizes_pair_rank_by_rank():
    prefill = [PrefillRank(f"p{i}", seed=10 + i) for i in range(2)]
    decode_small = [DecodeRank("d1-0")]
    decode_large = [DecodeRank(f"d3-{i}") for i in range(3)]
    decodes = decode_small + decode_large
    for p in prefill:  # pairing happens before the servers' threads own the prefill agents
        for d in decodes:
            d.agent.pair(p.agent.info())
            p.agent.pair(d.agent.info())
        p.thread.start()
    try:
        jobs = [  # (prefill rank, decode rank): every decode rank pulls, d1-0 from both prefill ranks
            (prefill[0], decode_small[0]),
            (prefill[1], decode_small[0]),
            (prefill[1], decode_large[0]),
            (prefill[0], decode_large[1]),
            (prefill[1], decode_large[2]),
        ]
        for n, (p, d) in enumerate(jobs):
            src = HandoffPages(block=(n, n + 5, 15 - n), window=(n % 4,), state=(n % 2,))
            dst = HandoffPages(block=(15 - n, n + 1, 8 + n), window=((n + 1) % 4,), state=((n + 1) % 2,))
            with p.lock:
                desc = p.table.open(f"req-{n}", src, num_tokens=3 * 256, window_start=640)
            result = d.puller.pull(desc, dst, cached_blocks=0, timeout_s=20.0)
            assert result.blocks_pulled == 3
            for kind in PoolKind:
                for s, t in zip(src.of(kind), dst.of(kind), strict=True):
                    assert torch.equal(d.pools[kind].buffer[t], p.pools[kind].buffer[s]), (n, kind, s, t)
        for p in prefill:
            assert not p.errors
        assert sum(d.metrics.value("kv_transfer_seconds_count") for d in decodes) == len(jobs)
        assert decode_small[0].metrics.value("kv_transfer_seconds_count") == 2
    finally:
        for p in prefill:
            p.stop.set()
            p.thread.join(5)
        for rank in prefill + decodes:
            rank.agent.close()
