"""What a (re)started controller finds already running: the router and the worker ranks.

Everything the controller creates is a named actor in its namespace (`tandem-router`,
`tandem/<instance>/r<rank>`) and a named placement group (`<deployment>-<instance>`), so a controller
that restarts rebuilds its state from the names instead of starting a second deployment.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import ray
from ray.util import get_placement_group

_RANK = re.compile(r"^tandem/(?P<instance>(?P<role>prefill|decode)-(?P<index>\d+))/r(?P<rank>\d+)$")


@dataclass(frozen=True)
class FoundInstance:
    instance: str
    role: str  # "prefill" | "decode"
    index: int
    ranks: tuple  # actor handles, rank 0 first
    placement_group: object


def find_router(name: str, namespace: str) -> object | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def find_instances(namespace: str, deployment: str) -> list[FoundInstance]:
    """The worker instances whose every rank 0..n-1 is alive as a named actor."""
    ranks: dict[str, dict[int, object]] = defaultdict(dict)
    meta: dict[str, tuple[str, int]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        m = _RANK.match(entry["name"]) if entry.get("namespace") == namespace else None
        if m is None:
            continue
        inst = m["instance"]
        ranks[inst][int(m["rank"])] = ray.get_actor(entry["name"], namespace=namespace)
        meta[inst] = (m["role"], int(m["index"]))
    found = []
    for inst, by_rank in sorted(ranks.items()):
        if sorted(by_rank) != list(range(len(by_rank))):
            continue  # a rank is missing: the health check would replace it anyway
        try:
            pg = get_placement_group(f"{deployment}-{inst}")
        except ValueError:
            continue
        role, index = meta[inst]
        found.append(FoundInstance(inst, role, index, tuple(by_rank[r] for r in range(len(by_rank))), pg))
    return found
