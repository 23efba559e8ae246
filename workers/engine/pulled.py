"""The engine's side of a request whose prompt KV is pulled from a prefill: what a fill did, and
the handle of a pull in flight.

A pulled request enters an engine in three phases (Engine.begin_pull / end_pull): its sequence is
admitted under the engine lock, its pages are filled OUTSIDE the lock (a NIXL READ, which may take
as long as the transfer's timeout), and it joins the running batch under the lock again. Between
the two, `PendingPull` names the admitted sequence: its pages belong to the pull alone (no step
touches them; they are neither registered in the prefix cache nor evictable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PulledKv:
    """What a fill did: `filled` when the prompt's pages now hold its KV; the bytes moved and
    the seconds it took (claim to release); `error` names why not when not filled."""

    filled: bool
    nbytes: int = 0
    seconds: float = 0.0
    error: str | None = None


FillKv = Callable[[int, int], PulledKv]  # (admitted sequence id, prompt length) -> what it did
AdoptKv = Callable[[int, int], None]  # (sequence id, prompt length): its filled pages become its KV


@dataclass(frozen=True)
class PendingPull:
    """A pulled request admitted by `Engine.begin_pull` whose pages are being filled: sequence
    `seq`, to be filled for the `length` prompt tokens. Ended exactly once, by `Engine.end_pull` or
    `Engine.abandon_pull`."""

    request_id: str
    seq: int
    length: int


def already_adopted(seq: int, length: int) -> None:
    """The AdoptKv of a fill that adopted its pages itself (the one-call `Engine.add_pulled`)."""
