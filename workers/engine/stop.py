"""When a request stops, and the exact text it returns.

`StopTracker` sees each generated token once. It ends the request on: a stop token id, EOS (unless
ignore_eos), max_tokens, or a stop string. Text is decoded incrementally (never splitting a UTF-8
character); stop-id and EOS tokens add no text. A stop string cuts the text just before its first
occurrence, which is never returned. While running, the tracker withholds the longest tail of the
text that could still grow into a stop string, so the text already emitted is always a prefix of
the final text: concatenating every piece gives exactly the final text.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.request import SamplingConfig
from tandem.stream import Finish
from tandem.tokenizer import IncrementalDecoder, Tokenizer


@dataclass(frozen=True)
class Piece:
    """What one token adds to the stream: new text (possibly empty) and, at the end, the reason."""

    text: str
    finish: Finish | None


class StopTracker:
    """Per-request stop logic and text assembly; see the module docstring."""

    def __init__(self, params: SamplingConfig, tokenizer: Tokenizer) -> None:
        self._params = params
        self._eos = tokenizer.eos_id
        self._stop_ids = frozenset(params.stop_token_ids)
        self._decoder = IncrementalDecoder(tokenizer)
        self._text = ""  # stable decoded text so far (before any cut)
        self._emitted = 0  # characters of _text already returned
        self._count = 0
        self._longest = max((len(s) for s in params.stop), default=0)
        self.finish: Finish | None = None

    @property
    def num_tokens(self) -> int:
        return self._count

    def push(self, token: int) -> Piece:
        """Account for the next generated token; returns the text it releases and the finish reason."""
        if self.finish is not None:
            raise RuntimeError(f"StopTracker.push({token}): request already finished ({self.finish.name})")
        self._count += 1
        stop_token = token in self._stop_ids or (token == self._eos and not self._params.ignore_eos)
        at_length = self._count >= self._params.max_tokens
        before = len(self._text)
        if not stop_token:
            self._text += self._decoder.push([token])
        if stop_token or at_length:
            self._text += self._decoder.flush()
        cut = self._find_stop(before)
        if cut is not None:
            self._text = self._text[:cut]
            return self._end(Finish.STOP)
        if stop_token:
            return self._end(Finish.STOP)
        if at_length:
            return self._end(Finish.LENGTH)
        return Piece(self._release(self._safe_end()), None)

    def cancel(self) -> Piece:
        """End the request as cancelled, releasing nothing more."""
        if self.finish is None:
            self.finish = Finish.CANCELLED
        return Piece("", self.finish)

    def _end(self, reason: Finish) -> Piece:
        self.finish = reason
        return Piece(self._release(len(self._text)), reason)

    def _find_stop(self, before: int) -> int | None:
        """Start of the earliest stop string in _text that ends after index `before` (new text)."""
        if not self._params.stop:
            return None
        start = max(0, before - self._longest + 1)
        hits = [i for s in self._params.stop if (i := self._text.find(s, start)) >= 0 and i + len(s) > before]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """How much of _text can be emitted: all but a tail that is a proper prefix of a stop string."""
        hold = 0
        for s in self._params.stop:
            for k in range(min(len(s) - 1, len(self._text)), hold, -1):
                if self._text.endswith(s[:k]):
                    hold = k
                    break
        return len(self._text) - hold

    def _release(self, end: int) -> str:
        piece = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    @property
    def text(self) -> str:
        """The final (or, while running, the current uncut) text."""
        return self._text
