"""The spec's `autoscale:` section (online P:D autoscaling, off by default), pydantic like the rest of
the spec (orchestrator/spec.py); the controller's autoscaler (orchestrator/autoscale/) reads it.

    autoscale:
      enabled: true
      interval_s: 10        # how often the controller reads the router's load and decides
      window_s: 60          # rates are averaged over this much recent time
      ttft_slo_s: 2.0
      tpot_slo_s: 0.1
      cooldown_s: 300       # a pool shrinks only this long after it last changed
      prefill: {min: 1, max: 4}
      decode: {min: 1, max: 8}
"""

from __future__ import annotations

from pydantic import Field, model_validator

from orchestrator.spec_base import Strict


class PoolBounds(Strict):
    """The fewest and most instances the autoscaler may run in one pool."""

    min: int = Field(ge=0, le=4096)
    max: int = Field(ge=1, le=4096)

    @model_validator(mode="after")
    def _ordered(self) -> PoolBounds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class AutoscaleSpec(Strict):
    """Online P:D autoscaling (see docs/operations.md)."""

    enabled: bool = False
    interval_s: float = Field(default=10.0, gt=0, le=3600)
    window_s: float = Field(default=60.0, gt=0, le=86_400)
    ttft_slo_s: float = Field(default=2.0, gt=0, le=3600)
    tpot_slo_s: float = Field(default=0.1, gt=0, le=60)
    cooldown_s: float = Field(default=300.0, ge=0, le=86_400)
    prefill: PoolBounds = PoolBounds(min=1, max=1)
    decode: PoolBounds = PoolBounds(min=1, max=1)


def check_autoscale(a: AutoscaleSpec, prefill_instances: int, decode_instances: int,
                    needs_prefill: bool) -> None:
    """ValueError naming the field when an enabled autoscaler's bounds do not fit the spec:
    decode.min >= 1; prefill.min >= 1 when every request needs a prefill instance
    (`needs_prefill`); the starting instance counts within their bounds."""
    if not a.enabled:
        return
    if a.decode.min < 1:
        raise ValueError(f"autoscale.decode.min must be at least 1 (got {a.decode.min})")
    if needs_prefill and a.prefill.min < 1:
        raise ValueError("autoscale.prefill.min must be at least 1 with router.disaggregation.mode "
                         f"'always' (got {a.prefill.min})")
    for role, n, b in (("prefill", prefill_instances, a.prefill), ("decode", decode_instances, a.decode)):
        if not b.min <= n <= b.max:
            raise ValueError(f"{role}.instances ({n}) is outside autoscale.{role} [{b.min}, {b.max}]")
