"""Rolling spec updates: what a changed spec changes, and the order that keeps serving.

`plan_update(old, new, ...)` compares two specs of one deployment:
- a pool rolls when what its ranks run with changed: the frozen `WorkerConfig`s `instance_plan`
  derives (batch limits, KV blocks, model, transfer settings) or the shape of its placement
  (ranks, GPUs per rank, topology). Instance counts alone never roll a pool: they scale it;
- the router's settings are rebuilt from the new spec; when they differ they are applied in place
  (`RouterHost.apply_settings`): policy, weights, disaggregation, queue and request limits;
- what cannot change on a running deployment (its name, the router's listeners and their message
  size limit, security: the tokens and certificates clients hold) is refused before anything is
  touched, naming the field.

`roll` replaces a pool's instances one at a time: start one with the new config, wait until it is
ready and registered with every router, then drain and remove one old one; so the pool never has
fewer ready instances than before the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from orchestrator.router.host import RouterSettings
from orchestrator.spec import DeploymentSpec
from orchestrator.worker_plan import instance_plan
from workers.engine.engine import Role

# router.<field> values a running router cannot take in place (its listeners).
_LISTENER_FIELDS = ("host", "port", "http_port")


@dataclass(frozen=True)
class UpdatePlan:
    """What applying a new spec does. `router` is None when the router's settings are unchanged."""

    rolls: tuple[Role, ...]  # pools whose instances are replaced, in this order
    router: RouterSettings | None
    autoscale_changed: bool


def pool_shape(spec: DeploymentSpec, role: Role) -> tuple:
    """Everything an instance of `role` is started with, apart from its name and port: two specs
    with equal shapes run interchangeable instances."""
    pool = spec.prefill if role is Role.PREFILL else spec.decode
    configs = instance_plan(spec, role, "instance").configs
    return configs, pool.ep_ranks, pool.gpus_per_rank, spec.topology


def plan_update(old: DeploymentSpec, new: DeploymentSpec, current: RouterSettings,
                rebuild: Callable[[], RouterSettings]) -> UpdatePlan:
    """What applying `new` over `old` does (see the module docstring). `current` is the running
    router's settings; `rebuild` builds the settings of `new` (called once what cannot change has
    been checked: it reads token files). ValueError names a field that cannot change on a running
    deployment."""
    if new.name != old.name:
        raise ValueError(f"name: the cluster runs deployment {old.name!r}; take it down first "
                         f"(`tandem down`) to start {new.name!r}")
    for f in _LISTENER_FIELDS:
        if getattr(new.router, f) != getattr(old.router, f):
            raise ValueError(f"router.{f}: clients connect to {getattr(old.router, f)!r}; it cannot change "
                             f"to {getattr(new.router, f)!r} on a running deployment")
    if new.security != old.security:
        raise ValueError("security: the tokens and certificates clients hold cannot change on a running "
                         "deployment")
    if new.limits.max_request_bytes != old.limits.max_request_bytes:
        raise ValueError(f"limits.max_request_bytes: the servers were started with "
                         f"{old.limits.max_request_bytes}; it cannot change on a running deployment")
    rolls = tuple(r for r in (Role.PREFILL, Role.DECODE) if pool_shape(old, r) != pool_shape(new, r))
    # Tokens without a file are random per build: the running router's stay.
    same_tokens = dataclasses.replace(rebuild(), token=current.token, admin_token=current.admin_token)
    return UpdatePlan(rolls, same_tokens if same_tokens != current else None, new.autoscale != old.autoscale)


async def roll(old: Sequence[str], add: Callable[[], Awaitable[object]],
               remove: Callable[[str], Awaitable[None]]) -> None:
    """Replace the instances named `old` one by one: add a new one (returns when it is ready and
    registered), then remove (drain) one old one."""
    for instance in old:
        await add()
        await remove(instance)
