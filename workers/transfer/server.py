"""The prefill side of the handoff protocol: answer claims, take releases, expire leases.

The prefill rank's loop calls `poll()` once per iteration (and while idle): it drains the
CLAIM and RELEASE messages that arrived, answers each claim from the HandoffTable, frees released
handoffs, then expires overdue ones. Releases are not answered: the decode relies on the pin
deadline it was granted, not on an acknowledgement (handoff.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.transfer.handoff import ClaimAnswer, HandoffTable, ReleaseOutcome
from workers.transfer.messages import Claim, Inbox, MessageKind, Release


@dataclass(frozen=True)
class PollReport:
    """What one poll did, for the loop's logs and the tests."""

    answered: tuple[ClaimAnswer, ...]
    # Claims from agents this rank never paired with: they cannot be answered (NIXL needs the
    # peer's metadata to send), so they are reported here for the loop to log, not raised: one
    # misbehaving peer must not stop the rank.
    unanswerable: tuple[tuple[str, Claim], ...]
    released: tuple[tuple[str, ReleaseOutcome], ...]
    expired: tuple[str, ...]


class HandoffServer:
    """Serves one prefill rank's HandoffTable over its agent's inbox."""

    def __init__(self, inbox: Inbox, table: HandoffTable) -> None:
        self.inbox, self.table = inbox, table

    def poll(self) -> PollReport:
        self.inbox.poll()
        answered, unanswerable, released = [], [], []
        for sender, msg in self.inbox.take(MessageKind.CLAIM):
            assert isinstance(msg, Claim)  # the inbox sorted it by kind
            if not self.inbox.agent.is_paired(sender):
                unanswerable.append((sender, msg))
                continue
            answer = self.table.claim(msg.request_id, msg.epoch)
            self.inbox.send(sender, answer)
            answered.append(answer)
        for _, msg in self.inbox.take(MessageKind.RELEASE):
            assert isinstance(msg, Release)
            released.append((msg.request_id, self.table.release(msg.request_id, msg.epoch)))
        return PollReport(tuple(answered), tuple(unanswerable), tuple(released), self.table.expire())
