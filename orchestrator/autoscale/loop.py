"""The controller's autoscaling task: every `interval_s`, read the router's load, decide, apply.

`Autoscaler` holds the state between rounds (the signal window, the capacity model, when each pool
last changed, the recent decisions) and is driven by `step`, so tests can run rounds by hand.
`AutoscaleTask` runs it as an asyncio task inside the controller, through `ScaleHooks`: how to
read a snapshot, the pools' sizes now, and the controller's own scale path (which drains before
it removes). Every decision is logged with its reason; those that change a pool and the latest one
are kept for `status`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from orchestrator.autoscale.capacity import CapacityModel, capacity_model_for
from orchestrator.autoscale.policy import Bounds, Decision, PolicyConfig, PoolState, decide, hold
from orchestrator.autoscale.signals import SignalWindow
from orchestrator.router.inputs import Role
from orchestrator.router.load import LoadSnapshot
from orchestrator.spec import DeploymentSpec
from orchestrator.spec_autoscale import AutoscaleSpec
from workers.model.config import ModelConfig

log = logging.getLogger(__name__)
KEPT_DECISIONS = 20


@dataclass(frozen=True)
class ScaleHooks:
    """The controller's side. `sizes` counts instances that serve or are starting (not draining)."""

    snapshot: Callable[[], Awaitable[LoadSnapshot]]
    sizes: Callable[[], tuple[int, int]]  # (prefill, decode)
    scale: Callable[[int, int], Awaitable[object]]  # grow / drain to (prefill, decode)


def _row(d: Decision) -> dict:
    out: dict = {"at_s": round(d.at_s, 3)}
    for name, p in (("prefill", d.prefill), ("decode", d.decode)):
        row = asdict(p)
        row["reason"] = p.reason.value
        out[name] = row
    return out


class Autoscaler:
    """Autoscaling state and one round of it (see the module docstring)."""

    def __init__(self, cfg: PolicyConfig, window: SignalWindow, capacity: CapacityModel,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.window, self.capacity, self.clock = cfg, window, capacity, clock
        self._changed: dict[str, float] = {}
        self._streams: deque[tuple[float, int]] = deque()  # (at, decode running + queued)
        self.changes: deque[dict] = deque(maxlen=KEPT_DECISIONS)
        self.last: Decision | None = None

    def observe(self, snap: LoadSnapshot) -> None:
        self.window.push(snap)
        self.capacity.observe(snap)
        streams = sum(r.running_requests + r.queued_requests for r in snap.ranks
                      if r.role is Role.DECODE and not r.draining)
        self._streams.append((snap.at_s, streams))
        while len(self._streams) > 1 and self._streams[0][0] < snap.at_s - self.window.window_s:
            self._streams.popleft()

    def mean_streams(self) -> float:
        """The decode pool's running + queued requests, averaged over the window's snapshots."""
        return sum(n for _, n in self._streams) / len(self._streams) if self._streams else 0.0

    def decide(self, prefill: int, decode: int) -> Decision:
        """The decision for pools of these sizes now (held while there are no rates yet)."""
        now = self.clock()
        p = PoolState(prefill, self._changed.setdefault("prefill", now))
        d = PoolState(decode, self._changed.setdefault("decode", now))
        if not self.window.ready:
            decision = hold(p, d, now, "waiting for a second load snapshot")
        else:
            sig = self.window.signals()
            decision = decide(sig, self.mean_streams(), self.capacity.capacity(sig), self.cfg, p, d, now)
        self.last = decision
        return decision

    def applied(self, decision: Decision) -> None:
        """The decision's sizes are in place: restart the cooldown of the pools that changed."""
        now = self.clock()
        for name, p in (("prefill", decision.prefill), ("decode", decision.decode)):
            if p.target != p.current:
                self._changed[name] = now

    def status(self) -> dict:
        return {"last": _row(self.last) if self.last is not None else None, "changes": list(self.changes)}


class AutoscaleTask:
    """Runs an Autoscaler every `interval_s` through the controller's hooks until stopped."""

    def __init__(self, autoscaler: Autoscaler, hooks: ScaleHooks, interval_s: float) -> None:
        self.autoscaler, self.hooks, self.interval_s = autoscaler, hooks, interval_s
        self.errors = 0
        self._task: asyncio.Task | None = None
        self._scaling: asyncio.Task | None = None  # the scale in flight (instances start, drain)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        for t in (self._task, self._scaling):
            if t is not None:
                t.cancel()
        self._task = self._scaling = None

    async def round(self) -> Decision:
        """Read, decide, and apply (awaited) when the decision changes a pool."""
        self.autoscaler.observe(await self.hooks.snapshot())
        decision = self._decide()
        if decision.changes:
            await self._apply(decision)
        return decision

    def _decide(self) -> Decision:
        decision = self.autoscaler.decide(*self.hooks.sizes())
        for name, p in (("prefill", decision.prefill), ("decode", decision.decode)):
            level = logging.INFO if p.target != p.current else logging.DEBUG
            log.log(level, "autoscale %s: %d -> %d (%s: %s)", name, p.current, p.target, p.reason.value,
                    p.detail)
        if decision.changes:  # recorded before the scale: status shows why instances are starting
            self.autoscaler.changes.append(_row(decision))
        return decision

    async def _apply(self, decision: Decision) -> None:
        await self.hooks.scale(decision.prefill.target, decision.decode.target)
        self.autoscaler.applied(decision)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        log.error("autoscale %s failed (%d so far): %s: %s", what, self.errors, type(exc).__name__, exc)

    async def _run(self) -> None:
        """Observe every interval, also while a scale is in flight (instances take a while to start,
        and the load they meet is what the next decision needs); decide when none is."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.autoscaler.observe(await self.hooks.snapshot())
                if self._scaling is not None:
                    if not self._scaling.done():
                        continue
                    exc = self._scaling.exception()
                    if exc is not None:
                        self._failed("scale", exc)
                    self._scaling = None
                decision = self._decide()
                if decision.changes:
                    self._scaling = asyncio.ensure_future(self._apply(decision))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one failed round (router busy, restarting) is logged
                self._failed("round", exc)

    def status(self) -> dict:
        return {"enabled": True, "interval_s": self.interval_s, "errors": self.errors,
                **self.autoscaler.status()}


def policy_config(spec: AutoscaleSpec) -> PolicyConfig:
    """The policy's settings from the spec's `autoscale:` section."""
    return PolicyConfig(ttft_slo_s=spec.ttft_slo_s, tpot_slo_s=spec.tpot_slo_s, cooldown_s=spec.cooldown_s,
                        prefill=Bounds(spec.prefill.min, spec.prefill.max),
                        decode=Bounds(spec.decode.min, spec.decode.max))


def autoscale_task(spec: DeploymentSpec, cfg: ModelConfig, hooks: ScaleHooks,
                   assumed_prefill_tok_s: float) -> AutoscaleTask:
    """The task for a spec whose autoscale section is enabled (ValueError when it is not)."""
    a = spec.autoscale
    if not a.enabled:
        raise ValueError("autoscale.enabled is false: no autoscale task to build")
    scaler = Autoscaler(policy_config(a), SignalWindow(a.window_s),
                        capacity_model_for(spec, cfg, assumed_prefill_tok_s))
    return AutoscaleTask(scaler, hooks, a.interval_s)
