"""Chat tests over the scripted gateway: the "model" writes fixed text, one step per piece (token
ids = the piece's bytes), in a context large enough for V4's tools section."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from orchestrator.router.admission import Limits
from orchestrator.router.frontend import Frontend
from orchestrator.router.inputs import Role
from support.scripted_gateway import ScriptedGateway, Step, idle_worker, scripted_frontend
from tandem.stream import Finish

CHAT_LIMITS = Limits(max_context=65536, default_max_tokens=256, max_tokens=4096)


def scripted_chat(pieces: Sequence[str], registry: CollectorRegistry, *, finish: Finish = Finish.STOP,
                  split: bool = False) -> tuple[ScriptedGateway, Frontend]:
    """A gateway streaming `pieces` then ending with `finish`, and a frontend over it; with `split`
    a prefill worker answers the first piece and the decode streams the rest."""
    reports = [idle_worker("decode-0", Role.DECODE)] + ([idle_worker("prefill-0", Role.PREFILL)] if split else [])
    gateway = ScriptedGateway([Step(tuple(p.encode()), p) for p in pieces], reports, finish)
    return gateway, scripted_frontend(gateway, registry, split=split, limits=CHAT_LIMITS)
