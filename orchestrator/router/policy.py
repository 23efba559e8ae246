"""Routing policies: the interface, their names, and the registry that builds them.

A policy is a pure, deterministic object: `choose(view)` looks only at the frozen `RoutingView`
(request, workers with booked load folded in, prefix matches, topology, the session's last pair,
the router's decision counter, the caller's clock) and returns a `RouteDecision` or a `Refusal`.
It never books, sleeps, reads a clock or does I/O: the `Router` (router.py) folds bookings into
the view, calls `choose`, and books the answer, so consecutive decisions see each other. The
planner's fleet simulator drives the same objects.

Admission is common to all policies: a worker at its queue limit is never chosen, and when no
allowed route remains the answer is `Refusal(QUEUES_FULL)` (RESOURCE_EXHAUSTED) at once, never
an unbounded queue. No decode worker at all (or no prefill worker when one is needed) is
`Refusal(NO_WORKERS)` (UNAVAILABLE).

Policies (docs/router.md has each formula):
- `kv` (Tandem): joint argmin over (prefill, decode) pairs, local prefill included when short.
- `round-robin`: prefill and decode workers each in turn.
- `sglang`: cache-aware with balance thresholds, per side.
- `dynamo`: overlap-credit cost, per side; the decode stage without overlap credit.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol

from orchestrator.router.decision import RouteOutcome
from orchestrator.router.inputs import FleetParams
from orchestrator.router.policy_dynamo import DynamoPolicy
from orchestrator.router.policy_kv import KvPolicy
from orchestrator.router.policy_round_robin import RoundRobinPolicy
from orchestrator.router.policy_sglang import SglangPolicy
from orchestrator.router.view import RoutingView


class PolicyName(enum.Enum):
    """The selectable policies; the value is the name on the command line and in the spec."""

    KV = "kv"
    ROUND_ROBIN = "round-robin"
    SGLANG = "sglang"
    DYNAMO = "dynamo"


class RoutingPolicy(Protocol):
    """Chooses a (prefill, decode) pair for one request; pure and deterministic."""

    def choose(self, view: RoutingView) -> RouteOutcome:
        """The route for view.request, or a typed refusal. Equal inputs give equal answers."""
        ...


POLICIES: Mapping[PolicyName, Callable[[FleetParams], RoutingPolicy]] = MappingProxyType(
    {
        PolicyName.KV: KvPolicy,
        PolicyName.ROUND_ROBIN: RoundRobinPolicy,
        PolicyName.SGLANG: SglangPolicy,
        PolicyName.DYNAMO: DynamoPolicy,
    }
)


def make_policy(name: PolicyName, fleet: FleetParams) -> RoutingPolicy:
    """A policy at its published defaults (Tandem's own defaults for `kv`)."""
    if not isinstance(name, PolicyName):
        raise TypeError(
            f"policy name must be a PolicyName, got {name!r}; known: {[p.value for p in PolicyName]}"
        )
    return POLICIES[name](fleet)
