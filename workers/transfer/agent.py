"""One NIXL agent per rank: the rank's pool buffers registered once, peers paired by layout.

The agent owns the NIXL objects of a rank: registration of its pool buffers (done once, at
construction), the metadata it exports to peers, the pairing with each peer (layout check FIRST,
then the peer's metadata is loaded), per-page prepped descriptor lists, and small control messages
(NIXL notifications). Moving bytes is transport.py's job; what the messages mean is messages.py's.

Threading: not thread-safe; the rank's loop owns it. The NIXL progress thread is off by default:
on a few shared cores its busy loop starves the rank's own loop, and every call the loop makes
(posting, polling a transfer, reading notifications) progresses UCX anyway.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from nixl._api import nixl_agent, nixl_agent_config

from workers.kv.geometry import PoolKind
from workers.kv.pool import PagePool
from workers.transfer.descriptors import Region
from workers.transfer.hugepages import advise_hugepages
from workers.transfer.layout import LayoutSignature, check_pairing

_DRAM = "DRAM"
_LOCAL = "NIXL_INIT_AGENT"


class NixlBackend(enum.Enum):
    """The NIXL backend plugin an agent moves bytes with (its name in NIXL)."""

    UCX = "UCX"


@dataclass(frozen=True)
class AgentConfig:
    """`name` must be unique among all agents that may pair (instance, rank)."""

    name: str
    backend: NixlBackend = NixlBackend.UCX
    progress_thread: bool = False  # see the module docstring
    # Collapse the CPU pool buffers onto huge pages before registering them (hugepages.py): several
    # times faster DRAM pulls, at a one-time cost of about 8 s per GiB on the 2-core dev machine.
    hugepages: bool = True
    # NIXL agents ("lanes") the rank drives in parallel, all over the same registered buffers: a
    # pull is cut into one READ per lane, each posted from its own thread. On a CPU host one UCX
    # READ is one thread's process_vm_readv; two lanes moved 256 MiB 1.75x faster here. Lane 0
    # carries the control messages; GPUs (one copy engine or NIC) gain nothing from more.
    lanes: int = 1

    def __post_init__(self) -> None:
        if self.lanes < 1:
            raise ValueError(f"AgentConfig({self.name!r}).lanes must be >= 1, got {self.lanes}")


@dataclass(frozen=True)
class AgentInfo:
    """What a peer needs to pair with this agent: NIXL metadata, layout, pool regions."""

    name: str
    metadata: bytes
    layout: LayoutSignature
    regions: tuple[Region, ...]
    lane_metadata: tuple[bytes, ...] = ()  # NIXL metadata of lanes 1.. (lane 0 is `metadata`)

    def region(self, pool: PoolKind) -> Region:
        for r in self.regions:
            if r.pool is pool:
                return r
        raise KeyError(f"agent {self.name!r} registered no {pool.value} pool")


@dataclass(frozen=True)
class Prepped:
    """Per-page prepped descriptor lists of one side: pool p's page i is entry base[p] + i."""

    handle: object
    base: dict[PoolKind, int]


def lane_name(agent: str, lane: int) -> str:
    """NIXL name of an agent's lane: lane 0 is the agent's own name."""
    return agent if lane == 0 else f"{agent}/lane{lane}"


def _page_rows(regions: tuple[Region, ...]) -> tuple[np.ndarray, dict[PoolKind, int]]:
    rows, base, n = [], {}, 0
    for r in regions:
        base[r.pool] = n
        addrs = r.addr + np.arange(r.num_pages, dtype=np.uint64) * np.uint64(r.page_bytes)
        rows.append(np.stack([addrs, np.full_like(addrs, r.page_bytes), np.zeros_like(addrs)], axis=1))
        n += r.num_pages
    return np.concatenate(rows).astype(np.uint64), base


