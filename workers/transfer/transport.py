"""Posting READs over NIXL, and a wrapper that injects faults (off unless a test or a
deployment's test-only `faults:` config turns it on).

`NixlTransport.prepare` turns a ReadPlan into one NIXL READ request, which the caller posts (so
the READ can be timed from its posting). With few runs it builds the coalesced (address, length)
lists directly; with many it uses the per-page prepped lists the agent made at pairing (no
per-call list building or validation; NIXL merges adjacent entries itself). The threshold is a
constructor argument, so tests can exercise both; by default every pull uses the prepped lists.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Protocol

from nixl._api import nixl_agent

from workers.faults import FaultConfig
from workers.transfer.agent import TransferAgent
from workers.transfer.descriptors import ReadPlan, descriptor_arrays, page_indices, split_plan

_DRAM = "DRAM"
# At or above this many runs a pull uses the prepped per-page lists. Measured on the dev machine
# (V4-Flash pages, 3 to 52 runs): building the request took 0.09-0.10 ms prepped against
# 0.15-0.38 ms from fresh lists, with the same READ speed, so prepped lists pay at every size.
PREPPED_MIN_RUNS = 1
# How long one poll of a multi-lane READ may block on the lanes still copying.
_LANE_WAIT_S = 1e-3


class TransferFailed(RuntimeError):
    """A READ could not be posted, reported an error, or missed its deadline."""


class DescriptorPath(enum.Enum):
    COALESCED = "coalesced"  # lists built per call from the plan's runs
    PREPPED = "prepped"  # indices into the per-page lists prepped at pairing


class PendingRead(Protocol):
    def post(self) -> None:
        """Start the READ (once); raises TransferFailed if it cannot be posted."""
        ...

    def done(self) -> bool:
        """True once the bytes have landed; raises TransferFailed if the READ failed."""
        ...

    def close(self) -> None:
        """Release the transfer's resources (idempotent)."""
        ...


class Transport(Protocol):
    def prepare(self, peer: str, plan: ReadPlan) -> PendingRead:
        """Build the READ of `plan` from `peer`'s pools into ours (descriptors, NIXL request); the
        caller posts it. Splitting the two lets the caller time the READ from its posting."""
        ...


def wait(
    read: PendingRead, deadline: float, clock: Callable[[], float] = time.monotonic, poll_s: float = 0.0
) -> None:
    """Poll `read` until done, sleeping `poll_s` between polls (0: spin); TransferFailed once
    `clock()` passes `deadline` (the READ is then abandoned, see close)."""
    while not read.done():
        if clock() > deadline:
            raise TransferFailed(f"READ still in progress at its deadline ({deadline:.3f})")
        if poll_s:
            time.sleep(poll_s)


def _run_lane(lane: nixl_agent, handle: object) -> str:
    """Post `handle` on `lane` and poll it to an end, on a lane's own thread ("DONE" or "ERR")."""
    state = lane.transfer(handle)
    while state == "PROC":
        time.sleep(0)  # yield: the copy itself runs in the kernel
        state = lane.check_xfer_state(handle)
    return state


class _NixlRead:
    """One READ cut into one NIXL request per lane: lane 0 is posted and polled by the caller's
    thread, the others run on the transport's lane threads."""

    def __init__(
        self, transport: NixlTransport, handles: list[object], peer: str, path: DescriptorPath
    ) -> None:
        self._t, self._handles, self.peer, self.path = transport, handles, peer, path
        self._futures: list[Future[str]] = []
        self._closed = False

    def _failed(self, what: str) -> TransferFailed:
        lanes = len(self._handles)
        return TransferFailed(
            f"READ from {self.peer!r} ({self.path.value} descriptors, {lanes} lanes) {what}"
        )

    def post(self) -> None:
        agent = self._t.agent
        self._futures = [
            self._t.pool.submit(_run_lane, agent.lane(i), h) for i, h in enumerate(self._handles) if i
        ]
        if agent.nixl.transfer(self._handles[0]) == "ERR":
            raise self._failed("failed to post")

    def done(self) -> bool:
        state = self._t.agent.nixl.check_xfer_state(self._handles[0])
        if state == "DONE" and self._futures:
            # Lane 0 is through: sleep on the other lanes instead of spinning against their copies.
            wait_futures(self._futures, timeout=_LANE_WAIT_S)
        if state == "ERR" or any(f.done() and f.result() == "ERR" for f in self._futures):
            raise self._failed("reported ERR")
        return state == "DONE" and all(f.done() for f in self._futures)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for f in self._futures:  # a lane thread may still be copying: its handle lives until it ends
            f.exception()
        for i, h in enumerate(self._handles):
            self._t.agent.lane(i).release_xfer_handle(h)


