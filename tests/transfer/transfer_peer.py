"""A prefill rank in its own OS process, driven over a multiprocessing pipe, for the transfer tests.

The child builds page pools for a preset, fills them with seeded random bytes (so the parent can
rebuild the exact expected contents on its own), registers them with a TransferAgent, pairs with
the parent's agent, and serves handoffs from a HandoffTable on a fake clock that only moves when
the parent says so. Commands and replies are pickled control objects; KV bytes never go through
the pipe. Every wait is bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field

import torch

from workers.kv.entry import KeyFormat
from workers.kv.geometry import KvGeometry, PoolKind
from workers.kv.pool import PagePool
from workers.kv.presets import Preset

LIFETIME_S = 120.0  # the child exits on its own after this, whatever the parent does


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class PoolSpec:
    preset: Preset = Preset.TINY
    key_format: KeyFormat = KeyFormat.FP4
    pages: tuple[tuple[PoolKind, int], ...] = (
        (PoolKind.BLOCK, 64),
        (PoolKind.WINDOW, 12),
        (PoolKind.STATE, 4),
    )
    seed: int = 0

    def geometry(self) -> KvGeometry:
        return KvGeometry.of(self.preset.shape(self.key_format))

    def pools(self, fill: bool) -> dict[PoolKind, PagePool]:
        """Fresh pools; with `fill`, seeded random bytes (the same on every call), else zeros."""
        geo = self.geometry()
        pools = {kind: PagePool(geo.page(kind), n) for kind, n in self.pages}
        if fill:
            gen = torch.Generator().manual_seed(self.seed)
            for pool in pools.values():
                pool.buffer.copy_(torch.randint(0, 256, pool.buffer.shape, generator=gen, dtype=torch.uint8))
        return pools


@dataclass(frozen=True)
class PrefillSpec:
    name: str
    pools: PoolSpec = field(default_factory=PoolSpec)
    lease_s: float = 5.0
    pin_s: float = 60.0


# --- commands ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Open:
    request_id: str
    block: tuple[int, ...]
    window: tuple[int, ...]
    state: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class Corrupt:
    """Add 1 (mod 256) to one byte of one source page."""

    pool: PoolKind
    page: int
    offset: int


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Serve:
    """Start (True, the default at start-up) or stop (False) answering claims and releases."""

    on: bool


@dataclass(frozen=True)
class Status:
    """Reply: (live request ids, freed [(request_id, pages)] so far, claim answers so far)."""


@dataclass(frozen=True)
class Stop:
    pass


def serve(conn: mp.connection.Connection, spec: PrefillSpec) -> None:
    """The child's main: send its AgentInfo, then serve; an AgentInfo received is a peer to pair."""
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    from workers.transfer.agent import AgentConfig, AgentInfo, TransferAgent
    from workers.transfer.handoff import HandoffPages, HandoffTable
    from workers.transfer.layout import LayoutSignature
    from workers.transfer.messages import Inbox
    from workers.transfer.server import HandoffServer

    pools = spec.pools.pools(fill=True)
    agent = TransferAgent(AgentConfig(spec.name), pools, LayoutSignature.of(spec.pools.geometry()))
    conn.send(agent.info())
    clock = FakeClock()
    freed: list[tuple[str, HandoffPages]] = []
    table = HandoffTable(spec.name, spec.lease_s, spec.pin_s, lambda rid, p: freed.append((rid, p)), clock)
    server = HandoffServer(Inbox(agent), table)
    answers = []
    serving = True
    end = time.monotonic() + LIFETIME_S
    while time.monotonic() < end:
        if serving:
            answers += server.poll().answered
        if not conn.poll(0):
            time.sleep(20e-6)  # yield the core: two cores are shared with everything else
            continue
        cmd = conn.recv()
        if isinstance(cmd, Stop):
            break
        if isinstance(cmd, AgentInfo):
            agent.pair(cmd)
            conn.send(True)
        if isinstance(cmd, Open):
            pages = HandoffPages(cmd.block, cmd.window, cmd.state)
            conn.send(table.open(cmd.request_id, pages, cmd.num_tokens, window_start=0))
        elif isinstance(cmd, Corrupt):
            buf = pools[cmd.pool].buffer
            buf[cmd.page, cmd.offset] = (int(buf[cmd.page, cmd.offset]) + 1) % 256
            conn.send(True)
        elif isinstance(cmd, Serve):
            serving = cmd.on
            conn.send(True)
        elif isinstance(cmd, Advance):
            clock.advance(cmd.seconds)
            conn.send(True)
        elif isinstance(cmd, Status):
            conn.send((list(table.live()), list(freed), list(answers)))
    agent.close()


class PrefillProcess:
    """Parent-side handle of a `serve` child."""

    def __init__(self, spec: PrefillSpec) -> None:
        ctx = mp.get_context("spawn")
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, spec), daemon=True)
        self.proc.start()
        self.info = self._recv(90)

    def _recv(self, timeout: float = 30.0) -> object:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"prefill process {self.spec.name!r} sent nothing in {timeout}s")
        return self.conn.recv()

    def pair(self, info: object) -> None:
        if self.call(info) is not True:
            raise RuntimeError(f"prefill process {self.spec.name!r} did not pair")

    def call(self, cmd: object) -> object:
        self.conn.send(cmd)
        return self._recv()

    def status(self) -> tuple[list[str], list, list]:
        return self.call(Status())

    def wait_freed(self, request_id: str, timeout: float = 10.0) -> list:
        """The freed list once it names `request_id` (the release is asynchronous)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            _, freed, _ = self.status()
            if any(rid == request_id for rid, _ in freed):
                return freed
            time.sleep(0.01)
        raise TimeoutError(f"prefill never freed {request_id!r} within {timeout}s")

    def stop(self) -> None:
        self.conn.send(Stop())
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