class TransferAgent:
    """A rank's NIXL agent over its page pools (see module docstring)."""

    def __init__(
        self, config: AgentConfig, pools: Mapping[PoolKind, PagePool], layout: LayoutSignature
    ) -> None:
        if not pools:
            raise ValueError(f"TransferAgent({config.name!r}).pools is empty: nothing to register")
        regions = []
        for kind, pool in pools.items():
            buf = pool.buffer
            if buf.device.type != "cpu" or buf.dtype != torch.uint8 or not buf.is_contiguous():
                raise ValueError(
                    f"TransferAgent({config.name!r}): {kind.value} pool buffer must be a contiguous CPU "
                    f"uint8 tensor, got {buf.dtype} on {buf.device} (contiguous={buf.is_contiguous()})"
                )
            regions.append(Region(kind, buf.data_ptr(), pool.page_bytes, pool.num_pages))
        self.config = config
        self.layout = layout
        self.regions = tuple(regions)
        self._buffers = [p.buffer for p in pools.values()]  # keep the registered memory alive
        self.hugepages = tuple(advise_hugepages(b) for b in self._buffers) if config.hugepages else ()
        self._lanes = [self._make_lane(lane_name(config.name, i)) for i in range(config.lanes)]
        self._nixl = self._lanes[0]
        self._registered = [lane.register_memory(self._buffers) for lane in self._lanes]
        rows, base = _page_rows(self.regions)
        self._local_pages = [Prepped(lane.prep_xfer_dlist(_LOCAL, rows, _DRAM), base) for lane in self._lanes]
        self._peers: dict[str, AgentInfo] = {}
        self._peer_pages: dict[str, list[Prepped]] = {}

    def _make_lane(self, name: str) -> nixl_agent:
        cfg = self.config
        agent = nixl_agent(
            name, nixl_agent_config(enable_prog_thread=cfg.progress_thread, backends=[cfg.backend.value])
        )
        if cfg.backend.value not in agent.backends:
            raise RuntimeError(f"TransferAgent({cfg.name!r}): NIXL backend {cfg.backend.value} unavailable")
        return agent

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def nixl(self) -> nixl_agent:
        """Lane 0's NIXL agent (control messages, single-lane READs)."""
        return self._nixl

    @property
    def num_lanes(self) -> int:
        return len(self._lanes)

    def lane(self, i: int) -> nixl_agent:
        """Lane i's NIXL agent, for transport.py; each lane is driven by one thread at a time."""
        return self._lanes[i]

    @property
    def local_pages(self) -> Prepped:
        return self._local_pages[0]

    def local_pages_of(self, lane: int) -> Prepped:
        return self._local_pages[lane]

    def info(self) -> AgentInfo:
        extra = tuple(lane.get_agent_metadata() for lane in self._lanes[1:])
        return AgentInfo(self.name, self._nixl.get_agent_metadata(), self.layout, self.regions, extra)

    def region(self, pool: PoolKind) -> Region:
        for r in self.regions:
            if r.pool is pool:
                return r
        raise KeyError(f"agent {self.name!r} registered no {pool.value} pool")

    # --- peers ---------------------------------------------------------------------------------
    def pair(self, peer: AgentInfo) -> None:
        """Meet a peer: refuse (LayoutMismatch) before loading anything when the layouts differ;
        otherwise load its metadata and prep its per-page lists. Pairing twice is a no-op."""
        if peer.name == self.name:
            raise ValueError(f"agent {self.name!r} cannot pair with itself")
        check_pairing(self.layout, peer.layout, peer.name)
        if peer.name in self._peers:
            if self._peers[peer.name].metadata != peer.metadata:
                raise ValueError(f"peer {peer.name!r} is already paired with different metadata")
            return
        mine = {r.pool for r in self.regions}
        theirs = {r.pool for r in peer.regions}
        if mine != theirs:
            raise ValueError(
                f"peer {peer.name!r} registered pools {sorted(p.value for p in theirs)}, "
                f"we registered {sorted(p.value for p in mine)}"
            )
        # Every lane of ours reads from the peer's lane 0; lane 0 also knows the peer's other
        # lanes, so their connections and READs are accepted here.
        for lane in self._lanes:
            loaded = lane.add_remote_agent(peer.metadata)
            name = loaded.decode() if isinstance(loaded, bytes) else loaded
            if name != peer.name:
                raise ValueError(f"peer metadata names agent {name!r}, its info says {peer.name!r}")
        for meta in peer.lane_metadata:
            self._nixl.add_remote_agent(meta)
        rows, base = _page_rows(peer.regions)
        self._peer_pages[peer.name] = [
            Prepped(lane.prep_xfer_dlist(peer.name, rows, _DRAM), base) for lane in self._lanes
        ]
        self._peers[peer.name] = peer

    def peer(self, name: str) -> AgentInfo:
        try:
            return self._peers[name]
        except KeyError:
            raise KeyError(f"agent {self.name!r} has not paired with {name!r}") from None

    def peer_pages(self, name: str, lane: int = 0) -> Prepped:
        """The peer's per-page lists as prepped on our lane `lane`."""
        self.peer(name)
        return self._peer_pages[name][lane]

    def is_paired(self, name: str) -> bool:
        return name in self._peers

    # --- control messages ----------------------------------------------------------------------
    def send(self, peer: str, payload: bytes) -> None:
        """A small control message to a paired peer (no data path)."""
        self.peer(peer)
        self._nixl.send_notif(peer, payload)

    def receive(self) -> list[tuple[str, bytes]]:
        """(sender, payload) of every message that arrived since the last call."""
        out = []
        for sender, msgs in self._nixl.get_new_notifs().items():
            name = sender.decode() if isinstance(sender, bytes) else sender
            out += [(name, m) for m in msgs]
        return out

    def close(self) -> None:
        """Forget peers and deregister the pools; the agent is unusable afterwards."""
        for name, peer in self._peers.items():
            for lane in self._lanes:
                lane.remove_remote_agent(name)
            for i in range(len(peer.lane_metadata)):
                self._nixl.remove_remote_agent(lane_name(name, i + 1))
        self._peers.clear()
        self._peer_pages.clear()
        for lane, reg in zip(self._lanes, self._registered, strict=True):
            lane.deregister_memory(reg)
