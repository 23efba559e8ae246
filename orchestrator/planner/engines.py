"""Which simulator replays a load: the compiled core (default) or the Python reference.

Both replay the same events with the router's own decisions and give the same results bit for bit
(tests/planner/test_native_equal.py); the native one is ~15-50x faster. The Python `Simulator` is
the readable reference the native core is checked against; choose it to step through a replay in
a debugger or where no C compiler is installed (the native core says so when it cannot build).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

from orchestrator.planner.fleet import FleetConfig
from orchestrator.planner.native_sim import NativeSimulator
from orchestrator.planner.results import SimResult
from orchestrator.planner.sim import Simulator
from orchestrator.planner.trace import TraceRequest


class SimEngine(enum.Enum):
    """The CLI's --engine values."""

    NATIVE = "native"
    PYTHON = "python"


class Replay(Protocol):
    """One replay of a load (`Simulator`, `NativeSimulator`): `run()` or `meets()`, once."""

    def run(self) -> SimResult: ...

    def meets(self, ttft_slo_s: float, tpot_slo_s: float, attainment: float) -> bool: ...

    def result(self) -> SimResult: ...


_ENGINES: dict[SimEngine, type[Simulator] | type[NativeSimulator]] = {
    SimEngine.NATIVE: NativeSimulator,
    SimEngine.PYTHON: Simulator,
}


def make_replay(engine: SimEngine, fleet: FleetConfig, requests: Sequence[TraceRequest]) -> Replay:
    """A fresh replay of `requests` on `fleet` by `engine`."""
    return _ENGINES[engine](fleet, requests)
