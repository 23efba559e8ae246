"""Posting READs over NIXL, and a wrapper that injects faults (off unless a test turns it on).

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
from dataclasses import dataclass
from typing import Protocol

from workers.transfer.agent import TransferAgent
from workers.transfer.descriptors import ReadPlan, descriptor_arrays, page_indices

_DRAM = "DRAM"
# At or above this many runs a pull uses the prepped per-page lists. Measured on the dev machine
# (V4-Flash pages, 3 to 52 runs): building the request took 0.09-0.10 ms prepped against
# 0.15-0.38 ms from fresh lists, with the same READ speed, so prepped lists pay at every size.
PREPPED_MIN_RUNS = 1


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


def wait(read: PendingRead, deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
    """Poll `read` until done; TransferFailed once `clock()` passes `deadline` (the READ is then
    abandoned, see close)."""
    while not read.done():
        if clock() > deadline:
            raise TransferFailed(f"READ still in progress at its deadline ({deadline:.3f})")


class _NixlRead:
    def __init__(self, transport: NixlTransport, handle: object, peer: str, path: DescriptorPath) -> None:
        self._t, self._h, self.peer, self.path = transport, handle, peer, path
        self._closed = False

    def post(self) -> None:
        if self._t.agent.nixl.transfer(self._h) == "ERR":
            raise TransferFailed(f"READ from {self.peer!r} ({self.path.value} descriptors) failed to post")

    def done(self) -> bool:
        state = self._t.agent.nixl.check_xfer_state(self._h)
        if state == "ERR":
            raise TransferFailed(f"READ from {self.peer!r} ({self.path.value} descriptors) reported ERR")
        return state == "DONE"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._t.agent.nixl.release_xfer_handle(self._h)


class NixlTransport:
    """READs through a TransferAgent (see module docstring)."""

    def __init__(self, agent: TransferAgent, prepped_min_runs: int = PREPPED_MIN_RUNS) -> None:
        if prepped_min_runs < 1:
            raise ValueError(f"NixlTransport.prepped_min_runs must be >= 1, got {prepped_min_runs}")
        self.agent = agent
        self.prepped_min_runs = prepped_min_runs

    def path_for(self, plan: ReadPlan) -> DescriptorPath:
        return (
            DescriptorPath.PREPPED
            if plan.num_descriptors >= self.prepped_min_runs
            else DescriptorPath.COALESCED
        )

    def prepare(self, peer: str, plan: ReadPlan) -> PendingRead:
        if not plan.runs:
            raise ValueError(f"read from {peer!r}: the plan moves no pages")
        nixl = self.agent.nixl
        path = self.path_for(plan)
        try:
            if path is DescriptorPath.PREPPED:
                local, remote = self.agent.local_pages, self.agent.peer_pages(peer)
                li, ri = page_indices(plan, local.base, remote.base)
                handle = nixl.make_prepped_xfer("READ", local.handle, li, remote.handle, ri)
            else:
                info = self.agent.peer(peer)
                local_regions = {r.pool: r for r in self.agent.regions}
                remote_regions = {r.pool: r for r in info.regions}
                la, ra = descriptor_arrays(plan, local_regions, remote_regions)
                handle = nixl.initialize_xfer(
                    "READ", nixl.get_xfer_descs(la, _DRAM), nixl.get_xfer_descs(ra, _DRAM), peer
                )
        except (KeyError, IndexError, ValueError):
            raise
        except Exception as exc:  # nixl raises its own binding errors: name the peer and the path
            raise TransferFailed(f"READ from {peer!r} ({path.value}) could not be prepared: {exc}") from exc
        return _NixlRead(self, handle, peer, path)


@dataclass
class FaultHooks:
    """Faults to inject, all off by default. Mutable on purpose: a test arms them mid-run.

    fail_next: the next N READs raise TransferFailed when posted (no byte moves).
    delay_s: every read reports done only this many seconds after it really finished.
    """

    fail_next: int = 0
    delay_s: float = 0.0


class _FaultyRead:
    def __init__(self, inner: PendingRead, hooks: FaultHooks, peer: str, clock: Callable[[], float]) -> None:
        self._inner, self._hooks, self._peer, self._clock = inner, hooks, peer, clock
        self._delay = hooks.delay_s
        self._landed: float | None = None

    def post(self) -> None:
        if self._hooks.fail_next > 0:
            self._hooks.fail_next -= 1
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
