"""The handoff's control messages on the wire (NIXL notifications), and a per-agent inbox.

Three messages: CLAIM (decode -> prefill), ANSWER (prefill -> decode: a ClaimAnswer), RELEASE
(decode -> prefill). Each is one JSON array whose first element is the MessageKind value; the
payloads are small, so clarity wins over packing. Decoding refuses anything malformed by name.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from dataclasses import dataclass

from workers.transfer.agent import TransferAgent
from workers.transfer.handoff import ClaimAnswer, ClaimOutcome


class MessageKind(enum.Enum):
    CLAIM = "claim"
    ANSWER = "answer"
    RELEASE = "release"


@dataclass(frozen=True)
class Claim:
    request_id: str
    epoch: int


@dataclass(frozen=True)
class Release:
    request_id: str
    epoch: int


Message = Claim | Release | ClaimAnswer


class BadMessage(ValueError):
    """A control message that does not decode."""


def encode(msg: Message) -> bytes:
    if isinstance(msg, Claim):
        body: list[object] = [MessageKind.CLAIM.value, msg.request_id, msg.epoch]
    elif isinstance(msg, Release):
        body = [MessageKind.RELEASE.value, msg.request_id, msg.epoch]
    else:
        body = [MessageKind.ANSWER.value, msg.request_id, msg.epoch, msg.outcome.value, msg.pin_s]
    return json.dumps(body, separators=(",", ":")).encode()


def decode(raw: bytes, sender: str) -> Message:
    try:
        body = json.loads(raw)
        kind = MessageKind(body[0])
        rid, epoch = body[1], body[2]
        if not isinstance(rid, str) or not isinstance(epoch, int):
            raise TypeError(f"request_id {rid!r} / epoch {epoch!r} have the wrong types")
        if kind is MessageKind.CLAIM and len(body) == 3:
            return Claim(rid, epoch)
        if kind is MessageKind.RELEASE and len(body) == 3:
            return Release(rid, epoch)
        if kind is MessageKind.ANSWER and len(body) == 5:
            return ClaimAnswer(rid, epoch, ClaimOutcome(body[3]), float(body[4]))
        raise ValueError(f"{kind.value} message with {len(body)} fields")
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise BadMessage(f"control message from {sender!r} does not decode ({exc}): {raw[:80]!r}") from exc


class Inbox:
    """Sorts an agent's incoming messages by kind, so the prefill's server and the decode's pulls of
    one rank can share the agent. Malformed messages raise (naming the sender) on `poll`."""

    def __init__(self, agent: TransferAgent) -> None:
        self.agent = agent
        self._queues: dict[MessageKind, deque[tuple[str, Message]]] = {k: deque() for k in MessageKind}
        self._abandoned: set[tuple[str, str]] = set()

    def poll(self) -> None:
        for sender, raw in self.agent.receive():
            msg = decode(raw, sender)
            kind = (
                MessageKind.CLAIM
                if isinstance(msg, Claim)
                else (MessageKind.RELEASE if isinstance(msg, Release) else MessageKind.ANSWER)
            )
            if isinstance(msg, ClaimAnswer) and (sender, msg.request_id) in self._abandoned:
                self._abandoned.discard((sender, msg.request_id))  # its waiter gave up: drop it
                continue
            self._queues[kind].append((sender, msg))

    def take(self, kind: MessageKind) -> list[tuple[str, Message]]:
        """Every queued (sender, message) of `kind`, oldest first; the queue is emptied."""
        q = self._queues[kind]
        out = list(q)
        q.clear()
        return out

    def take_answer(self, sender: str, request_id: str) -> ClaimAnswer | None:
        """The oldest queued answer of `sender` for `request_id`, removed from the queue; None if
        none has arrived (the caller polls again). The caller checks the answer's epoch."""
        q = self._queues[MessageKind.ANSWER]
        for i, (s, msg) in enumerate(q):
            if s == sender and isinstance(msg, ClaimAnswer) and msg.request_id == request_id:
                del q[i]
                return msg
        return None

    def abandon(self, sender: str, request_id: str) -> None:
        """The waiter for `sender`'s answer about `request_id` gave up: drop that answer whether it
        is queued already or arrives later, so answers nobody takes do not pile up."""
        q = self._queues[MessageKind.ANSWER]
        queued = [
            m for m in q if m[0] == sender and isinstance(m[1], ClaimAnswer) and m[1].request_id == request_id
        ]
        for m in queued:
            q.remove(m)
        if not queued:
            self._abandoned.add((sender, request_id))

    def abandoned(self) -> int:
        """Answers still expected for waiters that gave up (dropped on arrival)."""
        return len(self._abandoned)

    def pending_answers(self) -> int:
        """Answers queued and not yet taken."""
        return len(self._queues[MessageKind.ANSWER])

    def send(self, peer: str, msg: Message) -> None:
        self.agent.send(peer, encode(msg))
