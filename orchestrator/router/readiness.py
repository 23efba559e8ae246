"""Whether the router can route a request now: its readiness, as health probes report it.

A router that is up but has no decode worker registered (it just started, or was restarted and the
controller is still registering the ranks one after another) answers every Generate with
UNAVAILABLE. Probes and load balancers in front of several routers should see that before they send
traffic: the gRPC health service `tandem.v1.Router` reports NOT_SERVING and HTTP `/readyz` answers
503 with the reason, until the first admitting decode worker (and, with disaggregation mode
`always`, a prefill worker too) is registered. The server-wide gRPC status ("") and `/healthz` stay
SERVING / 200 while the process runs (liveness).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.router.inputs import DisaggMode, DisaggThresholds, Role, WorkerState


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str  # why not ready; "" when ready


def readiness(workers: Sequence[WorkerState], disagg: DisaggThresholds) -> Readiness:
    """Ready iff some registered, non-draining decode worker exists, and with mode ALWAYS also a
    prefill worker (`workers` = the gateway's reports, which leave draining ranks out)."""
    roles = {w.role for w in workers}
    if Role.DECODE not in roles:
        return Readiness(False, "no decode worker is registered")
    if disagg.mode is DisaggMode.ALWAYS and Role.PREFILL not in roles:
        return Readiness(False, "no prefill worker is registered and disaggregation mode is always")
    return Readiness(True, "")
