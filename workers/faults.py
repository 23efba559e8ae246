"""Fault injection for reliability tests: which NIXL READs fail or hang, which KV events are lost.

Off by default (every `FaultPick` picks nothing). A deployment's spec turns it on (`faults:`, a
test-only section) and the controller hands each rank a `FaultConfig`. Faults act at real seams,
never inside the logic under test:
- READs: the decode rank's transport is wrapped (workers/transfer/transport.py `FaultyTransport`):
  a picked READ fails when posted, or reports done only `read_delay_s` after it landed (past the
  transfer timeout that is a hung transfer: the pull gives up and the decode recomputes);
- KV events: a picked event never enters the rank's event log, so every router reading it sees a
  sequence gap and must resync from the rank's snapshot.
Picks are deterministic: by position (skip the first `skip`, then take `count`) and, after those,
by a seeded draw per position, so a test knows what it injected.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class FaultPick:
    """Which events of a stream (numbered from 0) a fault hits: none of the first `skip`, the
    next `count`, and after those each with `probability` (a draw seeded by `seed` and its number)."""

    skip: int = 0
    count: int = 0
    probability: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.skip < 0 or self.count < 0:
            raise ValueError(f"FaultPick skip={self.skip} count={self.count}: must be >= 0")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"FaultPick.probability = {self.probability}: must be in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.count > 0 or self.probability > 0.0

    def hits(self, index: int) -> bool:
        """Whether event number `index` is hit (the same answer every time)."""
        if index < self.skip:
            return False
        if index < self.skip + self.count:
            return True
        if self.probability <= 0.0:
            return False
        return random.Random(self.seed * 1_000_003 + index).random() < self.probability


@dataclass(frozen=True)
class FaultConfig:
    """One rank's faults (see the module docstring). READs are posted by decode ranks only."""

    fail_reads: FaultPick = field(default_factory=FaultPick)
    delay_reads: FaultPick = field(default_factory=FaultPick)
    read_delay_s: float = 0.0
    drop_kv_events: FaultPick = field(default_factory=FaultPick)

    def __post_init__(self) -> None:
        if self.read_delay_s < 0:
            raise ValueError(f"FaultConfig.read_delay_s = {self.read_delay_s}: must be >= 0")
        if self.delay_reads.enabled and self.read_delay_s == 0:
            raise ValueError("FaultConfig.delay_reads picks READs but read_delay_s is 0")

    @property
    def reads_enabled(self) -> bool:
        return self.fail_reads.enabled or self.delay_reads.enabled


class EventDropper:
    """Drops the KV events its pick hits, counting every event it is shown (one per rank)."""

    def __init__(self, pick: FaultPick) -> None:
        self.pick = pick
        self.seen = 0
        self.dropped = 0

    def keep(self, events: Sequence[T]) -> tuple[T, ...]:
        """The events that survive, in order."""
        out = []
        for ev in events:
            if self.pick.hits(self.seen):
                self.dropped += 1
            else:
                out.append(ev)
            self.seen += 1
        return tuple(out)


__all__ = ["EventDropper", "FaultConfig", "FaultPick"]
