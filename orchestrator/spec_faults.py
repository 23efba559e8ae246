"""The spec's `faults:` section: TEST ONLY fault injection, off by default.

Reliability tests deploy with it to make real faults happen at real seams (workers/faults.py):
NIXL READs that fail or hang at the decode ranks' transport wrapper, and KV events lost before
they reach any router. Never set it in production: every fault here costs a recompute or a resync.
Kills (a rank's process, the router) are not configured here; tests do them with `ray.kill` or
SIGKILL.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from orchestrator.spec_base import Strict


class FaultPickSpec(Strict):
    """Which events a fault hits, numbered from 0 per rank: none of the first `skip`, the next
    `count`, and after those each with `probability` (seeded by `seed`)."""

    skip: int = Field(default=0, ge=0)
    count: int = Field(default=0, ge=0)
    probability: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int = 0


class TransferFaultsSpec(Strict):
    """READs posted by decode ranks (the side that pulls a handoff)."""

    fail: FaultPickSpec = FaultPickSpec()
    # READs `delay` picks report done `delay_s` late; past transfer.timeout_s that is a hang.
    delay: FaultPickSpec = FaultPickSpec()
    delay_s: float = Field(default=0.0, ge=0.0, le=3600)

    @model_validator(mode="after")
    def _delay_has_seconds(self) -> TransferFaultsSpec:
        picks = self.delay.count > 0 or self.delay.probability > 0
        if picks and self.delay_s == 0:
            raise ValueError("faults.transfer.delay picks READs but delay_s is 0")
        return self


class KvEventFaultsSpec(Strict):
    """KV events of every rank, dropped before its event log (routers see a sequence gap)."""

    drop: FaultPickSpec = FaultPickSpec()


class FaultsSpec(Strict):
    """TEST ONLY (see the module docstring); all off by default."""

    transfer: TransferFaultsSpec = TransferFaultsSpec()
    kv_events: KvEventFaultsSpec = KvEventFaultsSpec()