class NixlTransport:
    """READs through a TransferAgent (see module docstring). With several lanes it owns one thread
    per extra lane; `close` stops them."""

    def __init__(self, agent: TransferAgent, prepped_min_runs: int = PREPPED_MIN_RUNS) -> None:
        if prepped_min_runs < 1:
            raise ValueError(f"NixlTransport.prepped_min_runs must be >= 1, got {prepped_min_runs}")
        self.agent = agent
        self.prepped_min_runs = prepped_min_runs
        self.page_bytes = {r.pool: r.page_bytes for r in agent.regions}
        self.pool = ThreadPoolExecutor(
            max_workers=max(agent.num_lanes - 1, 1), thread_name_prefix="nixl-lane"
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def path_for(self, plan: ReadPlan) -> DescriptorPath:
        return (
            DescriptorPath.PREPPED
            if plan.num_descriptors >= self.prepped_min_runs
            else DescriptorPath.COALESCED
        )

    def _request(self, lane: int, peer: str, plan: ReadPlan, path: DescriptorPath) -> object:
        nixl = self.agent.lane(lane)
        if path is DescriptorPath.PREPPED:
            local, remote = self.agent.local_pages_of(lane), self.agent.peer_pages(peer, lane)
            li, ri = page_indices(plan, local.base, remote.base)
            return nixl.make_prepped_xfer("READ", local.handle, li, remote.handle, ri)
        info = self.agent.peer(peer)
        local_regions = {r.pool: r for r in self.agent.regions}
        remote_regions = {r.pool: r for r in info.regions}
        la, ra = descriptor_arrays(plan, local_regions, remote_regions)
        return nixl.initialize_xfer(
            "READ", nixl.get_xfer_descs(la, _DRAM), nixl.get_xfer_descs(ra, _DRAM), peer
        )

    def prepare(self, peer: str, plan: ReadPlan) -> PendingRead:
        if not plan.runs:
            raise ValueError(f"read from {peer!r}: the plan moves no pages")
        path = self.path_for(plan)
        parts = split_plan(plan, self.agent.num_lanes, self.page_bytes)
        handles: list[object] = []
        try:
            for lane, part in enumerate(parts):
                handles.append(self._request(lane, peer, part, path))
        except Exception as exc:
            for lane, h in enumerate(handles):
                self.agent.lane(lane).release_xfer_handle(h)
            if isinstance(exc, (KeyError, IndexError, ValueError)):  # ours, naming the bad value
                raise
            # nixl raises its own binding errors: name the peer and the path
            raise TransferFailed(f"READ from {peer!r} ({path.value}) could not be prepared: {exc}") from exc
        return _NixlRead(self, handles, peer, path)


@dataclass
class FaultHooks:
    """Faults to inject, all off by default. Mutable on purpose: a test arms them mid-run.

    fail_next: the next N READs raise TransferFailed when posted (no byte moves).
    delay_s: every read reports done only this many seconds after it really finished.
    plan: faults by READ number (a deployment's `faults:` config, workers/faults.py): a READ its
        `fail_reads` picks fails when posted; one its `delay_reads` picks is late by `read_delay_s`.
    reads / failed / delayed: READs prepared, failed and delayed so far (what was injected).
    """

    fail_next: int = 0
    delay_s: float = 0.0
    plan: FaultConfig | None = None
    reads: int = 0
    failed: int = 0
    delayed: int = 0


class _FaultyRead:
    def __init__(self, inner: PendingRead, hooks: FaultHooks, peer: str, clock: Callable[[], float]) -> None:
        self._inner, self._hooks, self._peer, self._clock = inner, hooks, peer, clock
        self._number = hooks.reads
        hooks.reads += 1
        plan = hooks.plan
        self._planned_failure = plan is not None and plan.fail_reads.hits(self._number)
        planned_delay = plan is not None and plan.delay_reads.hits(self._number)
        self._delay = plan.read_delay_s if plan is not None and planned_delay else hooks.delay_s
        if self._delay > 0:
            hooks.delayed += 1
        self._landed: float | None = None

    def post(self) -> None:
        if self._planned_failure:
            self._hooks.failed += 1
            raise TransferFailed(f"READ #{self._number} from {self._peer!r}: injected failure (fault plan)")
        if self._hooks.fail_next > 0:
            self._hooks.fail_next -= 1
            self._hooks.failed += 1
            raise TransferFailed(f"READ from {self._peer!r}: injected failure (FaultHooks.fail_next)")
        self._inner.post()

    def done(self) -> bool:
        if self._landed is None:
            if not self._inner.done():
                return False
            self._landed = self._clock()
        return self._clock() >= self._landed + self._delay

    def close(self) -> None:
        self._inner.close()


class FaultyTransport:
    """Wraps a Transport and applies FaultHooks; with default hooks it behaves exactly like it."""

    def __init__(
        self, inner: Transport, hooks: FaultHooks, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner, self.hooks, self._clock = inner, hooks, clock

    def prepare(self, peer: str, plan: ReadPlan) -> PendingRead:
        return _FaultyRead(self.inner.prepare(peer, plan), self.hooks, peer, self._clock)
