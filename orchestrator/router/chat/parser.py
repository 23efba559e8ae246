"""Model output, delta by delta -> reasoning text, answer text and completed tool calls.

Reads what the V4 encoding makes the model write after the prompt (docs/chat.md):
- thinking mode: the prompt ended with `<think>`, so the output starts with reasoning, up to
  `</think>`; then the answer. A stream that ends before `</think>` was all reasoning.
- chat mode: the output is the answer from its first character.
- with tools offered, the answer may end with a call block: "\\n\\n" + `<｜DSML｜tool_calls>` ...
  `</｜DSML｜tool_calls>` (the "\\n\\n" is part of the marker; a block without it is read too).
  The calls are returned once the block closes; the block's text is not answer text.
A marker split across deltas is held back until it is decided: no part of a marker ever reaches
the reasoning or the answer. A block that does not parse, or that the stream ends inside of, is
given back as answer text, verbatim, with a logged warning: model output is never dropped.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from orchestrator.router.chat.dsml import BLOCK_CLOSE, BLOCK_OPEN, DsmlError, ParsedCall, parse_block_body
from orchestrator.router.chat.encoding import THINK_END

log = logging.getLogger(__name__)

_BLOCK_MARKERS = ("\n\n" + BLOCK_OPEN, BLOCK_OPEN)  # the official start first: it begins earlier


class _State(enum.Enum):
    REASONING = "reasoning"
    ANSWER = "answer"
    CALLS = "calls"  # inside a tool-call block


@dataclass(frozen=True)
class Parsed:
    """What one push (or the finish) decided: new reasoning text, new answer text, closed calls."""

    reasoning: str = ""
    answer: str = ""
    calls: tuple[ParsedCall, ...] = ()

    def __add__(self, other: Parsed) -> Parsed:
        return Parsed(self.reasoning + other.reasoning, self.answer + other.answer, self.calls + other.calls)


class OutputParser:
    """One request's output parser. `push` each text delta in order, then `finish` once."""

    def __init__(self, *, thinking: bool, tools: bool) -> None:
        self._state = _State.REASONING if thinking else _State.ANSWER
        self._tools = tools
        self._buf = ""  # text not decided yet: a possible marker prefix, or an open block's body
        self._opener = ""  # the marker that opened the current block, as the model wrote it
        self._scanned = 0  # how much of an open block's body holds no closing marker
        self._finished = False

    def push(self, text: str) -> Parsed:
        """Split new text; what may still be part of a marker is kept for the next push."""
        if self._finished:
            raise RuntimeError("OutputParser.push after finish")
        self._buf += text
        reasoning, answer, calls = [], [], []
        while True:
            if self._state is _State.REASONING:
                cut = self._buf.find(THINK_END)
                if cut < 0:
                    reasoning.append(self._take(len(self._buf) - _held(self._buf, (THINK_END,))))
                    break
                reasoning.append(self._take(cut))
                self._take(len(THINK_END))
                self._state = _State.ANSWER
            elif self._state is _State.ANSWER:
                if not self._tools:
                    answer.append(self._take(len(self._buf)))
                    break
                start, marker = _first(self._buf, _BLOCK_MARKERS)
                if marker is None:
                    answer.append(self._take(len(self._buf) - _held(self._buf, _BLOCK_MARKERS)))
                    break
                answer.append(self._take(start))
                self._opener = self._take(len(marker))
                self._state = _State.CALLS
            else:
                end = self._buf.find(BLOCK_CLOSE, self._scanned)
                if end < 0:  # next time, search only where the closing marker could still start
                    self._scanned = max(0, len(self._buf) - len(BLOCK_CLOSE) + 1)
                    break
                self._scanned = 0
                body = self._take(end)
                self._take(len(BLOCK_CLOSE))
                self._state = _State.ANSWER
                try:
                    calls.extend(parse_block_body(body))
                except DsmlError as exc:
                    # the error quotes model output: its text stays out of INFO+ logs (docs/security.md)
                    log.warning("malformed tool-call block (%d chars) returned as text", len(body))
                    log.debug("malformed tool-call block: %s", exc)
                    answer.append(self._opener + body + BLOCK_CLOSE)
        return Parsed("".join(reasoning), "".join(answer), tuple(calls))

    def finish(self) -> Parsed:
        """The text still held back, once the stream has ended."""
        if self._finished:
            raise RuntimeError("OutputParser.finish twice")
        self._finished = True
        rest = self._take(len(self._buf))
        if self._state is _State.REASONING:
            return Parsed(reasoning=rest)
        if self._state is _State.CALLS:
            log.warning("the output ended inside a tool-call block; returned as text (%d chars)", len(rest))
            return Parsed(answer=self._opener + rest)
        return Parsed(answer=rest)

    def _take(self, n: int) -> str:
        head, self._buf = self._buf[:n], self._buf[n:]
        return head


def _first(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """The earliest full marker in text (the longer one on a tie), or (-1, None)."""
    best, found = -1, None
    for m in markers:
        at = text.find(m)
        if at >= 0 and (found is None or at < best):
            best, found = at, m
    return best, found


def _held(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of text could begin one of the markers."""
    longest = 0
    for m in markers:
        for k in range(min(len(text), len(m) - 1), longest, -1):
            if text.endswith(m[:k]):
                longest = k
                break
    return longest
