"""OpenAI-shaped logprobs from the chunks' `tandem.v1.TokenLogprob`s.

Two shapes, one `LogprobsWriter` per answer (it keeps the text offset across streamed chunks):
- /v1/completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one entry
  per token; each `top_logprobs` entry maps token strings to logprobs: the n most likely, most
  likely first, then the chosen token when it is not among them (so up to n + 1 entries).
- /v1/chat/completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.

Token strings: a token's bytes (`Tokenizer.decode_bytes([id])`) as UTF-8 when they are valid UTF-8
on their own; otherwise (a piece of a multi-byte character, as the byte tokenizer makes for every
non-ASCII character) `"bytes:"` and each byte as `\\xNN`, e.g. `"bytes:\\xc3"`; `bytes` carries
the raw bytes either way. A token with no bytes (BOS, EOS, ids the tokenizer does not map) is shown
as `<bos>`, `<eos>` or `<id:N>`, with `bytes` null.

`text_offset` is the character offset in the completion's text where each token's bytes start
(a token inside a multi-byte character shares that character's offset). Every generated token is
listed, including a stop token and one whose text a stop string cut, so the offsets may point past
the returned text's end.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from tandem.tokenizer import Tokenizer
from tandem.v1 import generate_pb2


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes token `token_id` adds to the text (empty for special or unmapped ids)."""
    return tokenizer.decode_bytes([token_id])


def token_string(tokenizer: Tokenizer, token_id: int) -> str:
    """How a token is shown (see the module docstring)."""
    return _shown(tokenizer, token_id, token_bytes(tokenizer, token_id))


def _shown(tokenizer: Tokenizer, token_id: int, raw: bytes) -> str:
    """`token_string` from the token's bytes (`token_bytes`), which the caller already has."""
    if not raw:
        if token_id == tokenizer.eos_id:
            return "<eos>"
        if token_id == tokenizer.bos_id:
            return "<bos>"
        return f"<id:{token_id}>"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class LogprobsWriter:
    """The `logprobs` object of each chunk of one answer, in the completions or the chat shape."""

    def __init__(self, tokenizer: Tokenizer, *, chat: bool) -> None:
        self._tok = tokenizer
        self._chat = chat
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0  # characters of the completion text completed so far

    def chunk(self, entries: Sequence[generate_pb2.TokenLogprob]) -> dict:
        """The logprobs of one chunk's tokens (call once per chunk, in stream order)."""
        if self._chat:
            return {"content": [self._chat_entry(e) for e in entries]}
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            raw = token_bytes(self._tok, e.token_id)
            chosen = _shown(self._tok, e.token_id, raw)
            top = {token_string(self._tok, t.token_id): t.logprob for t in e.top}
            top.setdefault(chosen, e.logprob)
            out["tokens"].append(chosen)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._advance(raw))
        return out

    def merged(self, chunks: Sequence[Sequence[generate_pb2.TokenLogprob]]) -> dict:
        """One object for a whole non-streamed answer (the chunks' entries in order)."""
        return self.chunk([e for c in chunks for e in c])

    def _advance(self, raw: bytes) -> int:
        """The offset where a token's bytes `raw` start; then count the characters they complete."""
        start = self._chars
        self._chars += len(self._utf8.decode(raw))
        return start

    def _chat_entry(self, e: generate_pb2.TokenLogprob) -> dict:
        entry = self._chat_item(e.token_id, e.logprob)
        entry["top_logprobs"] = [self._chat_item(t.token_id, t.logprob) for t in e.top]
        return entry

    def _chat_item(self, token_id: int, logprob: float) -> dict:
        raw = token_bytes(self._tok, token_id)
        return {"token": _shown(self._tok, token_id, raw), "logprob": logprob,
                "bytes": list(raw) if raw else None}
